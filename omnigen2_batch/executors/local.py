"""The in-process executor: one worker (pipeline + scorer) on one device, micro-batches in turn.

Each batch runs in a helper thread while this (the main) thread waits, so that a SIGTERM can
end the run at once: everything finished is already committed, and the abandoned batch is
simply redone on resume.
"""
from __future__ import annotations

import threading
from typing import Any

from ..config import RunConfig
from .base import Executor, Stop
from .driver import Driver, MicroBatch, run_isolated

POLL = 0.1  # seconds between looks at the stop request while a batch runs


class LocalExecutor(Executor):
    def __init__(self, config: RunConfig, worker: Any = None):
        """`worker`: a ready-built Worker to use instead of loading one (benchmarks)."""
        super().__init__(config)
        self.worker = worker

    def run(self, driver: Driver, stop: threading.Event) -> None:
        if not driver.ready:
            return  # nothing to do: do not pay for loading the model
        if self.worker is None:
            from ..worker import build_worker

            self.worker = build_worker(self.config)
        while not stop.is_set():
            batch = driver.next_batch(self.config.batch_size)
            if batch is None:
                return
            results = self._run(batch, stop)
            if results is None:
                return  # abandoned on SIGTERM; not committed, so it runs again on resume
            driver.complete(batch, results)

    def _run(self, batch: MicroBatch, stop: threading.Event) -> list | None:
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["results"] = run_isolated(self.worker.run, batch)
            except BaseException as exc:  # handed to the main thread, which raises it
                outcome["error"] = exc

        thread = threading.Thread(target=work, daemon=True, name="batch")
        thread.start()
        while thread.is_alive():
            thread.join(POLL)
            if isinstance(stop, Stop) and stop.abandon:
                return None
        if "error" in outcome:
            raise outcome["error"]
        return outcome["results"]
