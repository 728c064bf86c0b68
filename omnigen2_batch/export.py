"""Export a run's kept images to a flat folder or a zip, with a manifest a spreadsheet can open.

The export is for people and other tools downstream of a run: every kept image under a flat,
unique, filesystem-safe name, plus `manifest.jsonl` and `manifest.csv` that hold the same records
(what was asked, the seed and parameters actually used, the scores). The PNG bytes are copied
as they are, so their own text chunks travel with them.

Safety, in order of importance: nothing inside the run dir is written; nothing at DEST that this
export would not write is deleted; a crash leaves no half export at DEST. Everything is first
written beside DEST under a hidden temp name and renamed into place at the end.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import shutil
import sqlite3
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import EXIT_USER, BatchError
from .store import RunStore, StoreError
from .store.variants import PICKS, pick_key, ranking_of

MANIFEST_JSONL = "manifest.jsonl"
MANIFEST_CSV = "manifest.csv"
TEMP_PREFIX = ".tmp-export-"
NO_PICKS = "no picks in this run; use `omnigen2-batch pick`"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Parameters whose used value is in the attempt's params (reflection may change them per
# attempt); the job's value stands in for records written before params carried them.
ATTEMPT_PARAMS = ("steps", "width", "height", "text_guidance", "image_guidance", "cfg_range",
                  "scheduler")
# CSV columns in this order first; any others (score.*, params.*) follow, sorted.
COLUMNS = ("file", "section", "name", "job_id", "kind", "lang", "pair", "prompt",
           "negative_prompt", "seed", "variant", "strategy", "attempt", "attempts", *ATTEMPT_PARAMS,
           "model", "max_input_side", "source")
NAME_BYTES = 200  # stem budget: file names are limited to 255 bytes on common filesystems


class ExportError(BatchError):
    """The export cannot be made; the message says why. exit_code 2: bad input, 1: I/O."""

    def __init__(self, message: str, exit_code: int = EXIT_USER):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class ExportResult:
    dest: str
    kind: str  # "folder" | "zip"
    kept: int = 0  # kept jobs considered (after --picked)
    records: list[dict[str, Any]] = field(default_factory=list)  # one per exported image
    problems: list[dict[str, str]] = field(default_factory=list)  # kept images not exported

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "dest": self.dest, "kind": self.kind, "kept": self.kept,
                "exported": len(self.records), "not_exported": len(self.problems),
                "errors": self.problems}


def export_run(run_dir: str | os.PathLike, dest: str | os.PathLike, *, picked: bool = False,
               force: bool = False) -> ExportResult:
    """Write RUN_DIR's kept images and their manifest to DEST (a folder, or a `.zip` file)."""
    entries, problems = _plan_entries(Path(run_dir).resolve(), picked)  # is it a run dir?
    dest_path = _checked_dest_path(run_dir, dest)
    as_zip = dest_path.suffix.lower() == ".zip"
    _check_dest(dest_path, as_zip, force)
    result = ExportResult(str(dest_path), "zip" if as_zip else "folder",
                          kept=len(entries) + len(problems), problems=problems)
    writer = _write_zip if as_zip else _write_folder
    try:
        writer(dest_path, entries, result)
    except OSError as exc:
        raise _io_error(exc, dest_path) from exc
    return result


# --------------------------------------------------------------------------------- checks
def _checked_dest_path(run_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    run_path, dest_path = Path(run_dir).resolve(), Path(dest).resolve()  # symlinks too
    if dest_path == run_path or run_path in dest_path.parents:
        raise ExportError(f"{dest} is inside the run dir {run_dir}; export somewhere else "
                          "(a run dir is never written into)")
    if not dest_path.parent.is_dir():
        raise ExportError(f"cannot export to {dest}: the folder {dest_path.parent} does not exist")
    return dest_path


def _check_dest(dest: Path, as_zip: bool, force: bool) -> None:
    if as_zip:
        if dest.exists() and not dest.is_file():
            raise ExportError(f"{dest} exists and is not a file; pick another .zip name")
        return  # an existing zip is replaced whole, atomically
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{dest} exists and is not a folder; pick another DEST")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise ExportError(f"{dest} is not empty; pick an empty or new folder, or pass --force "
                          "to replace only the files this export writes")


# --------------------------------------------------------------------------------- reading
@dataclass
class Entry:
    source: Path  # the kept image in the run dir
    record: dict[str, Any]


def _plan_entries(run_dir: Path, picked: bool) -> tuple[list[Entry], list[dict[str, str]]]:
    """What to export, in plan order, and the kept jobs that cannot be (with the reason)."""
    try:
        with RunStore.open(run_dir, readonly=True) as store:
            rows = [_with_variants(row) for row in store.jobs() if row["status"] == "kept"]
            if picked:
                rows = _only_picked(rows, store.meta())
            attempts = {row["id"]: store.attempts(row["id"]) for row in rows}
    except StoreError as exc:
        raise ExportError(str(exc)) from None
    except sqlite3.OperationalError as exc:  # I/O, not the person's input
        raise ExportError(f"{run_dir}: the manifest cannot be read ({exc})", exit_code=1) from None
    except sqlite3.DatabaseError as exc:  # not a database, or a damaged one
        raise ExportError(f"{run_dir}: the manifest cannot be read ({exc}); is this a run dir?") from None
    entries, problems, names = [], [], set()
    for row in rows:
        for variant in row["export"]:
            try:
                entries.append(_entry(run_dir, {**row, **variant}, attempts[row["id"]], names))
            except ExportError as exc:
                problems.append(_problem(row["id"], row["section"], row["name"], str(exc)))
    return entries, problems


def _with_variants(row: dict[str, Any]) -> dict[str, Any]:
    """The row with "export": each of its images (rank 1 is the job's image; a job that keeps
    several variants exports each as its own record)."""
    ranking = ranking_of(row.get("variants"))
    images = [{"variant": v["rank"], "image": v["image"], "best": v["n"]} for v in ranking]
    return {**row, "export": images or [{"variant": 1}]}


def _only_picked(rows: list[dict[str, Any]], meta: dict[str, str]) -> list[dict[str, Any]]:
    """Rows with only their picked images: a `picks` meta key (what `pick` writes: "<job id>"
    or "<job id>:v<rank>"), or a `picked` column (the job's image)."""
    if rows and "picked" in rows[0]:
        chosen = {pick_key(row["id"], 1) for row in rows if row["picked"]}
    else:
        chosen = set(json.loads(meta.get(PICKS) or "[]"))
    rows = [{**row, "export": [v for v in row["export"]
                               if pick_key(row["id"], v["variant"]) in chosen]} for row in rows]
    rows = [row for row in rows if row["export"]]
    if not rows:
        raise ExportError(NO_PICKS)
    return rows


def _entry(run_dir: Path, row: dict[str, Any], attempts: list[dict[str, Any]],
           names: set[str]) -> Entry:
    if not row.get("image"):
        raise ExportError("kept, but the manifest names no image file")
    source = run_dir / row["image"]
    if not source.is_file():
        raise ExportError(f"image file missing: {row['image']}")
    attempt = _kept_attempt(row, attempts, source)
    record = _record(row, attempt, _flat_name(row, names))
    return Entry(source, {**record, "variant": row["variant"]})


def _kept_attempt(row: dict[str, Any], attempts: list[dict[str, Any]], source: Path) -> dict[str, Any]:
    """The attempt that made the image: jobs.best, else (older runs) the PNG's own chunk."""
    number = row.get("best")
    if number is None:
        number = _chunk(source).get("attempt", {}).get("n")
    for attempt in attempts:
        if attempt["n"] == number:
            return attempt
    raise ExportError("the manifest does not say which attempt made the image")


def _chunk(path: Path) -> dict[str, Any]:
    from PIL import Image  # only for runs that predate jobs.best

    try:
        with Image.open(path) as image:
            return json.loads(image.text.get("omnigen2_batch", "{}"))
    except (OSError, ValueError):
        return {}


def _record(row: dict[str, Any], attempt: dict[str, Any], file: str) -> dict[str, Any]:
    job = row["job"]
    params = dict(attempt.get("params") or {})
    used = {key: params.pop(key, job.get(key)) for key in ATTEMPT_PARAMS}
    if params.get("prompt") == job["prompt"]:
        del params["prompt"]  # left only when the attempt ran another prompt (a refine edit)
    return {
        "file": file, "section": row["section"], "name": row["name"], "job_id": row["id"],
        "kind": row["kind"], "lang": row["lang"], "pair": (job.get("scoring") or {}).get("pair", ""),
        "prompt": job["prompt"], "negative_prompt": job.get("negative_prompt", ""),
        "seed": attempt["seed"], "strategy": attempt["strategy"], "attempt": attempt["n"],
        "attempts": row["n_attempts"], **used, "model": job.get("model"),
        "max_input_side": job.get("max_input_side"), "source": row["image"],
        "score": attempt.get("scores") or {}, "params": params,
    }


def _problem(job_id: str, section: str, name: str, error: str) -> dict[str, str]:
    return {"job_id": job_id, "section": section, "name": name, "error": error}


# --------------------------------------------------------------------------------- names
def _flat_name(row: dict[str, Any], taken: set[str]) -> str:
    """`<section>__<name>-<id8>.png`, unique even on case-insensitive filesystems."""
    variant = f"-v{row['variant']}" if row.get("variant", 1) > 1 else ""
    stem = _clip_bytes(f"{_safe(row['section'])}__{_safe(row['name'])}", NAME_BYTES) + variant
    for suffix in (row["id"][:8], row["id"]):  # the full id only when the prefix collides
        name = f"{stem}-{suffix}.png"
        if name.casefold() not in taken:
            taken.add(name.casefold())
            return name
    raise ExportError(f"two kept images share the id {row['id']}{variant}")  # the manifest's key: cannot be


def _safe(label: str) -> str:
    """Word characters (any script), dots and dashes; never a leading dot or dash."""
    return re.sub(r"[^\w.-]+", "_", label).strip("._-") or "_"


def _clip_bytes(text: str, limit: int) -> str:
    return text.encode()[:limit].decode(errors="ignore")  # never cut a character in half


# --------------------------------------------------------------------------------- writing
def _images(entries: list[Entry], result: ExportResult) -> Iterator[tuple[Entry, bytes]]:
    """Each entry's bytes; one unreadable since planning (moved by a concurrent `score`) is a
    problem of that job, not of the export."""
    for entry in entries:
        record = entry.record
        try:
            data = entry.source.read_bytes()
        except OSError as exc:
            result.problems.append(_problem(record["job_id"], record["section"], record["name"],
                                            f"cannot read {record['source']}: {exc.strerror or exc}"))
            continue
        result.records.append(entry.record)
        yield entry, data


def _write_folder(dest: Path, entries: list[Entry], result: ExportResult) -> None:
    temp = dest.with_name(f"{TEMP_PREFIX}{os.getpid()}-{dest.name}")
    temp.mkdir()
    try:
        for entry, data in _images(entries, result):
            _write_synced(temp / entry.record["file"], data)
        for name, data in _manifests(result.records):
            _write_synced(temp / name, data)
        _move_into_place(temp, dest)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # our own temp folder: only what we wrote


def _move_into_place(temp: Path, dest: Path) -> None:
    """One rename when DEST is new (or an empty folder); file by file into an existing folder
    (--force), which replaces only the files this export writes."""
    if not dest.exists() or not any(dest.iterdir()):
        os.replace(temp, dest)
        _fsync_dir(dest.parent)
        return
    names = sorted(os.listdir(temp))
    blocked = [name for name in names if (dest / name).is_dir()]
    if blocked:
        raise ExportError(f"{dest / blocked[0]} is a folder where this export writes a file; "
                          "move it away or pick another DEST")
    for name in names:
        os.replace(temp / name, dest / name)
    _fsync_dir(dest)


def _write_zip(dest: Path, entries: list[Entry], result: ExportResult) -> None:
    temp = dest.with_name(f"{TEMP_PREFIX}{os.getpid()}-{dest.name}")
    try:
        with open(temp, "wb") as stream:
            with zipfile.ZipFile(stream, "w") as archive:
                for entry, data in _images(entries, result):
                    # PNGs are already deflated: storing them is as small and much faster.
                    archive.writestr(entry.record["file"], data, zipfile.ZIP_STORED)
                for name, data in _manifests(result.records):
                    archive.writestr(name, data, zipfile.ZIP_DEFLATED)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, dest)
        _fsync_dir(dest.parent)
    finally:
        temp.unlink(missing_ok=True)


def _manifests(records: list[dict[str, Any]]) -> list[tuple[str, bytes]]:
    jsonl = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return [(MANIFEST_JSONL, jsonl.encode()), (MANIFEST_CSV, _csv_text(records).encode())]


def _csv_text(records: list[dict[str, Any]]) -> str:
    rows = [_flatten(record) for record in records]
    extra = sorted({key for row in rows for key in row} - set(COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, *extra], restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _flatten(record: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts become `key.subkey` columns; lists are written as JSON text."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": _cell(inner) for sub, inner in value.items()})
        else:
            flat[key] = _cell(value)
    return flat


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else value


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _io_error(exc: OSError, dest: Path) -> ExportError:
    """A full disk or a failing device: exit 1; a DEST one cannot write to (bad input): exit 2."""
    if exc.errno in DISK_FULL:
        return ExportError(f"cannot write {dest}: {exc.strerror}; free space and export again "
                           "(nothing was left half-written)", exit_code=1)
    return ExportError(f"cannot write {exc.filename or dest}: {exc.strerror or exc}; nothing was "
                       "exported", exit_code=1 if exc.errno == errno.EIO else 2)
