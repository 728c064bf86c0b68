"""The run directory: images on disk plus the SQLite manifest that says what each one is.

Crash safety rests on one order of events: every file is written to a temp name in its final
folder, fsynced and renamed, and only then does the manifest row commit. A crash at any point
leaves either no row (the job runs again and rewrites the same file) or a row whose file exists.
Stale temp files of a killed run are swept when the next writer opens the directory.

No torch here: `status` and `report` read the manifest through this module in well under a second.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import re
import sqlite3
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image, PngImagePlugin

from . import __version__
from .errors import EXIT_UNAVAILABLE, UserError
from .jobs import STATUSES, Attempt, Job, JobResult

MANIFEST = "manifest.sqlite"
LOCK_FILE = ".lock"
RECIPE_FILE = "recipe.yaml"
TEMP_PREFIX = ".tmp-"  # temp files are ".tmp-<pid>-<final name>" beside their final name
FINAL = ("kept", "rejected")  # a job in one of these states is never run again
TINY_NOTE = "made by the random-weight tiny model: this image is noise, not a real OmniGen2 output"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS jobs(
    id TEXT PRIMARY KEY, section TEXT, name TEXT, kind TEXT, lang TEXT, job TEXT, depends_on TEXT,
    status TEXT, image TEXT, best INT, error TEXT, n_attempts INT, seconds REAL, scored INT,
    finished REAL, ord INT);
CREATE TABLE IF NOT EXISTS attempts(
    job_id TEXT, n INT, seed INT, strategy TEXT, reason TEXT, params TEXT, scores TEXT, passed INT,
    failed_metrics TEXT, seconds REAL, image TEXT, finished REAL, PRIMARY KEY(job_id, n));
CREATE TABLE IF NOT EXISTS pairs(
    pair TEXT PRIMARY KEY, en_job TEXT, zh_job TEXT, similarity REAL, text_gap REAL);
"""


class StoreError(UserError):
    """The run directory cannot be used; the message says why and what to do."""


class RunLocked(StoreError):
    """Another process is writing to the run directory."""


class StoreFull(StoreError):
    """The disk filled up while writing; nothing partial was left behind."""

    exit_code = EXIT_UNAVAILABLE  # when it ends a command; within a run it ends the run (exit 1)


class RunStore:
    """One run directory. Writers hold an exclusive lock; readers (status, report) take none."""

    def __init__(self, run_dir: Path, conn: sqlite3.Connection, lock_fd: int | None):
        self.run_dir = run_dir
        self.readonly = lock_fd is None
        self._conn = conn
        self._lock_fd = lock_fd

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, run_dir: str | os.PathLike, readonly: bool = False) -> "RunStore":
        run_dir = Path(run_dir).resolve()
        if readonly:
            return cls(run_dir, _connect_readonly(run_dir), None)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create run dir {run_dir}: {exc.strerror}; "
                             "pass a writable --out folder") from exc
        lock_fd = _take_lock(run_dir)
        try:
            _sweep_temp_files(run_dir)
            conn = sqlite3.connect(run_dir / MANIFEST, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives process crashes
            conn.executescript(SCHEMA)
        except BaseException:
            os.close(lock_fd)
            raise
        store = cls(run_dir, conn, lock_fd)
        if store.get_meta("created") is None:
            store.set_meta("created", f"{time.time():.3f}")
            store.set_meta("version", __version__)
        return store

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> "RunStore":
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
        """Insert new jobs as pending, in plan order; rows that exist stay as they are.

        Returns how many were new. A changed recipe therefore only adds jobs: finished work
        keyed by an unchanged id is reused.
        """
        known = {row[0] for row in self._conn.execute("SELECT id FROM jobs")}
        rows = [(job.id, job.section, job.name, job.kind, job.lang,
                 json.dumps(job.to_dict(), ensure_ascii=False), json.dumps(list(job.depends_on)),
                 "pending", 0, 0.0, 0, order)
                for order, job in enumerate(jobs) if job.id not in known]  # skip encoding known
        if not rows:
            return 0
        with self._transaction():
            before = self._conn.total_changes
            self._conn.executemany(
                "INSERT OR IGNORE INTO jobs(id, section, name, kind, lang, job, depends_on, status,"
                " n_attempts, seconds, scored, ord) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            return self._conn.total_changes - before

    def statuses(self) -> dict[str, str]:
        """Job id -> status, for every job the manifest knows."""
        return dict(self._conn.execute("SELECT id, status FROM jobs"))

    def done_ids(self) -> set[str]:
        """Ids of jobs that are final (kept or rejected); failed and pending ones run again."""
        rows = self._conn.execute("SELECT id FROM jobs WHERE status IN (?, ?)", FINAL)
        return {row[0] for row in rows}

    def pending(self, jobs: Iterable[Job]) -> list[Job]:
        done = self.done_ids()
        return [job for job in jobs if job.id not in done]

    def jobs(self) -> list[dict[str, Any]]:
        """Every job row in plan order, with `job` and `depends_on` decoded."""
        cursor = self._conn.execute("SELECT * FROM jobs ORDER BY ord, id")
        return [_decode(row, cursor, ("job", "depends_on")) for row in cursor.fetchall()]

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        cursor = self._conn.execute("SELECT * FROM attempts WHERE job_id=? ORDER BY n", (job_id,))
        return [_decode(row, cursor, ("params", "scores", "failed_metrics"))
                for row in cursor.fetchall()]

    def counts(self) -> dict[str, Any]:
        """{"total": n, "status": {status: n}, "sections": {section: {status: n}}}."""
        status = dict.fromkeys(STATUSES, 0)
        sections: dict[str, dict[str, int]] = {}
        for section, state, n in self._conn.execute(
                "SELECT section, status, COUNT(*) FROM jobs GROUP BY section, status ORDER BY section"):
            status[state] = status.get(state, 0) + n
            sections.setdefault(section, dict.fromkeys(STATUSES, 0))[state] = n
        return {"total": sum(status.values()), "status": status, "sections": sections}

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
        """The kept image of a job as RGB, or None when the job has no kept image (yet)."""
        row = self._conn.execute("SELECT status, image FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None or row[0] != "kept" or not row[1]:
            return None
        with Image.open(self.run_dir / row[1]) as image:
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
        """Write a job's images, then record it. Raises StoreFull when the disk is full."""
        files, image_path, attempt_paths = self._result_files(job, result, keep_attempts)
        self._write_files(files)
        best_n = None if result.best is None else result.attempts[result.best].n  # made the image
        now = time.time()
        attempts = [_attempt_row(job.id, a, attempt_paths.get(a.n), now) for a in result.attempts]
        with self._transaction():
            self._insert_if_missing(job)
            self._conn.execute(
                "UPDATE jobs SET status=?, image=?, best=?, error=?, n_attempts=?, seconds=?,"
                " scored=?, finished=? WHERE id=?",
                (result.status, image_path, best_n, result.error or None, len(result.attempts),
                 sum(a.seconds for a in result.attempts),
                 int(any(a.scores for a in result.attempts)), now, job.id))
            self._conn.execute("DELETE FROM attempts WHERE job_id=?", (job.id,))
            self._conn.executemany(
                "INSERT INTO attempts VALUES(?,?,?,?,?,?,?,?,?,?,?,?)", attempts)
        # Only now: a crash before the rows commit must leave the old row's file in place.
        self._remove_orphan(job, result.status)

    def _insert_if_missing(self, job: Job) -> None:
        """A committed job always has a row, even if the caller skipped add_jobs."""
        if self._conn.execute("SELECT 1 FROM jobs WHERE id=?", (job.id,)).fetchone():
            return  # the usual case; the MAX(ord) below scans the table
        (last,) = self._conn.execute("SELECT COALESCE(MAX(ord), -1) FROM jobs").fetchone()
        self._conn.execute(
            "INSERT INTO jobs(id, section, name, kind, lang, job, depends_on, status, n_attempts,"
            " seconds, scored, ord) VALUES(?,?,?,?,?,?,?,'pending',0,0,0,?)",
            (job.id, job.section, job.name, job.kind, job.lang,
             json.dumps(job.to_dict(), ensure_ascii=False), json.dumps(list(job.depends_on)),
             last + 1))

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

    def _remove_orphan(self, job: Job, status: str) -> None:
        """The file at the other final location: left over from a crash in an earlier run, or
        the old place of a result that `score` moved between kept/ and rejected/."""
        for other in FINAL:
            if other != status:
                (self.run_dir / self.image_path(job, other)).unlink(missing_ok=True)

    def _write_files(self, files: list[tuple[str, bytes]]) -> None:
        """Write all files to temp names, then rename them all: none or all become visible
        (short of a crash between renames, which leaves only complete files behind)."""
        self._require_writer()
        temps: list[tuple[Path, Path]] = []
        for rel, data in files:
            final = self.run_dir / rel
            temp = final.with_name(f"{TEMP_PREFIX}{os.getpid()}-{final.name}")
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                temps.append((temp, final))
                _write_synced(temp, data)
            except OSError as exc:
                for written, _ in temps:
                    written.unlink(missing_ok=True)
                raise _store_error(exc, final, self.run_dir) from exc
        for temp, final in temps:
            os.replace(temp, final)
        for folder in {final.parent for _, final in temps}:
            _fsync_dir(folder)

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
            raise

    def _require_writer(self) -> None:
        if self.readonly:
            raise StoreError(f"{self.run_dir} was opened read-only")


# --------------------------------------------------------------------------------- PNG metadata
def encode_png(image: Image.Image, job: Job, attempt: Attempt, status: str) -> bytes:
    """The PNG bytes of an output, with text chunks that say how it was made and judged."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(job, attempt))
    info.add_text("omnigen2_batch", json.dumps(_chunk_record(job, attempt, status),
                                               ensure_ascii=False, sort_keys=True))
    info.add_text("Software", f"omnigen2-batch {__version__}")
    if is_tiny(job.model):
        info.add_text("Comment", TINY_NOTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def a1111_parameters(job: Job, attempt: Attempt) -> str:
    """The `parameters` text other tools (A1111, ComfyUI readers, civitai) understand."""
    params = attempt.params or {}
    lines = [job.prompt]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    width, height = params.get("width", job.width), params.get("height", job.height)
    low, high = params.get("cfg_range", job.cfg_range)
    fields = [
        ("Steps", params.get("steps", job.steps)),
        ("Sampler", params.get("scheduler", job.scheduler)),
        ("CFG scale", params.get("text_guidance", job.text_guidance)),
        ("Image CFG scale", params.get("image_guidance", job.image_guidance)),
        ("CFG range", f"{low}-{high}"),
        ("Seed", attempt.seed),
        ("Size", f"{width}x{height}"),
        ("Model", job.model),
        ("Strategy", attempt.strategy),
    ]
    if attempt.scores:
        fields.append(("Scores", " ".join(f"{k}={v:.4f}" for k, v in sorted(attempt.scores.items()))))
    if is_tiny(job.model):
        fields.append(("Note", TINY_NOTE))
    lines.append(", ".join(f"{key}: {value}" for key, value in fields))
    return "\n".join(lines)


def _chunk_record(job: Job, attempt: Attempt, status: str) -> dict[str, Any]:
    record = {"job_id": job.id, "section": job.section, "name": job.name, "status": status,
              "lang": job.lang, "identity": job.identity(), "attempt": attempt.record(),
              "version": __version__}
    if is_tiny(job.model):
        record["note"] = TINY_NOTE
    return record


def is_tiny(model: str) -> bool:
    return model == "tiny"


# --------------------------------------------------------------------------------- helpers
def _connect_readonly(run_dir: Path) -> sqlite3.Connection:
    path = run_dir / MANIFEST
    if not path.is_file():
        raise StoreError(f"{run_dir} is not a run directory (no {MANIFEST}); "
                         "pass the --out folder of a run")
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    return sqlite3.connect(uri, uri=True, isolation_level=None)


def _take_lock(run_dir: Path) -> int:
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLocked(f"run dir {run_dir} is in use by pid {holder}; "
                        "wait for it or use another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _sweep_temp_files(run_dir: Path) -> None:
    """Remove temp files a killed writer left; safe because we hold the lock."""
    for folder, _, names in os.walk(run_dir):
        for name in names:
            if name.startswith(TEMP_PREFIX):
                os.unlink(os.path.join(folder, name))


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable, not just the file contents."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _store_error(exc: OSError, where: Path, run_dir: Path) -> StoreError:
    if exc.errno in DISK_FULL:
        return StoreFull(f"no space left on the device while writing {where}; free space under "
                         f"{run_dir} and run again: finished jobs are kept")
    return StoreError(f"cannot write {where}: {exc.strerror or exc}")


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
