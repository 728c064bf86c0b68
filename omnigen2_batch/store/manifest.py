"""manifest.sqlite: opening it for writing or reading, and refusing one that is damaged.

A new manifest is built under a temp name and renamed into place, so `manifest.sqlite` is never
half-made: an empty, truncated or foreign one is damage, reported as such, never started over.
"""
from __future__ import annotations

import os
import sqlite3
import stat
import urllib.parse
from pathlib import Path

from .errors import ManifestDamaged, NotARunDir, NotWritable, StoreError, StoreFull, UnsafePath
from .files import RunFiles

MANIFEST = "manifest.sqlite"
SIDE_FILES = tuple(MANIFEST + tail for tail in ("-wal", "-shm", "-journal"))
SQLITE_MAGIC = b"SQLite format 3\x00"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS jobs(
    id TEXT PRIMARY KEY, section TEXT, name TEXT, kind TEXT, lang TEXT, job TEXT, depends_on TEXT,
    status TEXT, image TEXT, best INT, error TEXT, n_attempts INT, seconds REAL, scored INT,
    finished REAL, ord INT, prev_status TEXT, sha256 TEXT, size INT, mtime_ns INT);
CREATE TABLE IF NOT EXISTS attempts(
    job_id TEXT, n INT, seed INT, strategy TEXT, reason TEXT, params TEXT, scores TEXT, passed INT,
    failed_metrics TEXT, seconds REAL, image TEXT, finished REAL, PRIMARY KEY(job_id, n));
CREATE TABLE IF NOT EXISTS pairs(
    pair TEXT PRIMARY KEY, en_job TEXT, zh_job TEXT, similarity REAL, text_gap REAL);
"""
# Columns later versions added to `jobs`: prev_status (what a superseded job was), and the
# sha256/size/mtime_ns of its image (to notice a file replaced behind the manifest's back).
# variants: the ranked images of a job that keeps several (store/variants.py).
ADDED_JOB_COLUMNS = (("prev_status", "TEXT"), ("sha256", "TEXT"), ("size", "INT"),
                     ("mtime_ns", "INT"), ("variants", "TEXT"))


def connect_writer(files: RunFiles) -> sqlite3.Connection:
    """The manifest of a run dir we hold the lock of, created when missing."""
    if files.stat(MANIFEST) is None:
        _create(files)
    for name in (MANIFEST, *SIDE_FILES):
        _refuse_link(files, name)  # SQLite follows links; we must not
    path = files.run_dir / MANIFEST
    _check_header(files, path)
    # Checked through an immutable connection first: it makes no -wal/-shm, so a damaged or
    # foreign file (and its folder) stays exactly as it was; safe because we hold the lock.
    check = sqlite3.connect(_uri(path) + "?immutable=1", uri=True)
    try:
        _check_contents(check, path)
    finally:
        check.close()
    conn = sqlite3.connect(os.fsencode(path), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives process crashes
        _add_missing_columns(conn)
    except sqlite3.OperationalError as exc:
        conn.close()
        raise _full_or_error(exc, path) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def connect_reader(run_dir: Path) -> sqlite3.Connection:
    """A read-only connection for status/report: takes no lock, writes nothing."""
    path = run_dir / MANIFEST
    if not run_dir.is_dir() or not path.exists():
        raise NotARunDir(f"{run_dir} is not a run directory (no {MANIFEST}); "
                         "pass the --out folder of a run")
    files = RunFiles(run_dir)
    try:
        for name in (MANIFEST, *SIDE_FILES):
            _refuse_link(files, name)  # a reader's SQLite may write the -shm index
        _check_header(files, path)
    finally:
        files.close()
    uri = _uri(path)
    # immutable=1 only when mode=ro cannot open: a read-only folder cannot hold the WAL index,
    # and in a read-only folder no writer can be changing the manifest under us.
    for mode in ("mode=ro", "immutable=1"):
        conn = sqlite3.connect(f"{uri}?{mode}", uri=True, isolation_level=None)
        try:
            _check_contents(conn, path)
            return conn
        except sqlite3.OperationalError as exc:
            conn.close()
            error = exc
        except BaseException:
            conn.close()
            raise
    raise StoreError(f"cannot read {path}: {error}")


def _uri(path: Path) -> str:
    return "file:" + urllib.parse.quote(os.fsencode(path))  # bytes: a non-UTF-8 path works too


def _create(files: RunFiles) -> None:
    """Build an empty manifest under a temp name and rename it into place."""
    for side in SIDE_FILES:  # a WAL left by a manifest moved aside must not replay into this one
        st = files.stat(side)
        if st is not None and (side.endswith("-shm") or st.st_size == 0):
            files.remove(side)  # SQLite's index of a WAL, or an empty WAL: nothing to keep
        elif st is not None:
            files.set_aside(side)
    temp = files.temp_name(MANIFEST)
    try:
        conn = sqlite3.connect(os.fsencode(files.run_dir / temp), isolation_level=None)
        try:
            conn.executescript(SCHEMA)
        finally:
            conn.close()
        with files.folder("") as fd:
            os.replace(temp, MANIFEST, src_dir_fd=fd, dst_dir_fd=fd)
            os.fsync(fd)
    except (sqlite3.Error, OSError) as exc:
        for name in (temp, temp + "-journal"):
            files.remove(name)
        if isinstance(exc, OSError):
            raise files.error(exc, MANIFEST) from exc
        raise _full_or_error(exc, files.run_dir / MANIFEST) from exc


def _refuse_link(files: RunFiles, name: str) -> None:
    """SQLite follows links and writes through hard links; the store must never do either."""
    st = files.stat(name)
    if st is not None and (not stat.S_ISREG(st.st_mode) or st.st_nlink > 1):
        raise UnsafePath(f"{files.run_dir / name} is a link (or not a plain file); the store "
                         "never writes through links: remove it, or use another --out")


def _check_header(files: RunFiles, path: Path) -> None:
    head = files.read_head(MANIFEST, len(SQLITE_MAGIC))
    if not head:
        raise _damaged(path, "it is empty (0 bytes)")
    if head != SQLITE_MAGIC:
        raise _damaged(path, "it is not a SQLite database")


def _check_contents(conn: sqlite3.Connection, path: Path) -> None:
    try:
        verdict = [row[0] for row in conn.execute("PRAGMA quick_check(1)")]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.OperationalError:
        raise  # cannot open (e.g. read-only folder): not damage
    except sqlite3.DatabaseError as exc:
        raise _damaged(path, str(exc)) from exc
    if verdict != ["ok"]:
        raise _damaged(path, f"SQLite integrity check: {verdict[0]}")
    if "jobs" not in tables:
        raise NotARunDir(f"{path.parent} is not a run directory: its {MANIFEST} is a SQLite "
                         "database of something else (it has no jobs table); nothing in it was "
                         "touched. Pass a new or empty folder as --out")


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    have = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    for name, kind in ADDED_JOB_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")


def _damaged(path: Path, what: str) -> ManifestDamaged:
    return ManifestDamaged(
        f"{path} is damaged ({what}); the run cannot be read or continued. To start over in this "
        f"folder, move it aside (e.g. `mv {path} {path}.damaged`, and its -wal/-shm files if "
        "any): the images in kept/ and rejected/ stay where they are")


def _full_or_error(exc: sqlite3.Error, path: Path) -> StoreError:
    if "full" in str(exc).lower() or getattr(exc, "sqlite_errorcode", 0) == 13:
        return StoreFull(f"the disk under {path.parent} is full ({exc}); free space and run "
                         "again: finished jobs are kept")
    if "readonly" in str(exc).replace(" ", "").lower():
        return NotWritable(f"cannot write {path}: {exc}; make the run dir writable or pass "
                           "another --out")
    return StoreError(f"cannot use {path}: {exc}")

