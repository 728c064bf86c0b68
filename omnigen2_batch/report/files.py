"""Writing the report's files into the run dir, and the one error the report raises.

Every file goes to a temp name of its own, then is renamed over the final name. Several
`report` commands may run on one run dir at once (and a run's end writes a report too): each
writer's temp names are unique (pid + random), each removes only its own, and a reader sees the
old file or the new one, never half of one. A write that fails (disk full, read-only folder)
leaves the previous file as it was.
"""
from __future__ import annotations

import errno
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..store import DISK_FULL, TEMP_PREFIX


class ReportError(UserError):
    """The report cannot be written; the message says why and what to do."""


def temp_path(path: Path) -> Path:
    """A name no other writer uses; the store's prefix lets a run's sweep remove a killed writer's."""
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}-{path.name}")


def is_temp(path: Path) -> bool:
    return path.name.startswith(TEMP_PREFIX)


def write_atomic(path: Path, data: bytes, durable: bool = False) -> Path:
    """Write `data` to `path` all or nothing. `durable` also syncs it to disk (for the page)."""
    refuse_links(path.parent)
    for _ in range(3):  # a run that starts meanwhile sweeps every temp file: write ours again
        temp = temp_path(path)
        try:
            path.parent.mkdir(exist_ok=True)  # not parents: never recreate a run dir deleted meanwhile
            with open(temp, "xb") as out:
                out.write(data)
                if durable:
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(temp, path)
            return path
        except FileNotFoundError as exc:
            if not path.parent.is_dir():
                raise cannot_write(path, exc) from exc
        except OSError as exc:
            raise cannot_write(path, exc) from exc
        finally:
            temp.unlink(missing_ok=True)  # ours alone; gone already after the rename
    raise ReportError(f"cannot write {path}: its temp file kept disappearing; "
                      "is another program deleting files in the run dir?")


def refuse_links(folder: Path) -> None:
    """The report writes only into real folders of the (resolved) run dir: a thumbs/ or sheets/
    that is a link would send its files somewhere else."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    if os.path.realpath(existing) != os.path.abspath(existing):
        raise ReportError(f"{existing} is a link (or lies behind one); the report never writes "
                          "through links: remove it, then run `omnigen2-batch report` again")


@contextmanager
def report_errors(run_dir: Path) -> Iterator[None]:
    """Any other OS error (making thumbs/, removing an old sheet) as a ReportError naming its path."""
    try:
        yield
    except OSError as exc:
        raise cannot_write(Path(exc.filename or run_dir), exc) from exc


def cannot_write(path: Path, exc: OSError) -> ReportError:
    full = exc.errno in DISK_FULL or exc.errno == errno.EFBIG
    why = "no space left on the device" if full else (exc.strerror or str(exc))
    action = "free some space" if full else "make the run dir writable"
    return ReportError(f"cannot write the report at {path}: {why}; the previous report was left "
                       f"as it was. {action.capitalize()}, then run `omnigen2-batch report` again.")
