"""The run as the report sees it: manifest rows read through the store, decoded into views.

Read-only and lock-free, so it also works while a run writes. Superseded jobs (ones the current
recipe no longer plans) are dropped here, once, so no count, gallery, pair or plot can show them.
"""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..config import TOY_MODEL
from ..jobs import Job
from ..store import RunStore, StoreError, is_tiny
from ..store.variants import ranking_of
from .files import ReportError

SUPERSEDED = "superseded"  # status of work set aside because the recipe changed


@dataclass
class JobView:
    """A manifest row with its decoded job, its attempts and the attempt its image came from."""

    row: dict[str, Any]
    job: Job
    attempts: list[dict[str, Any]]
    best: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return self.row["id"]

    @property
    def status(self) -> str:
        return self.row["status"]

    @property
    def scores(self) -> dict[str, float]:
        return (self.best or {}).get("scores") or {}

    @property
    def variants(self) -> list[dict[str, Any]]:
        """The ranked images of a job that keeps several (rank 1 is its image); [] otherwise."""
        return ranking_of(self.row.get("variants")) if self.status == "kept" else []


@dataclass
class Run:
    root: Path
    meta: dict[str, str]
    jobs: list[JobView]
    pairs: list[dict[str, Any]]
    by_id: dict[str, JobView] = field(init=False)

    def __post_init__(self) -> None:
        self.by_id = {view.id: view for view in self.jobs}

    def sections(self) -> dict[str, list[JobView]]:
        """Section name -> its jobs, sections in plan order."""
        groups: dict[str, list[JobView]] = {}
        for view in self.jobs:
            groups.setdefault(view.row["section"], []).append(view)
        return groups

    @property
    def model(self) -> str:
        return self.meta.get("model") or next((v.job.model for v in self.jobs), "")

    @property
    def tiny(self) -> bool:
        """Made (at least partly) by the random-weight model: every view of it must say so."""
        return is_tiny(self.model) or any(is_tiny(v.job.model) for v in self.jobs)

    @property
    def toy(self) -> bool:
        """Made (at least partly) by the shipped toy-world model: the page says what that is."""
        return self.model == TOY_MODEL or any(v.job.model == TOY_MODEL for v in self.jobs)


@contextmanager
def _manifest_errors(run_dir: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as err:  # e.g. no room for its shared-memory file, a damaged file
        raise ReportError(f"cannot read the manifest of {run_dir}: {err}") from err


def load_run(run_dir: Path) -> Run:
    try:
        store = RunStore.open(run_dir, readonly=True)
    except StoreError as err:
        raise ReportError(str(err)) from err
    with store, _manifest_errors(run_dir):
        views = [JobView(row, Job.from_dict(row["job"]), store.attempts(row["id"]))
                 for row in store.jobs() if row["status"] != SUPERSEDED]
        live = {view.id for view in views}
        # a pair row measured against a job since superseded describes images no longer shown
        pairs = [row for row in store.pairs() if row["en_job"] in live and row["zh_job"] in live]
        run = Run(store.run_dir, store.meta(), views, pairs)
    for view in views:
        view.best = next((a for a in view.attempts if a["n"] == view.row["best"]), None)
    return run
