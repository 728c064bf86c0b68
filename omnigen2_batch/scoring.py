"""CLIP scoring (open_clip): text alignment, subject consistency, edit preservation and direction.

Every metric is a cosine of L2-normalised CLIP embeddings, except `clipscore` (100*max(cos, 0),
the usual CLIPScore scale without the 2.5 weight). The metric names are part of the manifest
format: recipes set thresholds on them and reports plot them.

Consistency is also scored per character of a multi-subject shot: `consistency.<name>` is the
mean cosine to that character's own references.

Embeddings of reference images, edit sources and texts are cached by content, so a character's
reference is embedded once per scorer (i.e. once per run and worker), however many shots use it.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from .config import DEFAULT_CLIP, open_clip_name
from .errors import UnavailableError

if TYPE_CHECKING:  # torch and PIL stay out of CLI start-up
    from PIL.Image import Image

    from .jobs import Job

log = logging.getLogger(__name__)

CLIP_CONFIG_DIR = Path(__file__).parent / "clip_configs"  # tiny-clip.json, for tests/quickstart
CACHE_LIMIT = 4096  # cached reference/text embeddings; oldest dropped first


class ScorerError(UnavailableError):
    """The CLIP model or its weights cannot be loaded; the message says what to do."""


def alignment_text(job: "Job", multilingual: bool) -> str:
    """What the image is compared with: the job's own prompt for a multilingual CLIP, otherwise
    scoring.text (the plan puts a Chinese prompt's English twin there)."""
    return job.prompt if multilingual else (job.scoring.text or job.prompt)


_configs_registered = False


def register_configs() -> None:
    """Make the package's configs (tiny-clip) known to open_clip, once per process."""
    global _configs_registered
    if not _configs_registered:
        import open_clip

        open_clip.add_model_config(CLIP_CONFIG_DIR)
        _configs_registered = True


@functools.lru_cache(maxsize=8)
def _tokenizer(model: str):
    """Tokenizers are stateless and slow to build (BPE merges): share one per model name."""
    import open_clip

    return open_clip.get_tokenizer(model)


def _fingerprint(image: "Image") -> str:
    return hashlib.sha1(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()


class ClipScorer:
    """An open_clip model on one device.

    `pretrained`: None (seeded random weights: scores are meaningless, for tests and smoke runs),
    an open_clip tag resolved from the local cache only when HF_HUB_OFFLINE is set, or a local
    weights file. Models named "hf-hub:..." or "local-dir:..." bring their own weights, and so does
    "toy-clip" (the package's toy-world CLIP, which reads English and Chinese).
    `multilingual`: the text tower understands the job's own language (e.g. an XLM-R CLIP).
    """

    def __init__(self, model: str = DEFAULT_CLIP, pretrained: str | None = None, device: str = "cpu",
                 multilingual: bool = False, seed: int = 0, batch_size: int = 32):
        import open_clip
        import torch

        register_configs()
        self.model_name, self.pretrained, self.device = model, pretrained, device
        self.multilingual, self.batch_size = multilingual, batch_size
        model = open_clip_name(model)
        schema, _ = open_clip.factory.parse_model_name(model)
        self.random_weights = not pretrained and schema is None
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(seed)
            try:
                self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                    model, pretrained=pretrained or None, device=device)
            except Exception as err:  # a missing file, a wrong shape, a file that is not weights
                log.debug("loading CLIP %s (%s) failed", model, pretrained, exc_info=True)
                raise ScorerError(
                    f"cannot load CLIP model {model!r} with weights {pretrained!r} "
                    f"({type(err).__name__}: {err}). Name an open_clip model "
                    "(open_clip.list_models()) and, for weights, a weights file of that model "
                    "(.safetensors, or a weights-only torch checkpoint) or a tag already in the "
                    "Hugging Face cache (offline runs never download)") from err
        self.model.eval().requires_grad_(False)
        self.tokenizer = _tokenizer(model)
        self._cache: dict[str, object] = {}
        if self.random_weights:
            log.warning("CLIP scorer %r has RANDOM weights (no pretrained given): its scores are "
                        "meaningless and thresholds decide nothing real", model)

    # -- embeddings ---------------------------------------------------------------------------
    def embed_images(self, images: Sequence["Image"]):
        """L2-normalised image embeddings, (N, D) float32 on the CPU, computed in batches."""
        return self._embed([self.preprocess(im.convert("RGB")) for im in images], self.model.encode_image)

    def embed_texts(self, texts: Sequence[str]):
        return self._embed(list(self.tokenizer(list(texts))), self.model.encode_text)

    def _embed(self, inputs: list, encode):
        import torch
        import torch.nn.functional as F

        chunks = []
        with torch.inference_mode():
            for start in range(0, len(inputs), self.batch_size):
                batch = torch.stack(inputs[start:start + self.batch_size]).to(self.device)
                chunks.append(F.normalize(encode(batch).float(), dim=-1).cpu())
        return torch.cat(chunks)

    def _cached(self, items: dict[str, object], embed) -> dict[str, object]:
        """Embeddings for {cache key: input}, embedding only the missing ones, in one batch."""
        missing = [key for key in items if key not in self._cache]
        if missing:
            self._cache.update(zip(missing, embed([items[k] for k in missing])))
        found = {key: self._cache[key] for key in items}
        while len(self._cache) > CACHE_LIMIT:
            self._cache.pop(next(iter(self._cache)))
        return found

    def _image_vectors(self, images: Sequence["Image"]) -> list:
        keys = ["img:" + _fingerprint(im) for im in images]
        vecs = self._cached(dict(zip(keys, images)), self.embed_images)
        return [vecs[key] for key in keys]

    def _text_vectors(self, texts: Sequence[str]) -> dict[str, object]:
        vecs = self._cached({"txt:" + t: t for t in texts}, self.embed_texts)
        return {key[4:]: vec for key, vec in vecs.items()}

    # -- metrics ------------------------------------------------------------------------------
    def score(self, items: Sequence[tuple["Job", "Image"]],
              images: Mapping[str, "Image"]) -> list[dict[str, float]]:
        """Scores for each (job, output image); `images` maps ImageRef keys to the references and
        edit sources the jobs' scoring names. All outputs, references and texts go in batches."""
        if not items:
            return []
        outputs = self.embed_images([im for _, im in items])
        refs = {ref.key: images[ref.key] for job, _ in items for ref in scoring_refs(job)}
        ref_vecs = dict(zip(refs, self._image_vectors(list(refs.values()))))
        texts = self._text_vectors(list(dict.fromkeys(t for job, _ in items for t in self._texts(job))))
        return [self._metrics(job, out, ref_vecs, texts) for (job, _), out in zip(items, outputs)]

    def _texts(self, job: "Job") -> list[str]:
        s = job.scoring
        direction = [s.source_caption, s.target_caption] if s.measures("direction") else []
        return [alignment_text(job, self.multilingual)] + direction

    def _metrics(self, job: "Job", out, ref_vecs: dict, texts: dict) -> dict[str, float]:
        s = job.scoring
        text = float(out @ texts[alignment_text(job, self.multilingual)])
        scores = {"text": text, "clipscore": 100.0 * max(text, 0.0)}
        if s.references:
            sims = {ref.key: float(out @ ref_vecs[ref.key]) for ref in s.references}
            every = [sims[ref.key] for ref in s.references]
            scores["consistency_mean"] = sum(every) / len(every)
            scores["consistency_min"] = min(every)  # the weakest character's weakest reference
            for name, keys in s.characters.items():  # each character against its own references
                scores[f"consistency.{name}"] = sum(sims[k] for k in keys) / len(keys)
        if s.source is not None:
            src = ref_vecs[s.source.key]
            scores["preservation"] = float(out @ src)
            if s.measures("direction"):
                scores["direction"] = _cosine(out - src, texts[s.target_caption] - texts[s.source_caption])
        return scores

    def similarities(self, pairs: Sequence[tuple["Image", "Image"]]) -> list[float]:
        """CLIP image-image cosine of each pair, embedded in one batch (bilingual parity)."""
        vecs = self._image_vectors([im for pair in pairs for im in pair])
        return [float(vecs[2 * i] @ vecs[2 * i + 1]) for i in range(len(pairs))]


def scoring_refs(job: "Job"):
    return job.scoring.references + ((job.scoring.source,) if job.scoring.source else ())


def _cosine(a, b) -> float:
    """Cosine of two difference vectors; 0 when either is (numerically) zero."""
    import torch.nn.functional as F

    return float(F.cosine_similarity(a, b, dim=0, eps=1e-8))
