"""CLIP scoring (open_clip): text alignment, subject consistency, edit preservation and direction.

Every metric is a cosine of L2-normalised CLIP embeddings, except `clipscore` (100*max(cos, 0),
the usual CLIPScore scale without the 2.5 weight). The metric names are part of the manifest
format: recipes set thresholds on them and reports plot them.

Embeddings of reference images, edit sources and texts are cached by content, so a character's
reference is embedded once per scorer (i.e. once per run and worker), however many shots use it.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:  # torch and PIL stay out of CLI start-up
    from PIL.Image import Image

    from .jobs import Job

log = logging.getLogger(__name__)

METRICS = ("text", "clipscore", "consistency_mean", "consistency_min", "preservation", "direction")
CLIP_CONFIG_DIR = Path(__file__).parent / "clip_configs"  # tiny-clip.json, for tests/quickstart
CACHE_LIMIT = 4096  # cached reference/text embeddings; oldest dropped first


class ScorerError(RuntimeError):
    """The CLIP model or its weights cannot be loaded; the message says what to do."""


def judge(scores: Mapping[str, float], thresholds: Mapping[str, float]) -> tuple[bool, tuple[str, ...]]:
    """(passed, failed metric names). A thresholded metric that was not scored counts as failed."""
    unknown = sorted(set(thresholds) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown} in scoring thresholds; known: {list(METRICS)}")
    failed = tuple(m for m, t in thresholds.items() if not scores.get(m, -math.inf) >= t)
    return not failed, failed


def normalised(metric: str, value: float) -> float:
    """A metric mapped onto [0, 1] so different metrics can be averaged (cosines span [-1, 1])."""
    return value / 100.0 if metric == "clipscore" else (value + 1.0) / 2.0


def alignment_text(job: "Job", multilingual: bool) -> str:
    """What the image is compared with: the job's own prompt for a multilingual CLIP, otherwise
    scoring.text (the plan puts a Chinese prompt's English twin there)."""
    return job.prompt if multilingual else (job.scoring.text or job.prompt)


_configs_registered = False


def _register_configs() -> None:
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
    weights file. Models named "hf-hub:..." or "local-dir:..." bring their own weights.
    `multilingual`: the text tower understands the job's own language (e.g. an XLM-R CLIP).
    """

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None, device: str = "cpu",
                 multilingual: bool = False, seed: int = 0, batch_size: int = 32):
        import open_clip
        import torch

        _register_configs()
        self.model_name, self.pretrained, self.device = model, pretrained, device
        self.multilingual, self.batch_size = multilingual, batch_size
        schema, _ = open_clip.factory.parse_model_name(model)
        self.random_weights = not pretrained and schema is None
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(seed)
            try:
                self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                    model, pretrained=pretrained or None, device=device)
            except (RuntimeError, FileNotFoundError, ValueError) as err:
                raise ScorerError(
                    f"cannot load CLIP model {model!r} with weights {pretrained!r}: {err}. Name an "
                    "open_clip model (open_clip.list_models()) and, for weights, a local weights file "
                    "or a tag already in the Hugging Face cache (offline runs never download)") from err
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
        refs = {ref.key: images[ref.key] for job, _ in items for ref in _scoring_refs(job)}
        ref_vecs = dict(zip(refs, self._image_vectors(list(refs.values()))))
        texts = self._text_vectors(list(dict.fromkeys(t for job, _ in items for t in self._texts(job))))
        return [self._metrics(job, out, ref_vecs, texts) for (job, _), out in zip(items, outputs)]

    def _texts(self, job: "Job") -> list[str]:
        s = job.scoring
        direction = [s.source_caption, s.target_caption] if _has_direction(job) else []
        return [alignment_text(job, self.multilingual)] + direction

    def _metrics(self, job: "Job", out, ref_vecs: dict, texts: dict) -> dict[str, float]:
        s = job.scoring
        text = float(out @ texts[alignment_text(job, self.multilingual)])
        scores = {"text": text, "clipscore": 100.0 * max(text, 0.0)}
        if s.references:
            sims = [float(out @ ref_vecs[ref.key]) for ref in s.references]
            scores["consistency_mean"] = sum(sims) / len(sims)
            scores["consistency_min"] = min(sims)
        if s.source is not None:
            src = ref_vecs[s.source.key]
            scores["preservation"] = float(out @ src)
            if _has_direction(job):
                scores["direction"] = _cosine(out - src, texts[s.target_caption] - texts[s.source_caption])
        return scores

    # -- bilingual parity ---------------------------------------------------------------------
    def bilingual_parity(self, pairs: Sequence["ParityInput"]) -> "ParityReport":
        """EN vs ZH kept-image similarity and text-alignment gap (en text - zh text) per pair."""
        vecs = self._image_vectors([im for p in pairs for im in (p.en_image, p.zh_image)])
        rows = []
        for i, p in enumerate(pairs):
            gap = None if p.en_text is None or p.zh_text is None else p.en_text - p.zh_text
            rows.append(PairParity(p.pair, p.en_job, p.zh_job, float(vecs[2 * i] @ vecs[2 * i + 1]), gap))
        return ParityReport(rows)


def _scoring_refs(job: "Job"):
    return job.scoring.references + ((job.scoring.source,) if job.scoring.source else ())


def _has_direction(job: "Job") -> bool:
    s = job.scoring
    return bool(s.source is not None and s.source_caption and s.target_caption)


def _cosine(a, b) -> float:
    """Cosine of two difference vectors; 0 when either is (numerically) zero."""
    import torch.nn.functional as F

    return float(F.cosine_similarity(a, b, dim=0, eps=1e-8))


@dataclass(frozen=True)
class ParityInput:
    """One bilingual pair's kept outputs: images and their `text` scores (None if unscored)."""

    pair: str
    en_job: str
    zh_job: str
    en_image: "Image"
    zh_image: "Image"
    en_text: float | None
    zh_text: float | None


@dataclass(frozen=True)
class PairParity:
    """A row of the manifest's `pairs` table (store.save_pair takes these fields)."""

    pair: str
    en_job: str
    zh_job: str
    similarity: float
    text_gap: float | None


@dataclass(frozen=True)
class ParityReport:
    pairs: list[PairParity]

    @property
    def similarity_sum(self) -> float:
        return sum(p.similarity for p in self.pairs)

    @property
    def similarity_mean(self) -> float | None:
        return self.similarity_sum / len(self.pairs) if self.pairs else None

    @property
    def text_gap_sum(self) -> float:
        return sum(p.text_gap for p in self.pairs if p.text_gap is not None)

    @property
    def text_gap_mean(self) -> float | None:
        gaps = [p.text_gap for p in self.pairs if p.text_gap is not None]
        return sum(gaps) / len(gaps) if gaps else None


def parity_inputs(jobs: Sequence["Job"], results: Sequence) -> list[ParityInput]:
    """Bilingual pairs among finished jobs, from in-memory JobResults."""
    by_id = {r.job_id: r for r in results}
    entries = []
    for job in jobs:
        result = by_id.get(job.id)
        if result is not None and result.image is not None:
            entries.append((job, result.image, result.attempts[result.best].scores.get("text")))
    return _pair_up(entries)


def record_pairs(store, scorer: ClipScorer) -> "ParityReport":
    """Compute the bilingual parity of a run's finished pairs from its files (kept or rejected
    images, and the `text` score of the attempt each image came from) and save the pairs rows.
    The executor calls this once after a run; `score` after re-scoring."""
    from .images import load_rgb
    from .jobs import Job

    entries = []
    for row in store.jobs():
        job = Job.from_dict(row["job"])
        if job.scoring.pair and row["image"]:
            text = next((a["scores"].get("text") for a in store.attempts(job.id)
                         if a["n"] == row["best"]), None)
            entries.append((job, load_rgb(store.run_dir / row["image"]), text))
    report = scorer.bilingual_parity(_pair_up(entries))
    for p in report.pairs:
        store.save_pair(p.pair, p.en_job, p.zh_job, p.similarity, p.text_gap)
    return report


def _pair_up(entries) -> list[ParityInput]:
    """(job, image, text score) entries -> pairs matched by scoring.pair; the job with lang "en"
    is the EN side. Pairs with a side missing are left out."""
    sides: dict[str, dict[str, tuple]] = {}
    for job, image, text in entries:
        if job.scoring.pair:
            lang = "en" if job.lang == "en" else "zh"
            sides.setdefault(job.scoring.pair, {})[lang] = (job.id, image, text)
    return [ParityInput(pair, s["en"][0], s["zh"][0], s["en"][1], s["zh"][1], s["en"][2], s["zh"][2])
            for pair, s in sides.items() if len(s) == 2]


# -- re-scoring a finished run (the `score` command) ---------------------------------------------
def rescore_run(run_dir, scorer: ClipScorer, chunk_size: int = 64) -> dict:
    """Re-score a run's kept and rejected images (and attempt images kept on disk) with `scorer`,
    re-decide kept/rejected with the same rule as the ladder, and rewrite the results through
    RunStore.commit, which moves images between kept/ and rejected/ and rewrites PNG chunks.

    Attempts whose image is not on disk keep the scores of the run that made them and take no
    part in the decision; re-scored attempts carry params["rescored_with"].
    """
    from .store import FINAL, RunStore

    summary = {"jobs": 0, "changed": [], "skipped": [], "clip_model": scorer.model_name,
               "pretrained": scorer.pretrained, "random_weights": scorer.random_weights}
    with RunStore.open(run_dir) as store:
        rows = store.jobs()
        paths = {row["id"]: row["image"] for row in rows if row["image"]}
        todo = [row for row in rows if row["status"] in FINAL and row["image"]]
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            for row, job, result in _rescore_chunk(store, chunk, paths, scorer, summary):
                paths[job.id] = store.image_path(job, result.status)  # dependants find moved anchors
                if result.status != row["status"]:
                    summary["changed"].append({"job": job.id, "name": f"{job.section}/{job.name}",
                                               "from": row["status"], "to": result.status})
        report = record_pairs(store, scorer)
        counts = store.counts()["status"]
        store.set_meta("rescored", {"clip_model": scorer.model_name, "pretrained": scorer.pretrained})
    summary.update(kept=counts["kept"], rejected=counts["rejected"], pairs=[vars(p) for p in report.pairs],
                   similarity_mean=report.similarity_mean, text_gap_mean=report.text_gap_mean)
    return summary


def _rescore_chunk(store, rows: list[dict], paths: dict, scorer: ClipScorer, summary: dict):
    """Load, score (in one batch) and commit a chunk of jobs; yields (row, job, new result)."""
    from .jobs import Job
    from .reflection import decide

    loaded = []
    for row in rows:
        job = Job.from_dict(row["job"])
        try:
            loaded.append((row, job, _load_result(store, row, job), _reference_images(store, job, paths)))
        except (OSError, ValueError, KeyError) as err:
            summary["skipped"].append({"job": job.id, "error": f"{type(err).__name__}: {err}"})
    items = [(job, a) for _, job, (result, _), _ in loaded for a in result.attempts if a.image is not None]
    refs = {key: im for *_, images in loaded for key, im in images.items()}
    scores = scorer.score([(job, a.image) for job, a in items], refs)
    for (job, attempt), new in zip(items, scores):
        _rejudge(attempt, new, job.scoring.thresholds, scorer)
    for row, job, (result, keep_attempts), _ in loaded:
        result.status, result.best = decide(result.attempts, job.scoring.thresholds)
        store.commit(job, result, keep_attempts=keep_attempts)
        summary["jobs"] += 1
        yield row, job, result


def _rejudge(attempt, scores: dict, thresholds: dict, scorer: ClipScorer) -> None:
    attempt.scores = scores
    attempt.passed, attempt.failed_metrics = judge(scores, thresholds)
    attempt.params = {**attempt.params, "scored": True,
                      "rescored_with": f"{scorer.model_name}:{scorer.pretrained or 'random'}"}


def _load_result(store, row: dict, job: "Job"):
    """(JobResult as recorded, with the images on disk, whether attempt images are kept)."""
    from .images import load_rgb
    from .jobs import Attempt, JobResult

    rows, attempts = store.attempts(job.id), []
    for a in rows:
        on_disk = a["image"] and (store.run_dir / a["image"]).is_file()
        image = load_rgb(store.run_dir / a["image"]) if on_disk else None
        attempts.append(Attempt(a["n"], a["seed"], a["strategy"], a["reason"], a["params"] or {},
                                a["scores"] or {}, bool(a["passed"]), tuple(a["failed_metrics"] or ()),
                                a["seconds"] or 0.0, image))
    output = store.run_dir / row["image"]
    best = next((i for i, a in enumerate(attempts) if a.n == row["best"]), None)
    if best is None:
        raise ValueError(f"{output}: the manifest names attempt {row['best']} as its maker, "
                         f"but has no such attempt")
    if attempts[best].image is None:
        attempts[best].image = load_rgb(output)
    keep_attempts = any(a["image"] for a in rows)
    return JobResult(job.id, row["status"], attempts, best, row["error"] or ""), keep_attempts


def _reference_images(store, job: "Job", paths: dict) -> dict:
    """The scoring references and edit source of a job: files by path, anchors from the run."""
    from .images import load_rgb

    images = {}
    for ref in _scoring_refs(job):
        if ref.job_id:
            if ref.job_id not in paths:
                raise ValueError(f"reference job {ref.job_id} has no image in this run")
            images[ref.key] = load_rgb(store.run_dir / paths[ref.job_id])
        else:
            images[ref.key] = load_rgb(ref.path)
    return images


def run_clip_settings(run_dir, model: str | None, pretrained: str | None, device: str = "auto") -> dict:
    """ClipScorer arguments for re-scoring a run: explicit choices win, then the run's own
    settings (WorkerSettings names in the `settings` meta), then ViT-B-32 with random weights."""
    import json

    from .store import RunStore

    with RunStore.open(run_dir, readonly=True) as store:
        settings = json.loads(store.get_meta("settings") or "{}")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"model": model or settings.get("clip_model") or "ViT-B-32",
            "pretrained": pretrained if model or pretrained else settings.get("clip_pretrained"),
            "multilingual": bool(settings.get("multilingual", False)), "device": device}
