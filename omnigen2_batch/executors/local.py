"""The in-process executor: one worker (pipeline + scorer) on one device, micro-batches in turn."""
from __future__ import annotations

import threading
from typing import Any

from ..jobs import Job
from ..store import RunStore, StoreError
from .common import Driver, RunSummary, run_isolated


def run_local(plan_jobs: list[Job], store: RunStore, settings: Any, *, batch_size: int = 4,
              keep_attempts: bool = False, progress: bool = True,
              stop: threading.Event | None = None, worker: Any = None) -> RunSummary:
    """Run every unfinished job of the plan and commit each micro-batch as it lands.

    `settings` is a worker.WorkerSettings; `worker` a ready-built Worker to use instead (the
    engine benchmark passes one whose generator is instant). `stop` (set by a signal handler)
    ends the run after the batch in flight is committed. A store error (a full disk) ends it
    too, with the reason in the summary; everything committed before stays valid.
    """
    stop = stop or threading.Event()
    driver = Driver(plan_jobs, store, keep_attempts=keep_attempts, progress=progress)
    if not driver.ready:
        return driver.summary()  # nothing to do: do not pay for loading the model
    if worker is None:
        from ..model import ModelLoadError
        from ..scoring import ScorerError
        from ..worker import build_worker

        try:
            worker = build_worker(settings)
        except (ModelLoadError, ScorerError) as exc:  # nothing ran: every job stays pending
            return driver.summary(error=f"the worker failed to start: {exc}")
    try:
        while not stop.is_set():
            batch = driver.next_batch(batch_size)
            if batch is None:
                break
            driver.complete(batch, run_isolated(worker.run, batch))
    except StoreError as exc:
        return driver.summary(error=str(exc))
    return driver.summary(interrupted=stop.is_set() and driver.unfinished > 0)
