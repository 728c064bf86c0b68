"""Keeping a run directory true to the current recipe: superseded work set aside, decisions that
follow the recipe's thresholds, and files checked against what the manifest says they are.

Every method here moves or writes files first and commits manifest rows after, like commit; a
crash in between leaves files the next call finds where it would have put them (moves are
idempotent), and a file the store did not write is set aside under modified/, never deleted.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

from PIL import Image

from ..jobs import Attempt, Job
from .core import FINAL, SUPERSEDED, StoreCore, _job_columns
from .errors import StoreError
from .files import FileRecord, sha256
from .png import encode_png
from .variants import ranking_of

ASIDE = "superseded/"  # superseded/kept/..., superseded/rejected/..., superseded/attempts/<id>


@dataclass(frozen=True)
class StoredAttempt:
    """One attempt as the manifest recorded it; `image` is its own file (keep_attempts) or None."""

    n: int
    seed: int
    strategy: str
    reason: str
    params: dict[str, Any]
    scores: dict[str, float]
    passed: bool
    failed_metrics: tuple[str, ...]
    seconds: float
    image: str | None

    def to_attempt(self, image: Any = None) -> Attempt:
        return Attempt(self.n, self.seed, self.strategy, self.reason, dict(self.params),
                       dict(self.scores), self.passed, self.failed_metrics, self.seconds, image)


@dataclass(frozen=True)
class StoredResult:
    """A finished (kept or rejected) job: its attempts, and which one (`best`, an attempt n)
    made the image at `image` (relative to the run dir)."""

    job: Job
    status: str
    best: int | None
    image: str | None
    attempts: tuple[StoredAttempt, ...]

    def attempt(self, n: int) -> StoredAttempt | None:
        return next((a for a in self.attempts if a.n == n), None)


@dataclass(frozen=True)
class FileProblem:
    """A kept or rejected image that is not what the manifest says: "missing" or "replaced"."""

    job_id: str
    path: str
    problem: str


class RunStore(StoreCore):
    """One run directory (see StoreCore for opening, recording and reading)."""

    # ------------------------------------------------------------------------- superseded work
    def supersede(self, plan_ids: Iterable[str]) -> int:
        """Set aside every job the manifest knows that `plan_ids` (the current plan) does not
        hold: status "superseded" (the old one kept in prev_status), its image moved to
        superseded/<kept|rejected>/..., its attempt images to superseded/attempts/<id>, its
        pairs rows removed. A superseded job back in the plan is restored: files moved back,
        old status again. Returns how many jobs were newly superseded."""
        plan = set(plan_ids)
        rows = self._conn.execute("SELECT id, status, image, variants FROM jobs").fetchall()
        gone = [(i, img, v) for i, status, img, v in rows if i not in plan and status != SUPERSEDED]
        back = [(i, img, v) for i, status, img, v in rows if i in plan and status == SUPERSEDED]
        if not gone and not back:
            return 0
        folders: set[str] = set()
        for job_id, image, variants in gone:
            self._move_job_files(job_id, image, variants, True, folders)
        for job_id, image, variants in back:
            self._move_job_files(job_id, image, variants, False, folders)
        self._files.sync(folders)
        self._files.remove_empty_folders({f for f in folders if f.startswith(ASIDE)})
        with self._transaction():
            self._conn.executemany(
                "UPDATE jobs SET prev_status=status, status=?, image=?, variants=? WHERE id=?",
                [(SUPERSEDED, _aside(img), _moved_ranking(v, _aside), i) for i, img, v in gone])
            self._conn.executemany(
                "UPDATE attempts SET image=? || image WHERE job_id=? AND image IS NOT NULL",
                [(ASIDE, i) for i, _, _ in gone])
            self._conn.executemany("DELETE FROM pairs WHERE en_job=? OR zh_job=?",
                                   [(i, i) for i, _, _ in gone])
            self._conn.executemany(
                "UPDATE jobs SET status=COALESCE(prev_status, 'pending'), prev_status=NULL,"
                " image=?, variants=? WHERE id=?",
                [(_unaside(img), _moved_ranking(v, _unaside), i) for i, img, v in back])
            self._conn.executemany(
                "UPDATE attempts SET image=substr(image, ?) WHERE job_id=? AND image LIKE ?",
                [(len(ASIDE) + 1, i, ASIDE + "%") for i, _, _ in back])
        return len(gone)

    def _move_job_files(self, job_id: str, image: str | None, variants: str | None,
                        to_aside: bool, folders: set[str]) -> None:
        """Move a job's image, its other ranked variants and its attempts folder; a move
        already done is skipped."""
        extra = [_unaside(v["image"]) for v in ranking_of(variants) if v["rank"] > 1]
        for rel in filter(None, (_unaside(image), *extra, f"attempts/{job_id}")):
            src, dst = (rel, ASIDE + rel) if to_aside else (ASIDE + rel, rel)
            if self._files.move(src, dst):
                folders |= {src.rpartition("/")[0], dst.rpartition("/")[0]}

    def prune(self) -> dict[str, Any]:
        """Delete superseded jobs: their rows, and the files under superseded/ that the manifest
        records for them and that are still what the store wrote. Anything else stays, and is
        listed in "left". Returns {"jobs": n, "removed": [paths], "left": [paths]}."""
        rows = self._conn.execute(
            "SELECT id, image, sha256, size, mtime_ns FROM jobs WHERE status=?", (SUPERSEDED,)
        ).fetchall()
        attempt_files = self._conn.execute(
            "SELECT job_id, image FROM attempts WHERE image LIKE ? AND job_id IN"
            " (SELECT id FROM jobs WHERE status=?)", (ASIDE + "%", SUPERSEDED)).fetchall()
        files = [(i, img, FileRecord(*rec) if rec[0] else None) for i, img, *rec in rows if img]
        files += [(i, img, None) for i, img in attempt_files]
        files += [(i, v["image"], None) for i, variants in self._conn.execute(
            "SELECT id, variants FROM jobs WHERE status=? AND variants IS NOT NULL", (SUPERSEDED,))
                  for v in ranking_of(variants) if v["rank"] > 1]
        removed, left = [], []
        for job_id, rel, record in files:
            if not rel.startswith(ASIDE) or self._files.stat(rel) is None:
                continue
            if self._own_bytes(rel, job_id, record) is not None and self._files.remove(rel):
                removed.append(rel)
            else:
                left.append(rel)
        self._files.remove_empty_folders({rel.rpartition("/")[0] for rel in removed})
        with self._transaction():
            self._conn.execute("DELETE FROM attempts WHERE job_id IN"
                               " (SELECT id FROM jobs WHERE status=?)", (SUPERSEDED,))
            self._conn.execute("DELETE FROM jobs WHERE status=?", (SUPERSEDED,))
        return {"jobs": len(rows), "removed": removed, "left": left}

    # ------------------------------------------------------------------------- decisions
    def update_scoring(self, jobs: Iterable[Job]) -> list[str]:
        """Bring known jobs' stored JSON up to the current recipe: scoring (thresholds,
        references, ...), labels and plan order. Identity fields cannot differ (they make the
        id). One transaction; only rows that differ are written. Returns the ids whose job
        JSON changed (plan order alone does not count): the candidates for redecide."""
        stored = {i: (text, order) for i, text, order in
                  self._conn.execute("SELECT id, job, ord FROM jobs")}
        changed, rows = [], []
        for order, job in enumerate(jobs):
            if job.id not in stored:
                continue
            _, section, name, _, lang, text, depends_on, _ = _job_columns(job, order)
            if (text, order) != stored[job.id]:
                rows.append((section, name, lang, text, depends_on, order, job.id))
                changed += [job.id] if text != stored[job.id][0] else []
        if rows:
            with self._transaction():
                self._conn.executemany("UPDATE jobs SET section=?, name=?, lang=?, job=?,"
                                       " depends_on=?, ord=? WHERE id=?", rows)
        return changed

    def finished(self, job_ids: Iterable[str] | None = None) -> list[StoredResult]:
        """The kept and rejected jobs (of `job_ids`, or all), in plan order, as typed results."""
        want = None if job_ids is None else set(job_ids)
        jobs = [row for row in self._conn.execute(
            "SELECT id, job, status, best, image FROM jobs WHERE status IN (?, ?) ORDER BY ord, id",
            FINAL) if want is None or row[0] in want]
        attempts: dict[str, list[StoredAttempt]] = {}
        for row in self._conn.execute(
                "SELECT job_id, n, seed, strategy, reason, params, scores, passed, failed_metrics,"
                " seconds, image FROM attempts WHERE job_id IN (SELECT id FROM jobs WHERE status"
                " IN (?, ?)) ORDER BY job_id, n", FINAL):
            if want is None or row[0] in want:
                attempts.setdefault(row[0], []).append(_stored_attempt(row[1:]))
        return [StoredResult(Job.from_dict(json.loads(text)), status, best, image,
                             tuple(attempts.get(job_id, ())))
                for job_id, text, status, best, image in jobs]

    def redecide(self, job: Job, status: str, best: int | None,
                 verdicts: Mapping[int, tuple[bool, Sequence[str]]]) -> bool:
        """Record a new decision for a finished job without regenerating it: `status` (kept or
        rejected), `best` (the attempt n whose image is kept; None: unchanged) and per attempt
        n its (passed, failed_metrics). The image moves between kept/ and rejected/ with its PNG
        chunks rewritten. Taken from attempts/<id>/<best>.png when `best` changes, so that needs
        keep_attempts; StoreError when the image is not on disk or was replaced (reopen then).
        Returns False, touching nothing, when nothing changes."""
        if status not in FINAL:
            raise ValueError(f"redecide takes kept or rejected, not {status!r}")
        stored = next(iter(self.finished([job.id])), None)
        if stored is None:
            raise StoreError(f"job {job.id} has no kept or rejected result to re-decide")
        best = stored.best if best is None else best
        attempts = tuple(_judged(a, verdicts.get(a.n)) for a in stored.attempts)
        target = self.image_path(job, status)
        if (status, best, target, attempts) == (stored.status, stored.best, stored.image,
                                                stored.attempts):
            return False
        before = (stored.image, self._record(job.id))
        png = self._reencoded(stored, job, best, status, attempts, before)
        self._clear_way(job.id, [target], before)
        written = self._write_files([(target, png)])
        with self._transaction():
            self._conn.execute("UPDATE jobs SET status=?, best=?, image=? WHERE id=?",
                               (status, best, target, job.id))
            self._set_record(job.id, written[target])
            self._conn.executemany(
                "UPDATE attempts SET passed=?, failed_metrics=? WHERE job_id=? AND n=?",
                [(int(a.passed), json.dumps(list(a.failed_metrics)), job.id, a.n)
                 for a in attempts])
        self._clear_leftovers(job, target, before)
        return True

    def _reencoded(self, stored: StoredResult, job: Job, best: int, status: str,
                   attempts: tuple[StoredAttempt, ...], before) -> bytes:
        """The PNG of attempt `best` with text chunks for the new decision."""
        chosen = next((a for a in attempts if a.n == best), None)
        source = stored.image if best == stored.best else (chosen and chosen.image)
        data = source and self._own_bytes(source, job.id, before[1] if source == before[0] else None)
        if chosen is None or data is None:
            raise StoreError(f"cannot re-decide job {job.id} ({job.section}/{job.name}): the image "
                             f"of attempt {best} is not on disk or was replaced; reopen the job "
                             "to regenerate it")
        with Image.open(io.BytesIO(data)) as image:
            return encode_png(image.convert("RGB"), job, chosen.to_attempt(), status)

    # ------------------------------------------------------------------------- files vs manifest
    def verify_files(self) -> list[FileProblem]:
        """Check every kept and rejected image against the manifest: "missing", or "replaced"
        (not a plain file, or content unlike the recorded sha256). Hashes only files whose size
        or mtime changed; files of older run dirs (no hash yet) are adopted when our PNG chunk
        names their job. Refreshed stats and adopted hashes are written back."""
        rows = self._conn.execute(
            "SELECT id, image, sha256, size, mtime_ns FROM jobs WHERE status IN (?, ?)"
            " AND image IS NOT NULL ORDER BY ord, id", FINAL).fetchall()
        problems, refreshed = [], []
        for job_id, rel, *rec in rows:
            record = FileRecord(*rec) if rec[0] else None
            st = self._files.stat(rel)
            if st is None:
                problems.append(FileProblem(job_id, rel, "missing"))
            elif record and record.same_stat(st):
                continue  # the cheap, usual case
            elif (data := self._own_bytes(rel, job_id, record)) is None:
                problems.append(FileProblem(job_id, rel, "replaced"))
            else:  # touched but unchanged, or adopted: remember the stat to skip it next time
                refreshed.append((FileRecord(sha256(data), st.st_size, st.st_mtime_ns), job_id))
        if refreshed:
            with self._transaction():
                for record, job_id in refreshed:
                    self._set_record(job_id, record)
        return problems

    def reopen(self, job_ids: Iterable[str]) -> list[str]:
        """Set finished jobs back to pending so the run regenerates them (after verify_files).
        A file at their image path that the store did not write is a foreign image: it is
        moved to modified/<path>, never written into or deleted. Returns where such files went."""
        ids = list(job_ids)
        moved = []
        for job_id in ids:
            image, record = self._image_of(job_id)
            if image and self._files.stat(image) is not None and \
                    self._own_bytes(image, job_id, record) is None:
                moved.append(self._files.set_aside(image))
        with self._transaction():
            self._conn.executemany(
                "UPDATE jobs SET status='pending', image=NULL, best=NULL, error=NULL, sha256=NULL,"
                " size=NULL, mtime_ns=NULL WHERE id=? AND status IN (?, ?)",
                [(job_id, *FINAL) for job_id in ids])
            self._conn.executemany("DELETE FROM pairs WHERE en_job=? OR zh_job=?",
                                   [(i, i) for i in ids])
        return moved


# ----------------------------------------------------------------------------- helpers
def _moved_ranking(variants: str | None, move) -> str | None:
    """jobs.variants with every image path moved aside (or back) by `move`."""
    ranking = ranking_of(variants)
    return json.dumps([{**v, "image": move(v["image"])} for v in ranking]) if ranking else variants


def _aside(rel: str | None) -> str | None:
    return rel if rel is None or rel.startswith(ASIDE) else ASIDE + rel


def _unaside(rel: str | None) -> str | None:
    return rel[len(ASIDE):] if rel and rel.startswith(ASIDE) else rel


def _stored_attempt(row: tuple) -> StoredAttempt:
    n, seed, strategy, reason, params, scores, passed, failed, seconds, image = row
    return StoredAttempt(n, seed, strategy, reason, json.loads(params or "{}"),
                         json.loads(scores or "{}"), bool(passed), tuple(json.loads(failed or "[]")),
                         seconds or 0.0, image)


def _judged(attempt: StoredAttempt, verdict: tuple[bool, Sequence[str]] | None) -> StoredAttempt:
    if verdict is None:
        return attempt
    return replace(attempt, passed=bool(verdict[0]), failed_metrics=tuple(verdict[1]))

