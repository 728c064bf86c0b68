"""generate -> score -> reflect, for a list of jobs on one device, micro-batched.

Each round every unfinished job submits its next attempt(s); the generator gets the whole list
(it groups same-shape requests into pipeline calls) and the scorer scores all outputs at once.
A job whose generation raises fails alone: the round is retried job by job (the generator
promises the same pixels alone or batched) and the others go on.

Attempt.seconds is the attempt's share of its round: the round's wall time split evenly over the
round's requests, because batched work has no per-request time.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Mapping, Sequence

from .errors import UnavailableError
from .jobs import Attempt, Job, JobResult
from .reflection import JobLadder, Planned

if TYPE_CHECKING:
    from PIL.Image import Image

    from .config import RunConfig
    from .scoring import ClipScorer

log = logging.getLogger(__name__)


class Worker:
    """Runs jobs to a result. With scorer None (--no-score) each job makes one attempt and keeps
    it; the attempt has empty scores and params["scored"] False."""

    def __init__(self, generator, scorer: "ClipScorer | None" = None):
        self.generator, self.scorer = generator, scorer

    def run(self, jobs: Sequence[Job], images: Mapping[str, "Image"],
            earlier: Mapping[str, list[Attempt]] | None = None) -> list[JobResult]:
        """One JobResult per job, in order. `images` maps every ImageRef key the jobs need;
        `earlier` gives the recorded attempts of jobs that climb on from where they stopped."""
        earlier = earlier or {}
        slots: list[JobLadder | JobResult] = []
        for job in jobs:
            try:
                slots.append(JobLadder(job, images, scored=self.scorer is not None,
                                       attempts=list(earlier.get(job.id, ()))))
            except ValueError as err:  # a missing image or an unknown ladder step: this job only
                slots.append(JobResult(job.id, "failed", error=str(err)))
        ladders = [slot for slot in slots if isinstance(slot, JobLadder)]
        while active := [ladder for ladder in ladders if not ladder.done]:
            self._round(active, images)
        return [slot.result() if isinstance(slot, JobLadder) else slot for slot in slots]

    def _round(self, ladders: list[JobLadder], images: Mapping[str, "Image"]) -> None:
        start = time.perf_counter()
        planned: list[tuple[JobLadder, Planned]] = []
        for ladder in ladders:
            try:
                planned += [(ladder, p) for p in ladder.next_round(self.generator.critique)]
            except Exception as err:  # a broken MLLM critique fails that job only
                log.debug("job %s: planning its next attempt failed", ladder.job.id, exc_info=True)
                ladder.fail(f"{type(err).__name__}: {err}")
        outputs = self._generate(planned)
        made = [(ladder, p, im) for (ladder, p), im in zip(planned, outputs) if ladder.status == "pending"]
        scores = self._score([(ladder.job, im) for ladder, _, im in made], images)
        share = (time.perf_counter() - start) / max(len(planned), 1)
        rounds: dict[JobLadder, list] = {}
        for (ladder, p, im), sc in zip(made, scores):
            rounds.setdefault(ladder, []).append((p, im, sc, share))
        for ladder, outs in rounds.items():
            ladder.record_round(outs)

    def _generate(self, planned: list[tuple[JobLadder, Planned]]) -> list:
        """Images in order; a job whose generation raises is failed and gets None."""
        if not planned:
            return []
        try:
            return self._call_generator([p.request for _, p in planned])
        except Exception:
            log.debug("a batch of %d requests failed", len(planned), exc_info=True)
            log.warning("a batch of %d requests failed; retrying job by job", len(planned))
        images: list = []
        for ladder in dict.fromkeys(ladder for ladder, _ in planned):
            own = [p.request for lad, p in planned if lad is ladder]
            try:
                images += self._call_generator(own)
            except Exception as err:
                ladder.fail(f"generation failed: {type(err).__name__}: {err}")
                images += [None] * len(own)
        return images

    def _call_generator(self, requests: list) -> list:
        out = self.generator.generate(requests)
        if len(out) != len(requests):
            raise RuntimeError(f"generator returned {len(out)} images for {len(requests)} requests")
        return [im.convert("RGB") for im in out]

    def _score(self, items: list, images: Mapping[str, "Image"]) -> list[dict]:
        if self.scorer is None:
            return [{} for _ in items]
        return self.scorer.score(items, images)


def resolve_device(device: str) -> str:
    """"auto" -> CUDA when there is one, else the CPU; an explicit device must exist."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnavailableError(f"--device {device}: this machine has no usable CUDA device "
                               "(torch sees none); use --device cpu or auto")
    return device


def build_worker(config: "RunConfig") -> Worker:
    """Load the pipeline and the scorer once; the Worker then serves many `run` calls."""
    from .generate import PipelineGenerator
    from .model import load_pipeline

    device = resolve_device(config.device)
    dtype = None if config.dtype == "auto" else config.dtype
    pipeline = load_pipeline(config.model, device=device, dtype=dtype, offload=config.offload,
                             transformer=config.transformer, compile=config.compile)
    scorer = None
    if config.score:
        from .scoring import ClipScorer

        scorer = ClipScorer(config.clip.model, config.clip.pretrained, device=device,
                            multilingual=config.clip.multilingual)
    return Worker(PipelineGenerator(pipeline), scorer)
