"""The Driver: the single writer of a run. It knows which jobs are ready, groups them into
micro-batches, loads the images they need, commits what comes back and releases dependants.

An executor only decides *where* a micro-batch runs (executors/base.py):

    while (batch := driver.next_batch(size)) is not None:   # or: keep N batches in flight
        driver.complete(batch, run_isolated(worker.run, batch))

The driver must live in the process that opened the store.
"""
from __future__ import annotations

import heapq
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ..errors import EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED
from ..jobs import Attempt, GenRequest, ImageRef, Job, JobResult
from ..progress import Progress
from ..store import FINAL, RunStore

log = logging.getLogger(__name__)

IMAGE_CACHE_SIZE = 32  # decoded input images kept between batches (edit campaigns reuse a few)
STOP_EXIT_CODES = {"SIGINT": EXIT_INTERRUPTED, "SIGTERM": EXIT_TERMINATED}


@dataclass
class MicroBatch:
    """Jobs that can share pipeline calls, every image they need (keyed by ImageRef.key), and
    the earlier attempts of jobs that resume their ladder (job id -> attempts)."""

    jobs: list[Job]
    images: dict[str, Any]  # ImageRef.key -> PIL.Image (RGB)
    earlier: dict[str, list[Attempt]] = field(default_factory=dict)


@dataclass
class RunSummary:
    """Where the plan stands after a run, and what this run did."""

    total: int  # jobs in the plan
    kept: int = 0
    rejected: int = 0
    failed: int = 0
    pending: int = 0  # not finished (interrupted, or stopped by an error)
    ran: int = 0  # jobs finished by this run (the rest were done before)
    redecided: int = 0  # finished jobs whose decision changed with the recipe's thresholds
    superseded: int = 0  # jobs of earlier recipes set aside by this run
    seconds: float = 0.0
    stopped_by: str = ""  # "SIGINT" or "SIGTERM" when a signal stopped the run early
    error: str = ""  # why the run stopped early, e.g. a full disk
    min_kept: int | None = None  # --min-kept: this many kept jobs make a success; None: every job
    failures: list[dict[str, str]] = field(default_factory=list)  # failed jobs: id, name, error

    @property
    def interrupted(self) -> bool:
        return bool(self.stopped_by)

    @property
    def exit_code(self) -> int:
        if self.stopped_by:
            return STOP_EXIT_CODES[self.stopped_by]
        enough = self.kept == self.total if self.min_kept is None else self.kept >= self.min_kept
        return EXIT_OK if enough and not self.error else EXIT_INCOMPLETE

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "interrupted": self.interrupted, "exit_code": self.exit_code}


def shape_key(job: Job, images: dict[str, Any]) -> tuple:
    """Jobs with equal keys can share a pipeline call: their GenRequest.batch_key, plus the
    kind (an edit and an in-context shot take different code paths)."""
    inputs = [images[ref.key] for ref in job.inputs]
    return (job.kind,) + GenRequest.for_job(job, inputs).batch_key()


def _coarse_key(job: Job) -> tuple:
    """shape_key before the input images are loaded: their number instead of their sizes."""
    return (job.kind, len(job.inputs)) + GenRequest.for_job(job, []).batch_key()


def needed_refs(job: Job) -> list[ImageRef]:
    refs = list(job.inputs) + list(job.scoring.references)
    if job.scoring.source is not None:
        refs.append(job.scoring.source)
    return refs


def failed_result(job: Job, exc: BaseException | str) -> JobResult:
    error = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return JobResult(job.id, "failed", error=error)


def run_isolated(run: Callable[..., list[JobResult]], batch: MicroBatch) -> list[JobResult]:
    """Run a micro-batch; if it raises, rerun its jobs one at a time so only the culprit fails."""
    try:
        return run(batch.jobs, batch.images, batch.earlier)
    except Exception as exc:
        log.debug("micro-batch of %d failed", len(batch.jobs), exc_info=True)
        if len(batch.jobs) == 1:
            return [failed_result(batch.jobs[0], exc)]
    results = []
    for job in batch.jobs:
        try:
            results += run([job], batch.images, batch.earlier)
        except Exception as exc:
            log.debug("job %s failed", job.id, exc_info=True)
            results.append(failed_result(job, exc))
    return results


class Driver:
    """DAG bookkeeping, micro-batching, image resolution, commits and progress for one run.

    `earlier`: job id -> attempts of a finished job that the current thresholds fail and whose
    ladder has budget left; such a job runs again and climbs on from where it stopped.
    """

    def __init__(self, plan_jobs: list[Job], store: RunStore, *, keep_attempts: bool = False,
                 progress: Progress | None = None,
                 earlier: dict[str, list[Attempt]] | None = None):
        self.store = store
        self.keep_attempts = keep_attempts
        self.jobs = {job.id: job for job in plan_jobs}
        self.order = {job_id: n for n, job_id in enumerate(self.jobs)}
        self.earlier = earlier or {}
        stored = store.statuses()
        self.status = {i: stored[i] if stored.get(i) in FINAL and i not in self.earlier
                       else "pending" for i in self.jobs}
        self.kept_outside = {i for i, s in stored.items() if s == "kept" and i not in self.jobs}
        self.dependants: dict[str, list[str]] = {}
        for job in self.jobs.values():
            for dep in job.depends_on:
                self.dependants.setdefault(dep, []).append(job.id)
        self.ready: dict[tuple, list[tuple[int, str]]] = {}  # coarse key -> heap of (order, id)
        self.ran = 0
        self.started = time.monotonic()
        self._errors: dict[str, str] = {}  # job id -> why it failed, for dependants' messages
        self._images: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._unfinished = sum(1 for state in self.status.values() if state == "pending")
        self.progress = progress or Progress(enabled=False)
        self.progress.start(plan_jobs, self.status)
        self._release_initial()

    # ------------------------------------------------------------------ the executor's view
    @property
    def unfinished(self) -> int:
        """Plan jobs not finished yet (ready, waiting on an anchor, or in flight)."""
        return self._unfinished

    def next_batch(self, size: int) -> MicroBatch | None:
        """Up to `size` ready jobs of one shape, oldest plan position first; None when nothing
        is ready (all done, or everything left waits on work in flight)."""
        while self.ready:
            key = min(self.ready, key=lambda k: self.ready[k][0])
            heap = self.ready[key]
            taken = [heapq.heappop(heap)[1] for _ in range(min(size, len(heap)))]
            if not heap:
                del self.ready[key]
            batch = self._assemble(taken)
            if batch.jobs:
                return batch
        return None

    def complete(self, batch: MicroBatch, results: list[JobResult]) -> None:
        """Commit a finished micro-batch and release (or fail) the jobs waiting on it."""
        by_id = {result.job_id: result for result in results}
        for job in batch.jobs:
            result = by_id.get(job.id) or failed_result(job, "the worker returned no result")
            self._finish(job, result)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("pending", "kept", "rejected", "failed"), 0)
        for state in self.status.values():
            counts[state] += 1
        return counts

    def summary(self, *, stopped_by: str = "", error: str = "") -> RunSummary:
        self.progress.close()
        failures = [{"id": i, "section": self.jobs[i].section, "name": self.jobs[i].name,
                     "error": self._errors.get(i, "")}
                    for i, s in self.status.items() if s == "failed"]
        return RunSummary(total=len(self.jobs), ran=self.ran,
                          seconds=round(time.monotonic() - self.started, 3),
                          stopped_by=stopped_by if self._unfinished else "", error=error,
                          failures=failures, **self.counts())

    # ------------------------------------------------------------------ internals
    def _release_initial(self) -> None:
        for job_id in self.jobs:
            if self.status[job_id] == "pending":
                blocker = self._blocker(job_id)
                if blocker:
                    self._finish(self.jobs[job_id], failed_result(self.jobs[job_id], blocker))
                elif self._deps_kept(job_id):
                    self._make_ready(job_id)

    def _blocker(self, job_id: str) -> str:
        """Why a job can never run in this plan ("" if it still can)."""
        for dep in self.jobs[job_id].depends_on:
            if dep in self.kept_outside:
                continue
            if dep not in self.jobs:
                return (f"needs the kept image of job {dep}, which is neither in this plan nor "
                        f"kept in {self.store.run_dir}")
            state = self.status[dep]
            if state in ("rejected", "failed"):
                anchor = self.jobs[dep]
                reason = self._errors.get(dep) or "its best attempt did not pass scoring"
                return (f"anchor {anchor.section}/{anchor.name} ({dep}) was {state}: {reason}; "
                        "fix the anchor (or its thresholds) and run again")
        return ""

    def _deps_kept(self, job_id: str) -> bool:
        return all(dep in self.kept_outside or self.status.get(dep) == "kept"
                   for dep in self.jobs[job_id].depends_on)

    def _make_ready(self, job_id: str) -> None:
        key = _coarse_key(self.jobs[job_id])
        heapq.heappush(self.ready.setdefault(key, []), (self.order[job_id], job_id))

    def _assemble(self, job_ids: list[str]) -> MicroBatch:
        """Load the images of the taken jobs; keep the jobs shaped like the first loadable one,
        put the others back, and fail the ones whose images cannot be loaded."""
        jobs: list[Job] = []
        images: dict[str, Any] = {}
        first_key = None
        for job_id in job_ids:
            job = self.jobs[job_id]
            try:
                own = {ref.key: self._image(ref, job.max_input_side) for ref in needed_refs(job)}
            except Exception as exc:
                self._finish(job, failed_result(job, exc))
                continue
            key = shape_key(job, own)
            if first_key is None:
                first_key = key
            if key != first_key:
                self._make_ready(job_id)
                continue
            jobs.append(job)
            images.update(own)
        earlier = {job.id: self.earlier[job.id] for job in jobs if job.id in self.earlier}
        return MicroBatch(jobs, images, earlier)

    def _image(self, ref: ImageRef, max_side: int):
        """An input as the model will use it: shrunk as it is read, so a huge file is never
        held (or cached) at full size."""
        cached = (ref.key, max_side)
        if cached in self._images:
            self._images.move_to_end(cached)
            return self._images[cached]
        if ref.job_id:
            image = self.store.kept_image(ref.job_id)
            if image is None:
                raise LookupError(f"job {ref.job_id} has no kept image in {self.store.run_dir}")
        else:
            from ..images import load_for_model  # EXIF, modes, bombs, errors

            image = load_for_model(ref.path, max_side)
        self._images[cached] = image
        if len(self._images) > IMAGE_CACHE_SIZE:
            self._images.popitem(last=False)
        return image

    def _finish(self, job: Job, result: JobResult) -> None:
        self.store.commit(job, result, keep_attempts=self.keep_attempts)
        self._unfinished -= self.status[job.id] == "pending"
        self.status[job.id] = result.status
        if result.error:
            self._errors[job.id] = result.error
        self.ran += 1
        self.progress.finished(job, result.status)
        for waiting in self.dependants.get(job.id, ()):
            if waiting not in self.jobs or self.status[waiting] != "pending":
                continue
            if result.status != "kept":
                self._finish(self.jobs[waiting], failed_result(self.jobs[waiting],
                                                               self._blocker(waiting)))
            elif self._deps_kept(waiting):
                self._make_ready(waiting)
