"""What every executor shares: which jobs are ready, how they are grouped into micro-batches,
which images they need, and how results land in the store.

An executor only decides *where* a micro-batch runs. The local one calls the worker in-process;
the Ray one ships the same MicroBatch to an actor. Both loop the same way:

    driver = Driver(plan_jobs, store, ...)
    while (batch := driver.next_batch(size)) is not None:   # or: keep N batches in flight
        driver.complete(batch, run_isolated(worker.run, batch))
    return driver.summary()

The driver is the single writer of the store, so it must live in the process that opened it.
"""
from __future__ import annotations

import heapq
import logging
import signal
import sys
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..jobs import GenRequest, ImageRef, Job, JobResult
from ..store import FINAL, RunStore

log = logging.getLogger(__name__)

IMAGE_CACHE_SIZE = 32  # decoded input images kept between batches (edit campaigns reuse a few)


@dataclass
class MicroBatch:
    """Jobs that can share pipeline calls, and every image they need, keyed by ImageRef.key."""

    jobs: list[Job]
    images: dict[str, Any]  # ImageRef.key -> PIL.Image (RGB)


@dataclass
class RunSummary:
    """Where the plan stands after a run, and what this run did."""

    total: int  # jobs in the plan
    kept: int = 0
    rejected: int = 0
    failed: int = 0
    pending: int = 0  # not finished (interrupted, or stopped by an error)
    ran: int = 0  # jobs finished by this run (the rest were done before)
    seconds: float = 0.0
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM before the plan was done
    error: str = ""  # why the run stopped early, e.g. a full disk
    failures: list[dict[str, str]] = field(default_factory=list)  # failed jobs: id, name, error

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if self.kept == self.total and not self.error else 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exit_code": self.exit_code}


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


def run_isolated(run: Callable[[list[Job], dict[str, Any]], list[JobResult]],
                 batch: MicroBatch) -> list[JobResult]:
    """Run a micro-batch; if it raises, rerun its jobs one at a time so only the culprit fails."""
    try:
        return run(batch.jobs, batch.images)
    except Exception as exc:
        log.debug("micro-batch of %d failed", len(batch.jobs), exc_info=True)
        if len(batch.jobs) == 1:
            return [failed_result(batch.jobs[0], exc)]
    results = []
    for job in batch.jobs:
        try:
            results += run([job], batch.images)
        except Exception as exc:
            log.debug("job %s failed", job.id, exc_info=True)
            results.append(failed_result(job, exc))
    return results


class Driver:
    """DAG bookkeeping, micro-batching, image resolution, commits and progress for one run."""

    def __init__(self, plan_jobs: list[Job], store: RunStore, *, keep_attempts: bool = False,
                 progress: bool = False):
        self.store = store
        self.keep_attempts = keep_attempts
        self.jobs = {job.id: job for job in plan_jobs}
        self.order = {job_id: n for n, job_id in enumerate(self.jobs)}
        stored = store.statuses()
        self.status = {i: stored[i] if stored.get(i) in FINAL else "pending" for i in self.jobs}
        self.kept_outside = {i for i, s in stored.items() if s == "kept" and i not in self.jobs}
        self.dependants: dict[str, list[str]] = {}
        for job in self.jobs.values():
            for dep in job.depends_on:
                self.dependants.setdefault(dep, []).append(job.id)
        self.ready: dict[tuple, list[tuple[int, str]]] = {}  # coarse key -> heap of (order, id)
        self.ran = 0
        self.started = time.monotonic()
        self._errors: dict[str, str] = {}  # job id -> why it failed, for dependants' messages
        self._tally: dict[str, int] = {}  # this run's outcomes, for the progress bar
        self.note: Callable[[], str] | None = None  # extra progress text (Ray: per-worker rates)
        self._images: OrderedDict[str, Any] = OrderedDict()
        self._unfinished = sum(1 for state in self.status.values() if state == "pending")
        self._bar = _progress_bar(len(self.jobs), len(self.jobs) - self._unfinished, progress)
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

    def summary(self, *, interrupted: bool = False, error: str = "") -> RunSummary:
        self._bar.close()
        counts = self.counts()
        failures = [{"id": i, "section": self.jobs[i].section, "name": self.jobs[i].name,
                     "error": self._errors.get(i, "")}
                    for i, s in self.status.items() if s == "failed"]
        return RunSummary(total=len(self.jobs), ran=self.ran,
                          seconds=round(time.monotonic() - self.started, 3),
                          interrupted=interrupted, error=error, failures=failures, **counts)

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
                own = {ref.key: self._image(ref) for ref in needed_refs(job)}
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
        return MicroBatch(jobs, images)

    def _image(self, ref: ImageRef):
        if ref.key in self._images:
            self._images.move_to_end(ref.key)
            return self._images[ref.key]
        if ref.job_id:
            image = self.store.kept_image(ref.job_id)
            if image is None:
                raise LookupError(f"job {ref.job_id} has no kept image in {self.store.run_dir}")
        else:
            from ..images import load_rgb  # the recipe helper's loader: EXIF, modes, errors
            image = load_rgb(ref.path)
        self._images[ref.key] = image
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
        self._tally[result.status] = self._tally.get(result.status, 0) + 1
        tally = " ".join(f"{k} {v}" for k, v in sorted(self._tally.items()))
        self._bar.set_postfix_str(f"{tally} | {self.note()}" if self.note else tally, refresh=False)
        self._bar.update(1)
        for waiting in self.dependants.get(job.id, ()):
            if waiting not in self.jobs or self.status[waiting] != "pending":
                continue
            if result.status != "kept":
                self._finish(self.jobs[waiting], failed_result(self.jobs[waiting],
                                                               self._blocker(waiting)))
            elif self._deps_kept(waiting):
                self._make_ready(waiting)


def _progress_bar(total: int, done: int, enabled: bool):
    """jobs done/total with an ETA on stderr; a silent stand-in when off or not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="job", file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()), desc="jobs")


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[threading.Event]:
    """SIGINT/SIGTERM: finish and commit the batch in flight, then stop; a second one aborts
    at once (the store's write order keeps the manifest consistent either way)."""

    def handle(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after the batch in flight (press Ctrl-C again to abort now)",
              file=sys.stderr)

    if threading.current_thread() is not threading.main_thread():
        yield stop  # only the main thread may handle signals; the caller sets `stop` itself
        return
    caught = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, handle) for signum in caught}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def worker_settings(plan_settings: Any, *, device: str | None = None, score: bool = True):
    """The WorkerSettings of a plan's run settings; `score=False` turns scoring off even where
    the recipe has it on. The device defaults to CUDA when there is one."""
    from ..worker import WorkerSettings

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return WorkerSettings(model=plan_settings.model, device=device,
                          clip_model=plan_settings.clip_model,
                          clip_pretrained=plan_settings.clip_pretrained,
                          multilingual=plan_settings.multilingual,
                          score=plan_settings.score and score)


def execute(plan: Any, recipe_text: str, run_dir: str | Path, settings: Any, *,
            executor: str = "local", batch_size: int = 4, keep_attempts: bool = False,
            progress: bool = True, executor_options: dict[str, Any] | None = None) -> RunSummary:
    """Run a plan into RUN_DIR: record the recipe and the jobs, run what is unfinished on the
    chosen executor (Ctrl-C stops after the batch in flight), then refresh the report.

    `settings` is a worker.WorkerSettings; `executor_options` go to the executor (Ray: its
    RayOptions fields). Raises store.RunLocked when another process writes to RUN_DIR.
    """
    with RunStore.open(run_dir) as store:
        store.save_recipe(recipe_text)
        store.set_meta("recipe_name", plan.settings.name)
        store.set_meta("model", settings.model)
        store.set_meta("settings", {**asdict(settings), "executor": executor,
                                    "batch_size": batch_size, "keep_attempts": keep_attempts})
        store.add_jobs(plan.jobs)
        run = _executor(executor, executor_options or {})
        with stop_on_signals(threading.Event()) as stop:
            summary = run(plan.jobs, store, settings, batch_size=batch_size,
                          keep_attempts=keep_attempts, progress=progress, stop=stop)
        if summary.ran and settings.score and any(job.scoring.pair for job in plan.jobs):
            _record_bilingual_parity(store, settings)
    report = Path(run_dir) / "report.html"
    if summary.ran or not report.exists():  # a rerun with nothing to do leaves the dir as it was
        _write_report(run_dir)
    return summary


def _executor(name: str, options: dict[str, Any]) -> Callable[..., RunSummary]:
    """The executor's run function; each has run_local's signature."""
    if name == "ray":
        from .ray import RayOptions, run_ray

        ray_options = RayOptions(**options)
        return lambda *args, **kwargs: run_ray(*args, options=ray_options, **kwargs)
    from .local import run_local

    return run_local


def _record_bilingual_parity(store: RunStore, settings: Any) -> None:
    """EN vs ZH similarity and text-score gap per pair: it compares two jobs' outputs, which
    may have run on different workers, so the driver does it once at the end, on the CPU."""
    from ..scoring import ClipScorer, record_pairs

    record_pairs(store, ClipScorer(settings.clip_model, settings.clip_pretrained,
                                   multilingual=settings.multilingual))


def _write_report(run_dir: str | Path) -> None:
    """A broken report never costs the run its images: its failure is logged and the run's
    outcome stands."""
    from ..report import write_report

    try:
        write_report(run_dir)
    except Exception as exc:
        log.error("writing the report failed (%s); run `omnigen2-batch report %s` to retry",
                  exc, run_dir, exc_info=log.isEnabledFor(logging.DEBUG))
