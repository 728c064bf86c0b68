"""execute(plan, config, out): the one entry point of a run.

In order: claim the run directory for this recipe, record the recipe, its config and its
jobs; set aside the work of jobs the recipe no longer has; re-decide finished jobs with the
recipe's current thresholds; run what is unfinished on the configured executor; compare the
bilingual pairs; bring the report up to date. Every step is idempotent, so a rerun (after an
edit, a crash or a signal) continues where the directory stands.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .config import RunConfig
from .executors import executor_for
from .executors.base import Executor, Stop
from .executors.driver import RunSummary
from .errors import Terminated
from .plan import Plan
from .progress import Progress
from .rescore import finished_pairs, record_pairs, redecide
from .store import RunStore, StoreError, UnsafePath

log = logging.getLogger(__name__)

LOG_FILE = "run.log"  # in the run directory: the debug log, with every traceback


def execute(plan: Plan, config: RunConfig, out: str | Path, *, recipe_text: str,
            recipe_origin: str = "", progress: Progress | None = None, min_kept: int | None = None,
            executor: Executor | None = None) -> RunSummary:
    """Run `plan` into the run directory `out` (see the module docstring).

    Raises UserError for a directory that is not this recipe's (or is in use) and
    UnavailableError when no worker can start; a job's failure is recorded, not raised.
    """
    with RunStore.open(out, recipe_name=plan.name, recipe_origin=recipe_origin) as store, \
            _debug_log(store.run_dir), stop_on_signals() as stop:
        store.save_recipe(recipe_text)
        store.set_meta("model", config.model)
        store.set_meta("config", config.to_dict())
        superseded = store.supersede(job.id for job in plan.jobs)
        store.add_jobs(plan.jobs)
        store.update_scoring(plan.jobs)
        _reopen_changed_files(store)
        redecided, earlier = redecide(store, plan.jobs)
        summary = run_jobs(plan.jobs, store, config, progress=progress, earlier=earlier,
                           executor=executor, stop=stop)
        summary.superseded, summary.redecided, summary.min_kept = superseded, redecided, min_kept
        if summary.stopped_by == "SIGTERM":
            return summary  # a scheduler's grace period is short: the next run does the rest
        if config.score:
            _compare_pairs(store, plan, config)
        _refresh_report(store)
    return summary


def _reopen_changed_files(store: RunStore) -> None:
    """A kept or rejected image deleted or replaced by hand is made again; a replaced one is
    moved aside under modified/ first (never written into, never deleted)."""
    problems = store.verify_files()
    moved = store.reopen(p.job_id for p in problems)
    for problem in problems:
        log.warning("%s was %s since it was made; its job runs again", problem.path, problem.problem)
    for path in moved:
        log.warning("the file found there was moved to %s", path)


def run_jobs(jobs: list, store: RunStore, config: RunConfig, *, progress: Progress | None = None,
             earlier: dict | None = None, executor: Executor | None = None,
             stop: Stop | None = None) -> RunSummary:
    """Drive the unfinished jobs to the end (or until `stop`) on the configured executor."""
    from .executors.driver import Driver

    driver = Driver(jobs, store, keep_attempts=config.keep_attempts, progress=progress,
                    earlier=earlier)
    executor = executor or executor_for(config)
    stop = stop or Stop()
    error = ""
    try:
        executor.run(driver, stop)
    except StoreError as exc:  # e.g. the disk filled up: what is committed stays valid
        error = str(exc)
    except Terminated:  # the batch in flight is dropped; it runs again on resume
        stop.signal = "SIGTERM"
    return driver.summary(stopped_by=stop.signal, error=error)


def _compare_pairs(store: RunStore, plan: Plan, config: RunConfig) -> None:
    """EN vs ZH parity compares two jobs' outputs, which may come from different workers, so
    it runs here, once, on the CPU; only when a pair's jobs changed since it was last done."""
    pairs = finished_pairs(store.finished(job.id for job in plan.jobs if job.scoring.pair))
    recorded = {(p["pair"], p["en_job"], p["zh_job"]) for p in store.pairs()}
    if {(pair, en.job.id, zh.job.id) for pair, en, zh in pairs} == recorded:
        return
    from .scoring import ClipScorer

    clip = config.clip
    record_pairs(store, ClipScorer(clip.model, clip.pretrained, multilingual=clip.multilingual),
                 pairs)


def _refresh_report(store: RunStore) -> None:
    """Rewrite the report unless it already shows the manifest as it is: a run killed after
    its last commit left it stale, and an unchanged rerun should touch nothing. A broken
    report never costs the run its images: its failure is logged, `report` retries it."""
    from .report import write_report

    # The page shows the outcomes and the recipe (its thresholds, names): either may change.
    state = f"{store.state_digest()}:{store.get_meta('recipe_sha256')}"
    if store.get_meta("report_state") == state and (store.run_dir / "report.html").is_file():
        return
    try:
        write_report(store.run_dir)
    except Exception as exc:
        log.debug("writing the report failed", exc_info=True)
        log.error("writing the report failed (%s); run `omnigen2-batch report %s` to retry",
                  exc, store.run_dir)
        return
    store.set_meta("report_state", state)


@contextmanager
def stop_on_signals() -> Iterator[Stop]:
    """SIGINT: finish and commit the work in flight, then stop (a second one aborts at once).
    SIGTERM: stop at once (errors.Terminated is raised into whatever runs); finished work is
    committed already, the batch in flight is dropped and redone on resume. Off the main thread
    signals cannot be handled: the caller sets the Stop itself."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame: Any) -> None:
        if signum == signal.SIGTERM:
            raise Terminated("terminated (SIGTERM); committed work is kept: run again to continue")
        if stop.is_set():
            raise KeyboardInterrupt
        stop.signal = "SIGINT"
        stop.set()
        print("\nstopping after the batch in flight (press Ctrl-C again to abort now)",
              file=sys.stderr, flush=True)

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def _debug_log(run_dir: Path) -> Iterator[None]:
    """Everything down to DEBUG, tracebacks included, goes to RUN_DIR/run.log; the terminal
    only sees the messages."""
    try:  # never through a link: a planted run.log must not send writes outside the run dir
        fd = os.open(run_dir / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                     0o644)
    except OSError as exc:
        raise UnsafePath(f"cannot write {run_dir / LOG_FILE}: {exc.strerror or exc}; it must be "
                         "a plain file of this run directory") from None
    handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("omnigen2_batch")
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        handler.stream.close()
