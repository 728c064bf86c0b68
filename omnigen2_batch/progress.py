"""Progress of a run on stderr: a live bar on a terminal, plain lines anywhere else.

On a terminal, tqdm draws jobs done/total with an ETA and this run's outcomes per section. In a
CI log or a cluster job's output file a bar is noise, so there a plain line is printed at least
every `interval` seconds (also while one long batch runs) and when a section finishes.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from typing import Callable, Iterable, Mapping, TextIO

PLAIN_INTERVAL = 30.0  # seconds between plain progress lines


class Progress:
    def __init__(self, enabled: bool = True, stream: TextIO | None = None,
                 interval: float = PLAIN_INTERVAL, live: bool | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.interval = interval
        self.note: Callable[[], str] | None = None  # extra text (Ray: per-worker rates)
        self.total = self.done = 0
        self.outcomes: Counter[str] = Counter()  # this run's
        self.left: Counter[str] = Counter()  # section -> unfinished jobs
        self.section_outcomes: dict[str, Counter[str]] = {}
        self._bar = None
        self._ticker: threading.Thread | None = None
        self._closed = threading.Event()
        self._started = time.monotonic()

    def start(self, jobs: Iterable, status: Mapping[str, str]) -> None:
        jobs = list(jobs)
        self.total = len(jobs)
        for job in jobs:
            if status[job.id] == "pending":
                self.left[job.section] += 1
        self.done = self.total - sum(self.left.values())
        if not self.enabled or not self.left:
            return
        if self.live:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, unit="job", file=self.stream,
                             dynamic_ncols=True, desc="jobs")
        else:
            self._line(f"{sum(self.left.values())} of {self.total} jobs to run")
            self._ticker = threading.Thread(target=self._tick, daemon=True, name="progress")
            self._ticker.start()

    def finished(self, job, status: str) -> None:
        self.done += 1
        self.outcomes[status] += 1
        self.section_outcomes.setdefault(job.section, Counter())[status] += 1
        self.left[job.section] -= 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self._tally(), refresh=False)
            self._bar.update(1)
        elif self.left[job.section] == 0:
            outcomes = self.section_outcomes[job.section]
            self._line(f"section {job.section} done: " + _counts(outcomes))

    def close(self) -> None:
        self._closed.set()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _tick(self) -> None:
        while not self._closed.wait(self.interval):
            self._line(self._status())

    def _status(self) -> str:
        elapsed = time.monotonic() - self._started
        ran = sum(self.outcomes.values())
        left = self.total - self.done
        eta = f", ETA {_duration(elapsed / ran * left)}" if ran and left else ""
        return f"{self.done}/{self.total} jobs ({self._tally() or 'none finished yet'}){eta}"

    def _tally(self) -> str:
        text = _counts(self.outcomes)
        note = self.note() if self.note else ""
        return f"{text} | {note}" if text and note else text or note

    def _line(self, text: str) -> None:
        print(f"progress: {text}", file=self.stream, flush=True)


def _counts(counter: Counter) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(counter.items()) if n)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
