"""The Executor interface: where micro-batches run. What runs, and every write, stays with
the Driver (driver.py); an executor only moves batches to workers and results back."""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod

from ..config import RunConfig
from .driver import Driver


class Executor(ABC):
    def __init__(self, config: RunConfig):
        self.config = config

    @abstractmethod
    def run(self, driver: Driver, stop: threading.Event) -> None:
        """Feed the driver's ready work to the workers until every job is finished or `stop`
        is set. Raises UnavailableError when no worker can start (nothing ran then)."""


class Stop(threading.Event):
    """Set by a signal handler (SIGINT): finish and commit the work in flight, then stop.
    `signal` says which signal stopped the run ("SIGTERM" when errors.Terminated did)."""

    signal: str = ""
