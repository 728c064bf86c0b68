"""The toy world: flat-shape scenes, EN/ZH captions, edits, characters and a pixel judge.

Every image here has an exact ground truth, so the product's claims (the scorer keeps right
images, the ladder improves them, the EN/ZH gap, the fast-mode cost) can be measured with tiny
models trained on a CPU. This package imports only from `omnigen2_batch.jobs`,
`omnigen2_batch.images` and third-party libraries.
"""
