"""The exact mode's speed-ups change no result: batched guidance branches, real-valued RoPE,
length buckets without masks, and a forward that never reads a tensor back to the host.

All float32 on CPU: the fast paths reorder float sums at most, so they agree within 1e-5
(velocities of order 1) and 1e-6 (RoPE of unit-norm rotations).
"""
import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from omnigen2_batch.model import load_pipeline
from omnigen2_batch.model.rope import apply_rotary, cos_sin_tables, gather_rotary, rope_tables


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


def mixed_batch(config, seed=0):
    """4 samples: different image sizes, 2 / 0 / 1 / 3 refs, text lengths 5 / 9 / 1 / 7."""
    g = torch.Generator().manual_seed(seed)
    p, c = config.patch_size, config.in_channels
    latents = [torch.randn(c, h * p, w * p, generator=g) for h, w in [(4, 3), (3, 5), (2, 2), (5, 4)]]
    ref_sizes = [[(2, 4), (3, 3)], None, [(4, 2)], [(1, 2), (2, 1), (3, 2)]]
    refs = [None if s is None else [torch.randn(c, h * p, w * p, generator=g) for h, w in s] for s in ref_sizes]
    lengths = [5, 9, 1, 7]
    text = torch.randn(4, 9, config.text_feat_dim, generator=g)
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    return latents, torch.tensor([0.1, 0.5, 0.7, 0.95]), text, mask, refs, lengths


def test_real_rope_equals_the_complex_product():
    tables = rope_tables([8, 4, 4], [512, 128, 128])
    ids = torch.randint(0, 128, (2, 7, 3), generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 7, 3, 16, generator=torch.Generator().manual_seed(1))
    complex_rotary = torch.cat([t[ids[..., k].long()] for k, t in enumerate(tables)], dim=-1)
    reference = apply_rotary_emb(x, complex_rotary, use_real=False)
    ours = apply_rotary(x, gather_rotary(cos_sin_tables(tables), ids))
    assert (ours - reference).abs().max().item() <= 1e-6


@pytest.mark.parametrize("text_scale, image_scale, with_images", [(4.0, 1.0, False), (5.0, 2.0, True)])
def test_batched_branches_equal_separate_passes(pipe, text_scale, image_scale, with_images):
    images = None
    if with_images:
        from PIL import Image

        pixels = torch.rand(48, 64, 3, generator=torch.Generator().manual_seed(0))
        images = [[Image.fromarray((pixels.numpy() * 255).astype("uint8"))]] * 2
    outputs, calls, images_out = {}, [], {}

    def record(module, args, output):
        calls.append(output.shape[0])
        outputs.setdefault(batched, []).append(output)

    handle = pipe.transformer.register_forward_hook(record)
    try:
        for batched in (False, True):
            images_out[batched] = pipe(
                ["a fox", "a much longer prompt than the first one"], negative_prompt=["", "blurry, ugly"],
                input_images=images, height=32, width=32, num_inference_steps=3, output_type="pt",
                text_guidance_scale=text_scale, image_guidance_scale=image_scale, batch_guidance=batched,
                generator=[torch.Generator().manual_seed(i) for i in (3, 4)]).images
    finally:
        handle.remove()
    branches = 3 if with_images else 2
    assert calls == [2] * branches * 3 + [2 * branches] * 3
    # Step 0 has the same inputs both ways: the stacked forward equals the separate ones.
    separate = torch.cat(outputs[False][:branches])
    torch.testing.assert_close(outputs[True][0], separate, atol=1e-5, rtol=1e-5)
    # Later steps inherit rounding amplified by the guidance scales; images agree on the pixel scale.
    assert (images_out[True] - images_out[False]).abs().max().item() <= 1e-4


def test_length_buckets_equal_the_padded_path(pipe):
    model = pipe.transformer
    latents, t, text, mask, refs, _ = mixed_batch(model.config)
    latents = [latents[0]] * 4  # equal images, so only the text and refs make lengths differ
    refs[1] = [refs[0][0]]  # 9 text + 8 ref tokens = sample 3's 7 + 10: one bucket holds two rows
    with torch.no_grad():
        padded = model(latents, t, text, None, mask, ref_image_hidden_states=refs)
        model.bucket_by_length = True
        try:
            layout = model.sequence_layout(mask, latents, refs)
            assert len(model._row_groups(layout, list(range(4)))) == 3
            bucketed = model(latents, t, text, None, mask, ref_image_hidden_states=refs)
        finally:
            model.bucket_by_length = False
    for a, b in zip(padded, bucketed):
        assert (a - b).abs().max().item() <= 1e-5


def test_forward_with_text_lens_never_syncs(pipe, monkeypatch):
    model = pipe.transformer
    latents, t, text, mask, refs, lengths = mixed_batch(model.config, seed=1)
    with torch.no_grad():
        expected = model(latents, t, text, None, mask, ref_image_hidden_states=refs)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync inside the transformer forward")

    model._layouts.clear()  # build the layout under the watch too
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "equal", refuse)
    with torch.no_grad():
        got = model(latents, t, text, None, mask, ref_image_hidden_states=refs, text_lens=lengths)
    monkeypatch.undo()
    for a, b in zip(got, expected):
        assert (a - b).abs().max().item() <= 1e-6
