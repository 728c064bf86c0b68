"""RunStore: open a run directory, record jobs and results, read them back.

Crash safety rests on one order of events: every file is written to a temp name in its final
folder, fsynced and renamed, and only then does the manifest row commit. A crash at any point
leaves either no row (the job runs again and rewrites the same file) or a row whose file exists.
Stale temp files of a killed run are swept when the next writer opens the directory.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from .. import __version__
from ..jobs import STATUSES, Attempt, Job, JobResult
from .errors import OtherRecipe, StoreError, StoreFull
from .files import LOCK_FILE, FileRecord, RunFiles, sha256
from .manifest import MANIFEST, connect_reader, connect_writer
from .png import chunk_job_id, encode_png
from .variants import ranking_of, variant_files

RECIPE_FILE = "recipe.yaml"
FINAL = ("kept", "rejected")  # a job in one of these states is never run again
SUPERSEDED = "superseded"  # a job the current recipe no longer plans; its files are set aside
LIVE = tuple(s for s in STATUSES if s != SUPERSEDED)  # the states `status` counts


class StoreCore:
    """Opening, recording and reading a run directory; upkeep.RunStore adds the work that keeps
    it true to the current recipe. Writers hold an exclusive lock; readers take none."""

    def __init__(self, run_dir: Path, conn: sqlite3.Connection, files: RunFiles | None,
                 lock_fd: int | None):
        self.run_dir = run_dir
        self.readonly = lock_fd is None
        self._conn = conn
        self._files = files
        self._lock_fd = lock_fd

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, run_dir: str | os.PathLike, readonly: bool = False, *,
             recipe_name: str | None = None, recipe_origin: str | None = None) -> "StoreCore":
        """Open RUN_DIR. A writer (readonly=False) makes it when missing, refuses a folder that
        holds something else, a damaged manifest, links, and a run dir of another recipe (when
        recipe_name/recipe_origin are given: the recipe's `name` and its file name), then takes
        the lock and sweeps stale temp files. Readers take no lock and write nothing."""
        run_dir = Path(run_dir).resolve()
        if readonly:
            conn = connect_reader(run_dir)
            return cls(run_dir, conn, RunFiles(run_dir), None)
        files = RunFiles.create(run_dir)
        lock_fd = made_lock = None
        try:
            files.check_owned(MANIFEST)  # before the lock: an unrelated folder gets no .lock
            lock_fd, made_lock = files.take_lock()
            files.sweep_temp_files()
            store = cls(run_dir, connect_writer(files), files, lock_fd)
        except BaseException:
            if made_lock:
                files.remove(LOCK_FILE)  # a folder refused (e.g. a foreign manifest) stays as it was
            if lock_fd is not None:
                os.close(lock_fd)
            files.close()
            raise
        try:
            store.claim(recipe_name, recipe_origin)
            if store.get_meta("created") is None:
                store.set_meta("created", f"{time.time():.3f}")
                store.set_meta("version", __version__)
        except BaseException:
            store.close()
            raise
        return store

    def claim(self, recipe_name: str | None, recipe_origin: str | None) -> None:
        """Record which recipe this run dir holds, or refuse another one. Identity is the
        recipe's `name` and its file name (origin, e.g. "quickstart.yaml"); a value the manifest
        does not have yet (an older run dir) is adopted."""
        origin = os.path.basename(recipe_origin) if recipe_origin else None
        mine = {"recipe_name": recipe_name, "recipe_origin": origin}
        held = {key: self.get_meta(key) for key in mine}
        if any(mine[k] and held[k] and mine[k] != held[k] for k in mine):
            raise OtherRecipe(
                f"{self.run_dir} holds the run of recipe {held['recipe_name'] or '?'!r} "
                f"({held['recipe_origin'] or 'file name not recorded'}), not of recipe "
                f"{recipe_name or '?'!r} ({origin or '?'}); one run dir holds one recipe. "
                f"Choose another --out, or delete {self.run_dir} yourself to replace that run")
        for key, value in mine.items():
            if value:
                self.set_meta(key, value)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None
        if self._files is not None:
            self._files.close()
            self._files = None

    def __enter__(self) -> "StoreCore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------------------- meta
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value: Any) -> None:
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if self.get_meta(key) == text:
            return  # an unchanged rerun leaves the manifest untouched
        with self._transaction():
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, text))

    def meta(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM meta"))

    def save_recipe(self, text: str) -> None:
        """Keep the recipe as run, and its hash, beside the outputs."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        if self.get_meta("recipe_sha256") == digest and (self.run_dir / RECIPE_FILE).is_file():
            return
        self._write_files([(RECIPE_FILE, text.encode())])
        self.set_meta("recipe_sha256", digest)

    # ----------------------------------------------------------------------------- jobs
    def add_jobs(self, jobs: Iterable[Job]) -> int:
        """Insert new jobs as pending, in plan order; rows that exist stay as they are
        (update_scoring brings their scoring up to date). Returns how many were new."""
        known = {row[0] for row in self._conn.execute("SELECT id FROM jobs")}
        rows = [(*_job_columns(job, order), "pending", 0, 0.0, 0)
                for order, job in enumerate(jobs) if job.id not in known]  # skip encoding known
        if not rows:
            return 0
        with self._transaction():
            before = self._conn.total_changes
            self._conn.executemany(
                "INSERT OR IGNORE INTO jobs(id, section, name, kind, lang, job, depends_on, ord,"
                " status, n_attempts, seconds, scored) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            return self._conn.total_changes - before

    def statuses(self) -> dict[str, str]:
        """Job id -> status, for every job the current recipe plans (superseded ones left out)."""
        return dict(self._conn.execute("SELECT id, status FROM jobs WHERE status != ?",
                                       (SUPERSEDED,)))

    def done_ids(self) -> set[str]:
        """Ids of jobs that are final (kept or rejected); failed and pending ones run again."""
        rows = self._conn.execute("SELECT id FROM jobs WHERE status IN (?, ?)", FINAL)
        return {row[0] for row in rows}

    def pending(self, jobs: Iterable[Job]) -> list[Job]:
        done = self.done_ids()
        return [job for job in jobs if job.id not in done]

    def jobs(self, include_superseded: bool = False) -> list[dict[str, Any]]:
        """Every job row in plan order, with `job` and `depends_on` decoded."""
        where = "" if include_superseded else f"WHERE status != '{SUPERSEDED}'"
        cursor = self._conn.execute(f"SELECT * FROM jobs {where} ORDER BY ord, id")
        return [_decode(row, cursor, ("job", "depends_on")) for row in cursor.fetchall()]

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        cursor = self._conn.execute("SELECT * FROM attempts WHERE job_id=? ORDER BY n", (job_id,))
        return [_decode(row, cursor, ("params", "scores", "failed_metrics"))
                for row in cursor.fetchall()]

    def counts(self) -> dict[str, Any]:
        """{"total": n, "status": {status: n}, "sections": {section: {status: n}},
        "superseded": n}: superseded jobs are counted apart, not in total or the states."""
        status = dict.fromkeys(LIVE, 0)
        sections: dict[str, dict[str, int]] = {}
        superseded = 0
        for section, state, n in self._conn.execute(
                "SELECT section, status, COUNT(*) FROM jobs GROUP BY section, status ORDER BY section"):
            if state == SUPERSEDED:
                superseded += n
                continue
            status[state] = status.get(state, 0) + n
            sections.setdefault(section, dict.fromkeys(LIVE, 0))[state] = n
        return {"total": sum(status.values()), "status": status, "sections": sections,
                "superseded": superseded}

    def state_digest(self) -> str:
        """A fingerprint of every job's outcome and of the pairs: equal digests mean a report
        made from one state still shows the other."""
        digest = hashlib.sha256()
        for query in ("SELECT id, status, image, best, error, finished FROM jobs ORDER BY id",
                      "SELECT * FROM pairs ORDER BY pair"):
            for row in self._conn.execute(query):
                digest.update(repr(row).encode())
        return digest.hexdigest()

    def kept_image(self, job_id: str) -> Image.Image | None:
        """The kept image of a job as RGB; None when the job has no kept image, or when its file
        is missing or no longer the one the store wrote (verify_files says which)."""
        row = self._conn.execute("SELECT status, image FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None or row[0] != "kept" or not row[1]:
            return None
        data = self._own_bytes(row[1], job_id, self._record(job_id))
        if data is None:
            return None
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")

    # ----------------------------------------------------------------------------- pairs
    def save_pair(self, pair: str, en_job: str, zh_job: str, similarity: float | None,
                  text_gap: float | None) -> None:
        with self._transaction():
            self._conn.execute("INSERT OR REPLACE INTO pairs VALUES(?,?,?,?,?)",
                               (pair, en_job, zh_job, similarity, text_gap))

    def replace_pairs(self, rows: list[tuple]) -> None:
        """The pairs table becomes exactly `rows` (pair, en_job, zh_job, similarity, text_gap):
        rows of pairs whose jobs changed or left the recipe never linger."""
        with self._transaction():
            self._conn.execute("DELETE FROM pairs")
            self._conn.executemany("INSERT INTO pairs VALUES(?,?,?,?,?)", rows)

    def pairs(self) -> list[dict[str, Any]]:
        cursor = self._conn.execute("SELECT * FROM pairs ORDER BY pair")
        return [_decode(row, cursor, ()) for row in cursor.fetchall()]

    # ----------------------------------------------------------------------------- results
    def commit(self, job: Job, result: JobResult, *, keep_attempts: bool = False) -> None:
        """Write a job's images, then record it. Raises StoreFull when the disk is full.
        A file found where an image goes that the store did not write is set aside first."""
        files, image_path, attempt_paths = self._result_files(job, result, keep_attempts)
        extra, ranking = variant_files(job, result, image_path)
        files += extra
        before = self._image_of(job.id)
        old_variants = self._variant_images(job.id)
        self._clear_way(job.id, [rel for rel, _ in files], before)
        written = self._write_files(files)
        best_n = None if result.best is None else result.attempts[result.best].n  # made the image
        now = time.time()
        attempts = [_attempt_row(job.id, a, attempt_paths.get(a.n), now) for a in result.attempts]
        with self._transaction():
            self._insert_if_missing(job)
            self._conn.execute(
                "UPDATE jobs SET status=?, image=?, best=?, error=?, n_attempts=?, seconds=?,"
                " scored=?, finished=?, prev_status=NULL, variants=? WHERE id=?",
                (result.status, image_path, best_n, result.error or None, len(result.attempts),
                 sum(a.seconds for a in result.attempts),
                 int(any(a.scores for a in result.attempts)), now,
                 json.dumps(ranking) if ranking else None, job.id))
            self._set_record(job.id, written.get(image_path) if written else None)
            self._conn.execute("DELETE FROM attempts WHERE job_id=?", (job.id,))
            self._conn.executemany(
                "INSERT INTO attempts VALUES(?,?,?,?,?,?,?,?,?,?,?,?)", attempts)
        # Only now: a crash before the rows commit must leave the old row's file in place.
        self._clear_leftovers(job, image_path, before)
        for rel in old_variants - {rel for rel, _ in extra}:
            if self._own_bytes(rel, job.id, None) is not None:
                self._files.remove(rel)

    def _variant_images(self, job_id: str) -> set[str]:
        """The files of a job's ranks 2.. as the manifest lists them now."""
        try:
            row = self._conn.execute("SELECT variants FROM jobs WHERE id=?", (job_id,)).fetchone()
        except sqlite3.OperationalError:  # a manifest older than the column
            return set()
        return {v["image"] for v in ranking_of(row[0] if row else None) if v["rank"] > 1}

    def _insert_if_missing(self, job: Job) -> None:
        """A committed job always has a row, even if the caller skipped add_jobs."""
        if self._conn.execute("SELECT 1 FROM jobs WHERE id=?", (job.id,)).fetchone():
            return  # the usual case; the MAX(ord) below scans the table
        (last,) = self._conn.execute("SELECT COALESCE(MAX(ord), -1) FROM jobs").fetchone()
        self._conn.execute(
            "INSERT INTO jobs(id, section, name, kind, lang, job, depends_on, ord, status,"
            " n_attempts, seconds, scored) VALUES(?,?,?,?,?,?,?,?,'pending',0,0,0)",
            _job_columns(job, last + 1))

    def image_path(self, job: Job, status: str) -> str:
        """Where a kept or rejected job's image lives, relative to the run dir."""
        section = "/".join(_safe_name(part) for part in job.section.split("/") if part)
        return f"{status}/{section or '_'}/{_safe_name(job.name)}-{job.id[:8]}.png"

    def _result_files(self, job: Job, result: JobResult, keep_attempts: bool):
        files: list[tuple[str, bytes]] = []
        image_path = None
        if result.status in FINAL and result.image is not None:
            image_path = self.image_path(job, result.status)
            best = result.attempts[result.best]
            files.append((image_path, encode_png(best.image, job, best, result.status)))
        attempt_paths: dict[int, str] = {}
        if keep_attempts:
            for attempt in result.attempts:
                if attempt.image is not None:
                    attempt_paths[attempt.n] = f"attempts/{job.id}/{attempt.n}.png"
                    files.append((attempt_paths[attempt.n],
                                  encode_png(attempt.image, job, attempt, "attempt")))
        return files, image_path, attempt_paths

    def _write_files(self, files: list[tuple[str, bytes]]) -> dict[str, FileRecord]:
        self._require_writer()
        return self._files.write(files)

    # ----------------------------------------------------------------------------- ownership
    def _image_of(self, job_id: str) -> tuple[str | None, FileRecord | None]:
        row = self._conn.execute("SELECT image FROM jobs WHERE id=?", (job_id,)).fetchone()
        return (row[0] if row else None), self._record(job_id)

    def _record(self, job_id: str) -> FileRecord | None:
        try:
            row = self._conn.execute("SELECT sha256, size, mtime_ns FROM jobs WHERE id=?",
                                     (job_id,)).fetchone()
        except sqlite3.OperationalError:  # a reader of a manifest older than these columns
            return None
        return FileRecord(*row) if row and row[0] else None

    def _set_record(self, job_id: str, record: FileRecord | None) -> None:
        values = (record.sha256, record.size, record.mtime_ns) if record else (None, None, None)
        self._conn.execute("UPDATE jobs SET sha256=?, size=?, mtime_ns=? WHERE id=?",
                           (*values, job_id))

    def _own_bytes(self, rel: str, job_id: str, record: FileRecord | None) -> bytes | None:
        """The bytes of `rel` when it is the file the store wrote for `job_id`, else None.
        With a record: its size+mtime, else its hash must match. Without one (a crash between
        rename and row, or an older run dir): our PNG chunk must name the job."""
        st = self._files.stat(rel)
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        data = self._files.read(rel)
        if record:
            return data if record.same_stat(st) or sha256(data) == record.sha256 else None
        return data if chunk_job_id(data) == job_id else None

    def _clear_way(self, job_id: str, targets: list[str],
                   before: tuple[str | None, FileRecord | None]) -> None:
        """Set aside each file at a target path that the store did not write for this job."""
        for rel in targets:
            if self._files.stat(rel) is None:
                continue  # the usual case: one stat
            record = before[1] if rel == before[0] else None
            if self._own_bytes(rel, job_id, record) is None:
                self._files.set_aside(rel)

    def _clear_leftovers(self, job: Job, image_path: str | None,
                         before: tuple[str | None, FileRecord | None]) -> None:
        """After a commit: the job's earlier image (moved between kept/ and rejected/, or
        renamed) and a crash's leftover at the other final place go; a foreign file there is
        set aside instead, so kept/ and rejected/ hold only what the manifest lists."""
        spots = {before[0]} | {self.image_path(job, s) for s in FINAL}
        for rel in spots - {image_path, None}:
            if self._files.stat(rel) is None:
                continue
            record = before[1] if rel == before[0] else None
            if self._own_bytes(rel, job.id, record) is not None:
                self._files.remove(rel)
            else:
                self._files.set_aside(rel)

    # ----------------------------------------------------------------------------- plumbing
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._require_writer()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "full" in str(exc).lower():
                raise StoreFull(f"the disk under {self.run_dir} is full (manifest: {exc}); free "
                                "space and run again: finished jobs are kept") from exc
            raise StoreError(f"cannot write {self.run_dir / MANIFEST}: {exc}") from exc

    def _require_writer(self) -> None:
        if self.readonly:
            raise StoreError(f"{self.run_dir} was opened read-only")


# --------------------------------------------------------------------------------- helpers
def _job_columns(job: Job, order: int) -> tuple:
    """id, section, name, kind, lang, job JSON, depends_on JSON, ord."""
    return (job.id, job.section, job.name, job.kind, job.lang,
            json.dumps(job.to_dict(), ensure_ascii=False), json.dumps(list(job.depends_on)), order)


def _safe_name(text: str) -> str:
    """A file-name-safe form of a label: word characters (any script), dots and dashes."""
    name = re.sub(r"[^\w.-]+", "_", text).strip("._")
    return name[:80] or "_"


def _attempt_row(job_id: str, attempt: Attempt, image: str | None, now: float) -> tuple:
    record = attempt.record()
    return (job_id, attempt.n, attempt.seed, attempt.strategy, attempt.reason,
            json.dumps(record["params"], ensure_ascii=False, default=str),
            json.dumps(record["scores"]), int(attempt.passed),
            json.dumps(record["failed_metrics"]), attempt.seconds, image, now)


def _decode(row: tuple, cursor: sqlite3.Cursor, json_fields: tuple[str, ...]) -> dict[str, Any]:
    names = [col[0] for col in cursor.description]
    record = dict(zip(names, row))
    for name in json_fields:
        if record.get(name) is not None:
            record[name] = json.loads(record[name])
    return record
