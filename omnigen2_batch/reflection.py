"""The reflection ladder: what to try after a failed attempt, and which attempt a job keeps.

A `JobLadder` is the decision state of one job. The worker asks it for the next round of
requests, generates and scores them (batched with other jobs), and hands the outputs back; the
ladder records each attempt and decides when the job is done. No model runs here.

Rules (the manifest records each decision):
- First round: `job.candidates` attempts (best-of-N; at least `job.variants`), seeds derived
  from job.seed (the first attempt uses job.seed itself).
- The job is kept at the first round with a passing attempt (the best passing one of that round).
- Otherwise the ladder steps run in order, one attempt per round, cycling until the budget
  (`job.max_attempts` generations, candidates included) is spent; then the job is *rejected* and
  keeps its best attempt for review.
- Which attempt is best, and whether the job is kept, follow rules.py.
- `ask_mllm` runs only when the generator's MLLM answers a critique; otherwise it is recorded as a
  skipped attempt (no image, not counted against the budget) and dropped from the job's ladder.
- Unscored runs (no scorer): one attempt, kept, with params["scored"] False and empty scores.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

from .jobs import Attempt, GenRequest, Job, JobResult
from .rules import LADDER_STEPS, best_of, decide, judge

if TYPE_CHECKING:
    from PIL.Image import Image

GUIDANCE_FACTOR = 1.5
TEXT_GUIDANCE_CAP = 8.0  # ceilings for the x1.5 raises (OmniGen2 defaults: 5.0 text, 2.0 image);
IMAGE_GUIDANCE_CAP = 3.0  # a job set above a ceiling keeps its own value
IMAGE_METRICS = ("consistency_mean", "consistency_min", "preservation")  # fixed by image guidance
CONSISTENCY_METRICS = ("consistency_mean", "consistency_min")
TEXT_METRICS = ("text", "clipscore")

Critique = Callable[["Image", str], "str | None"]


class MissingImageError(ValueError):
    """The worker was not given an image a job needs."""


def attempt_seed(job_seed: int, n: int) -> int:
    """Seed of attempt n: the job's own seed first, then a stable hash of (seed, n)."""
    if n == 0:
        return job_seed
    digest = hashlib.sha256(f"{job_seed}/{n}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def describe_failure(attempt: Attempt, thresholds: Mapping[str, float]) -> str:
    parts = []
    for metric in attempt.failed_metrics:
        value = attempt.scores.get(metric)
        shown = "missing" if value is None else f"{value:.4f}"
        parts.append(f"{metric}={shown} < {thresholds[metric]:g}")
    return f"attempt {attempt.n} failed " + ", ".join(parts)


@dataclass
class Planned:
    """An attempt the ladder wants generated."""

    n: int
    seed: int
    strategy: str
    reason: str
    params: dict
    request: GenRequest


@dataclass(eq=False)  # a state machine: identity, not value, equality
class JobLadder:
    job: Job
    images: Mapping[str, "Image"]
    scored: bool = True
    attempts: list[Attempt] = field(default_factory=list)
    status: str = "pending"
    best: int | None = None
    error: str = ""

    def __post_init__(self) -> None:
        self.steps = list(self.job.ladder or LADDER_STEPS)
        unknown = [s for s in self.steps if s not in LADDER_STEPS]
        if unknown:
            raise ValueError(f"job {self._label()}: unknown ladder step(s) {unknown}; "
                             f"use {list(LADDER_STEPS)}")
        # Look every image up now, so a missing one fails the job before any work is spent on it.
        self.inputs = [self._image(ref) for ref in self.job.inputs]
        self.references = [self._image(ref) for ref in self.job.scoring.references] if self.scored else []
        if self.scored and self.job.scoring.source is not None:
            self._image(self.job.scoring.source)
        self._cursor = 0  # position in the (cycling) ladder
        self._round: list[int] = []  # attempt indices of the latest round
        if self.attempts:
            self._resume()

    def _resume(self) -> None:
        """Climb on from recorded attempts (a finished job that the recipe's current thresholds
        fail): skip the steps already taken; the best attempt with an image is "the latest"."""
        for attempt in self.attempts:
            if attempt.params.get("skipped") and attempt.strategy in self.steps:
                self.steps.remove(attempt.strategy)
            elif attempt.strategy in LADDER_STEPS:
                self._cursor += 1
        self._round = [self._best_of(self._with_image())]

    @property
    def done(self) -> bool:
        return self.status != "pending"

    @property
    def thresholds(self) -> Mapping[str, float]:
        return self.job.scoring.thresholds

    def _label(self) -> str:
        return f"{self.job.section}/{self.job.name} ({self.job.id})"

    def _image(self, ref) -> "Image":
        if ref.key not in self.images:
            where = ref.path or f"the kept output of job {ref.job_id}"
            raise MissingImageError(
                f"job {self._label()}: image {ref.key} ({where}) was not given to the worker")
        return self.images[ref.key]

    def _with_image(self) -> list[int]:
        """Attempts whose image is at hand (a resumed job has only its best one's)."""
        return [i for i, a in enumerate(self.attempts) if a.image is not None]

    def _generated(self) -> list[int]:
        """Attempts that made an image (skipped ones did not), whether at hand or not."""
        return [i for i, a in enumerate(self.attempts) if not a.params.get("skipped")]

    def _best_of(self, indices: list[int]) -> int:
        return best_of(self.attempts, indices, self.thresholds)

    # -- planning ------------------------------------------------------------------------------
    def next_round(self, critique: Critique) -> list[Planned]:
        """The requests of this job's next round; [] (and the job done) when nothing is left."""
        if not self.attempts:
            return self._first_round()
        while self.steps and not self._budget_spent():
            strategy = self.steps[self._cursor % len(self.steps)]
            if strategy == "ask_mllm":
                answer = critique(self.attempts[self._best_of(self._with_image())].image, self.job.prompt)
                if not answer or not answer.strip():
                    self._skip(strategy, "the MLLM gave no critique (a tiny random MLLM, "
                                         "or it saw nothing to fix)")
                    continue
                self._cursor += 1
                return [self._edit_best(strategy, answer.strip())]
            self._cursor += 1
            return [getattr(self, "_" + strategy)()]
        self.status, self.best = decide(self.attempts, self.thresholds)  # ladder used up: rejected
        return []

    def _first_round(self) -> list[Planned]:
        # variants: N needs N candidates to rank, from the first round
        wanted = max(self.job.candidates, self.job.variants)
        count = max(1, min(wanted, self.job.max_attempts)) if self.scored else 1
        planned = []
        for n in range(count):
            strategy, reason = ("initial", "first attempt") if n == 0 else (
                "candidate", f"best-of-{count} candidate {n + 1}")
            planned.append(self._plan(n, strategy, reason, {}, self.inputs))
        return planned

    def _plan(self, n: int, strategy: str, reason: str, extra: dict, images: list, **overrides) -> Planned:
        seed = attempt_seed(self.job.seed, n)
        request = GenRequest.for_job(self.job, images, seed=seed, **overrides)
        params = {"prompt": request.prompt, "text_guidance": request.text_guidance,
                  "image_guidance": request.image_guidance, "steps": request.steps,
                  "width": request.width, "height": request.height, "cfg_range": list(request.cfg_range),
                  "scheduler": request.scheduler, "n_images": len(images), "scored": self.scored,
                  **request.model_options(), **extra}
        return Planned(n, seed, strategy, reason, params, request)

    def _previous(self) -> Attempt:
        """The attempt whose failure motivates the next step: the best of the latest round."""
        return self.attempts[self._best_of(self._round)]

    def _new_seed(self) -> Planned:
        prev = self._previous()
        reason = describe_failure(prev, self.thresholds)
        return self._plan(len(self.attempts), "new_seed", reason, {}, self.inputs)

    def _stronger_guidance(self) -> Planned:
        prev = self._previous()
        used = [self.attempts[i].params for i in self._generated()]
        image_side = bool(self.inputs) and any(m in IMAGE_METRICS for m in prev.failed_metrics)
        text_side = not image_side or any(m not in IMAGE_METRICS for m in prev.failed_metrics)
        overrides = {}
        if text_side:  # compound over earlier raises, capped
            top = max([p["text_guidance"] for p in used] + [self.job.text_guidance])
            cap = max(TEXT_GUIDANCE_CAP, self.job.text_guidance)
            overrides["text_guidance"] = min(top * GUIDANCE_FACTOR, cap)
        if image_side:
            top = max([p["image_guidance"] for p in used] + [self.job.image_guidance])
            cap = max(IMAGE_GUIDANCE_CAP, self.job.image_guidance)
            overrides["image_guidance"] = min(top * GUIDANCE_FACTOR, cap)
        return self._plan(len(self.attempts), "stronger_guidance", describe_failure(prev, self.thresholds),
                          {}, self.inputs, **overrides)

    def _refine(self) -> Planned:
        failed = set(self._previous().failed_metrics)
        source = self._source()
        if "preservation" in failed and source is not None:
            # The best output drifted from the input: edit the input again, more conservatively.
            instruction = f"keep everything from the input image except this change: {self.job.prompt}"
            return self._edit("refine", instruction, [source], {"base": "source"})
        parts = []
        if failed & set(CONSISTENCY_METRICS):
            parts.append("keep the scene; make the character match the reference's face and hair")
        if failed & set(TEXT_METRICS) or not parts and "direction" not in failed:
            parts.append(f"keep the composition; make it show: {self.job.scoring.text or self.job.prompt}")
        if "direction" in failed:
            parts.append(f"keep the composition; make it look like: {self.job.scoring.target_caption}")
        refs = self.references if failed & set(CONSISTENCY_METRICS) else []
        return self._edit_best("refine", "; ".join(parts), refs)

    def _edit_best(self, strategy: str, instruction: str, extra_images: list = ()) -> Planned:
        best = self._best_of(self._with_image())
        return self._edit(strategy, instruction, [self.attempts[best].image, *extra_images], {"base": best})

    def _edit(self, strategy: str, instruction: str, images: list, extra: dict) -> Planned:
        reason = describe_failure(self._previous(), self.thresholds)
        return self._plan(len(self.attempts), strategy, reason, extra, images, prompt=instruction)

    def _source(self) -> "Image | None":
        source = self.job.edit_source
        return None if source is None else self.images[source.key]

    # -- recording -----------------------------------------------------------------------------
    def _skip(self, strategy: str, why: str) -> None:
        n = len(self.attempts)
        self.attempts.append(Attempt(n, attempt_seed(self.job.seed, n), strategy,
                                     describe_failure(self._previous(), self.thresholds),
                                     params={"skipped": True, "why": why, "scored": self.scored}))
        self.steps.remove(strategy)

    def record_round(self, outputs: list[tuple[Planned, "Image", dict, float]]) -> None:
        """Record a round's (planned, image, scores, seconds) and decide whether the job is done."""
        self._round = []
        for planned, image, scores, seconds in outputs:
            passed, failed = judge(scores, self.thresholds) if self.scored else (False, ())
            self._round.append(len(self.attempts))
            self.attempts.append(Attempt(planned.n, planned.seed, planned.strategy, planned.reason,
                                         planned.params, dict(scores), passed, failed, seconds, image))
        if not self.scored:
            self.status, self.best = "kept", self._round[0]
        elif any(self.attempts[i].passed for i in self._round) or self._budget_spent():
            # Passing attempts only ever occur in the last round: the job stops at the first one.
            self.status, self.best = decide(self.attempts, self.thresholds)

    def _budget_spent(self) -> bool:
        return len(self._generated()) >= self.job.max_attempts

    def fail(self, error: str) -> None:
        self.status, self.best, self.error = "failed", None, error

    def result(self) -> JobResult:
        return JobResult(self.job.id, self.status, self.attempts, self.best, self.error)
