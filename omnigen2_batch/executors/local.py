"""The in-process executor: one worker (pipeline + scorer) on one device, micro-batches in turn.
(SIGTERM interrupts a batch from its signal handler: see errors.Terminated.)"""
from __future__ import annotations

import threading
from typing import Any

from ..config import RunConfig
from .base import Executor
from .driver import Driver, run_isolated


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
            driver.complete(batch, run_isolated(self.worker.run, batch))
