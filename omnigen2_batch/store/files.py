"""The files of a run directory, reached so that nothing outside it is ever touched.

Every path is opened from the run directory's descriptor one component at a time with O_NOFOLLOW:
a symbolic link planted anywhere inside (a .lock, a kept/ folder, an image) is refused instead of
written through. Files are written to a temp name in their final folder, fsynced and renamed.
A file in the way of a rename is set aside under modified/, never deleted.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import secrets
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import NotARunDir, NotWritable, RunLocked, StoreError, StoreFull, UnsafePath

TEMP_PREFIX = ".tmp-"  # temp files are ".tmp-<pid>-<8 hex>-<final name>" beside their final name
_OUR_TEMP = re.compile(r"\.tmp-\d+-[0-9a-f]{8}-(?P<final>.+)\Z")
OUR_FOLDERS = ("kept", "rejected", "superseded", "attempts")  # made by the store, swept of temps
ROOT_FILES = ("recipe.yaml", "manifest.sqlite", "manifest.sqlite-journal")  # temps of these too
SET_ASIDE = "modified"  # foreign files found where our outputs belong are moved under here
LOCK_FILE = ".lock"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


@dataclass(frozen=True)
class FileRecord:
    """What the manifest remembers of an image: its content hash, and size+mtime to skip hashing."""

    sha256: str
    size: int
    mtime_ns: int

    def same_stat(self, st: os.stat_result) -> bool:
        return (st.st_size, st.st_mtime_ns) == (self.size, self.mtime_ns)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RunFiles:
    """The run directory's files, all reached through its descriptor."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        try:
            self.fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise self.error(exc, "") from exc
        self._token = f"{os.getpid()}-{secrets.token_hex(4)}"  # temp names unique per writer

    @classmethod
    def create(cls, run_dir: Path) -> "RunFiles":
        """Open RUN_DIR for writing, making it (and its parents) when missing."""
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise NotARunDir(f"{run_dir} is a file, not a folder; pass a new or empty folder "
                             "as --out") from None
        except OSError as exc:
            raise NotWritable(f"cannot create the run dir {run_dir}: {exc.strerror}; pass a "
                              "writable --out folder") from exc
        return cls(run_dir)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # ------------------------------------------------------------------------- errors
    def error(self, exc: OSError, rel: str) -> StoreError:
        """The StoreError a person can act on, for an OSError at `rel` in the run dir."""
        where = self.run_dir / rel if rel else self.run_dir
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return UnsafePath(f"{_first_odd_part(self.run_dir, rel)} is a symbolic link or a file "
                              "where the run dir layout has a folder; the store never writes "
                              "through links: remove it, or use another --out")
        if exc.errno in DISK_FULL:
            return StoreFull(f"no space left on the device while writing {where}; free space "
                             f"under {self.run_dir} and run again: finished jobs are kept")
        if exc.errno in NOT_WRITABLE:
            return NotWritable(f"cannot write {where}: {exc.strerror}; make the run dir writable "
                               "or pass another --out")
        return StoreError(f"cannot write {where}: {exc.strerror or exc}")

    # ------------------------------------------------------------------------- folders
    @contextmanager
    def folder(self, rel_dir: str, create: bool = False) -> Iterator[int]:
        """A descriptor of folder `rel_dir` ("" = the run dir), opened without following links."""
        fd = self._open_folder(rel_dir, create)
        try:
            yield fd
        finally:
            os.close(fd)

    def _open_folder(self, rel_dir: str, create: bool) -> int:
        fd = os.dup(self.fd)
        try:
            for part in _parts(rel_dir):
                child = self._open_child(fd, part, create, rel_dir)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_child(self, parent: int, name: str, create: bool, rel_dir: str) -> int:
        try:
            if create:
                try:
                    os.mkdir(name, 0o755, dir_fd=parent)
                    os.fsync(parent)  # the new folder's entry survives a crash too
                except FileExistsError:
                    pass
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            raise  # callers decide what a missing folder means
        except OSError as exc:
            raise self.error(exc, rel_dir) from exc

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    # ------------------------------------------------------------------------- reading
    def stat(self, rel: str) -> os.stat_result | None:
        """lstat of `rel`, None when it (or its folder) does not exist."""
        folder, name = _split(rel)
        try:
            with self.folder(folder) as fd:
                return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def read(self, rel: str) -> bytes:
        return self.read_head(rel, -1)

    def read_head(self, rel: str, size: int) -> bytes:
        """The first `size` bytes of `rel` (-1: all of it), never through a link."""
        folder, name = _split(rel)
        with self.folder(folder) as dir_fd:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise self.error(exc, rel) from exc
        with os.fdopen(fd, "rb") as handle:
            return handle.read(size)

    def temp_name(self, final: str) -> str:
        return f"{TEMP_PREFIX}{self._token}-{final}"

    # ------------------------------------------------------------------------- writing
    def write(self, files: list[tuple[str, bytes]]) -> dict[str, FileRecord]:
        """Write all files to temp names, then rename them all: none or all become visible
        (short of a crash between renames, which leaves only complete files behind).
        A link or folder at a final name is refused; callers set foreign files aside first."""
        staged: list[tuple[int, str, str, str]] = []  # folder fd, temp name, final name, rel
        try:
            for rel, data in files:
                folder, name = _split(rel)
                dir_fd = self._open_folder(folder, create=True)
                staged.append((dir_fd, self.temp_name(name), name, rel))
                self._write_temp(dir_fd, staged[-1][1], data, rel)
            for dir_fd, temp, name, rel in staged:
                self._refuse_non_file(dir_fd, name, rel)
                os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            records = {rel: self._record(dir_fd, name, data)
                       for (dir_fd, _, name, rel), (_, data) in zip(staged, files)}
            for dir_fd in {fd for fd, *_ in staged}:
                os.fsync(dir_fd)  # make the renames durable, not just the contents
            return records
        except OSError as exc:
            raise self.error(exc, staged[-1][3] if staged else "") from exc
        finally:
            for dir_fd, temp, _, _ in staged:
                _unlink_quietly(temp, dir_fd)  # only left when something failed
                os.close(dir_fd)

    def _write_temp(self, dir_fd: int, temp: str, data: bytes, rel: str) -> None:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                     dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _refuse_non_file(self, dir_fd: int, name: str, rel: str) -> None:
        try:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISREG(mode):
            raise UnsafePath(f"{self.run_dir / rel} is a link or a folder, not an output file; "
                             "remove it, or use another --out")

    @staticmethod
    def _record(dir_fd: int, name: str, data: bytes) -> FileRecord:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return FileRecord(sha256(data), st.st_size, st.st_mtime_ns)

    def move(self, src: str, dst: str) -> bool:
        """Rename `src` to `dst` (a file in the way is set aside first); False when `src` is
        missing. The caller fsyncs the folders (see sync) once for a batch of moves."""
        if self.stat(src) is None:
            return False
        if self.stat(dst) is not None:
            self.set_aside(dst)
        src_folder, src_name = _split(src)
        dst_folder, dst_name = _split(dst)
        with self.folder(src_folder) as src_fd, self.folder(dst_folder, create=True) as dst_fd:
            try:
                os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            except OSError as exc:
                raise self.error(exc, dst) from exc
        return True

    def set_aside(self, rel: str) -> str:
        """Move a file that is not ours out of our way, to modified/<rel> (numbered when that
        is taken). Returns where it went. Nothing found in the run dir is ever deleted."""
        stem, dot, suffix = rel.rpartition(".") if "." in _split(rel)[1] else (rel, "", "")
        target, n = f"{SET_ASIDE}/{rel}", 1
        while self.stat(target) is not None:
            n += 1
            target = f"{SET_ASIDE}/{stem}.{n}{dot}{suffix}"
        self.move(rel, target)
        self.sync({_split(rel)[0], _split(target)[0]})
        return target

    def remove(self, rel: str) -> bool:
        folder, name = _split(rel)
        try:
            with self.folder(folder) as fd:
                os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            return False
        return True

    def remove_empty_folders(self, rel_dirs: set[str]) -> None:
        """rmdir each folder and then its parents while they are empty, deepest first."""
        chain = {"/".join(_parts(d)[:n]) for d in rel_dirs for n in range(1, len(_parts(d)) + 1)}
        for rel_dir in sorted(chain, key=lambda d: -d.count("/")):
            parent, name = _split(rel_dir)
            try:
                with self.folder(parent) as fd:
                    os.rmdir(name, dir_fd=fd)
            except (OSError, StoreError):
                pass  # not empty (or already gone): it stays

    def sync(self, rel_dirs: set[str]) -> None:
        for rel_dir in rel_dirs:
            try:
                with self.folder(rel_dir) as fd:
                    os.fsync(fd)
            except FileNotFoundError:
                pass  # a folder that is gone has nothing left to make durable

    # ------------------------------------------------------------------------- ownership
    def check_owned(self, manifest: str) -> None:
        """Refuse a folder that holds something else: one without a manifest that is neither
        empty nor a run dir whose manifest was moved aside (our .lock and only our names)."""
        names = set(self.names())
        if manifest in names or not names:
            return
        ours = set(OUR_FOLDERS) | set(ROOT_FILES) | {LOCK_FILE, SET_ASIDE, "report.html",
                                                    "thumbs", "sheets", "grids"}
        foreign = {n for n in names if n not in ours and not n.startswith(manifest)}
        if LOCK_FILE in names and not foreign:
            return
        example = sorted(foreign or names)[0]
        raise NotARunDir(f"{self.run_dir} is not a run directory: it has no manifest.sqlite but "
                         f"holds other files (e.g. {example!r}); nothing in it was touched. "
                         "Pass a new or empty folder as --out")

    def take_lock(self) -> tuple[int, bool]:
        """The writer lock: an flock on .lock (a link or a hard-linked file is refused).
        Returns the descriptor and whether .lock was made now (so a refusal can remove it)."""
        flags = os.O_RDWR | os.O_NOFOLLOW
        try:
            try:
                fd, made = os.open(LOCK_FILE, flags | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=self.fd), True
            except FileExistsError:
                fd, made = os.open(LOCK_FILE, flags, dir_fd=self.fd), False
        except OSError as exc:
            raise self.error(exc, LOCK_FILE) from exc
        try:
            self.refuse_shared_inode(fd, LOCK_FILE)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"run dir {self.run_dir} is in use by pid {holder}; "
                            "wait for it or use another --out") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError:
            pass  # the pid is only a hint in RunLocked's message; a full disk must not stop here
        return fd, made

    def refuse_shared_inode(self, fd: int, rel: str) -> None:
        """A hard link shares its file with a path outside the run dir: writing it writes there."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            raise UnsafePath(f"{self.run_dir / rel} is hard-linked or not a plain file; the "
                             "store never writes a file shared with another path: remove it")

    def sweep_temp_files(self) -> list[str]:
        """Remove temp files a killed writer left (we hold the lock, so none is in use): only
        names of our exact temp pattern, only in the folders the store makes (never following a
        link), and in the run dir itself only temps of the files the store writes there."""
        removed = []
        for name in self.names():
            match = _OUR_TEMP.match(name)
            if match and match["final"] in ROOT_FILES and _unlink_quietly(name, self.fd):
                removed.append(name)
        for top in OUR_FOLDERS:
            top_stat = self.stat(top)
            if top_stat is None or not stat.S_ISDIR(top_stat.st_mode):
                continue  # missing, or a link: fwalk must not follow it out of the run dir
            for folder, _, names, fd in os.fwalk(top, dir_fd=self.fd):
                removed += [f"{folder}/{n}" for n in names
                            if _OUR_TEMP.match(n) and _unlink_quietly(n, fd)]
        return removed


# ----------------------------------------------------------------------------- helpers
def _parts(rel_dir: str) -> list[str]:
    parts = [p for p in rel_dir.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise UnsafePath(f"{rel_dir!r} leaves the run dir")  # manifest paths never do this
    return parts


def _split(rel: str) -> tuple[str, str]:
    folder, _, name = rel.rpartition("/")
    return folder, name


def _unlink_quietly(name: str, dir_fd: int) -> bool:
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def _first_odd_part(run_dir: Path, rel: str) -> Path:
    """The first component of `rel` that is a link or not a folder, for the message."""
    path = run_dir
    for part in _parts(rel):
        path = path / part
        if path.is_symlink() or not path.is_dir():
            return path
    return path
