"""`export`: kept images to a flat folder or a zip, with manifests that match the PNGs' own chunks.

Run directories are real: synthetic ones go through the real RunStore (helpers_rundir), and one
is made by the real `run` command with the tiny model. Changes a later issue makes to a manifest
(a `superseded` status, a `picked` column) are written into the real SQLite file.
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from helpers_rundir import attempt, kept, open_run, write_mixed_run
from omnigen2_batch.cli import main
from omnigen2_batch.export import NO_PICKS, export_run
from omnigen2_batch.jobs import Attempt, Job, JobResult, Scoring
from omnigen2_batch.store import RunStore

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = {"manifest.jsonl", "manifest.csv"}
TINY_RECIPE = """\
name: export-test
model: tiny
batch_size: 2
defaults:
  size: [80, 64]
  steps: 2
  max_attempts: 2
  scoring: {model: tiny-clip, pretrained: random, thresholds: {text: -1}}
prompts:
  - name: animals
    prompt: "a {animal}"
    negative_prompt: "blurry"
    matrix: {animal: [cat, fox]}
"""


# ------------------------------------------------------------------------------ helpers
def export_cli(*args: str):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def sql(run: Path, statement: str, *params) -> list[tuple]:
    with sqlite3.connect(run / "manifest.sqlite") as db:
        return db.execute(statement, params).fetchall()


def kept_ids(run: Path) -> list[str]:
    return [row[0] for row in sql(run, "SELECT id FROM jobs WHERE status='kept' ORDER BY ord, id")]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root -> (size, mtime); SQLite's own -wal/-shm housekeeping aside."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def folder_files(dest: Path) -> dict[str, bytes]:
    assert all(p.is_file() for p in dest.iterdir()), "the export is flat"
    return {p.name: p.read_bytes() for p in dest.iterdir()}


def zip_files(dest: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(dest) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def png_chunk(data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as image:
        return json.loads(image.text["omnigen2_batch"])


def flat(record: dict) -> dict[str, str]:
    """A JSONL record as the CSV writes it: nested dicts as key.sub, lists as JSON, all text."""
    out = {}
    for key, value in record.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, inner in items:
            text = (json.dumps(inner, ensure_ascii=False) if isinstance(inner, (list, dict))
                    else "" if inner is None else str(inner))
            out[key if sub is None else f"{key}.{sub}"] = text
    return out


def check_export(run: Path, files: dict[str, bytes]) -> list[dict]:
    """The manifests agree with each other, with the run's kept files and with the PNG chunks."""
    records = [json.loads(line) for line in files["manifest.jsonl"].decode().splitlines()]
    rows = list(csv.DictReader(io.StringIO(files["manifest.csv"].decode())))
    assert len(rows) == len(records)
    for row, record in zip(rows, records):  # the same record; CSV leaves others' columns empty
        assert {key: value for key, value in row.items() if value != ""} == {
            key: value for key, value in flat(record).items() if value != ""}
    assert set(files) == MANIFESTS | {record["file"] for record in records}
    for record in records:
        data = files[record["file"]]
        assert data == (run / record["source"]).read_bytes()
        chunk = png_chunk(data)
        assert chunk["job_id"] == record["job_id"] and chunk["status"] == "kept"
        assert chunk["attempt"]["seed"] == record["seed"]
        assert chunk["identity"]["prompt"] == record["prompt"]
        assert chunk["attempt"]["scores"] == record["score"]
    return records


@pytest.fixture
def mixed_run(tmp_path: Path) -> Path:
    return write_mixed_run(tmp_path / "run", tmp_path / "refs")


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dest_exists", [False, True])
def test_folder_export_round_trips_every_kept_image(mixed_run, tmp_path, dest_exists):
    if dest_exists:
        (tmp_path / "out").mkdir()  # an empty folder is as good as a new one
    before = tree(mixed_run)
    result = export_cli(mixed_run, tmp_path / "out")
    assert result.exit_code == 0, result.output
    records = check_export(mixed_run, folder_files(tmp_path / "out"))
    assert [r["job_id"] for r in records] == kept_ids(mixed_run)  # plan order; no rejected etc.
    zh = next(r for r in records if r["lang"] == "zh" and r["pair"] == "pair0")
    assert zh["prompt"] == "屋顶上的猫" and zh["section"] == "bilingual/节日"
    assert tree(mixed_run) == before  # the run dir is only read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "refs", "run"]  # no temp left


def test_zip_export_round_trips_and_replaces_an_old_zip_whole(mixed_run, tmp_path):
    dest = tmp_path / "images.zip"
    dest.write_bytes(b"an older export")
    result = export_cli(mixed_run, dest)
    assert result.exit_code == 0, result.output
    records = check_export(mixed_run, zip_files(dest))
    assert [r["job_id"] for r in records] == kept_ids(mixed_run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.zip", "refs", "run"]


def test_a_real_run_exports_the_parameters_it_used(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY_RECIPE)
    run = tmp_path / "run"
    made = CliRunner().invoke(main, ["run", str(recipe), "--out", str(run), "--json"])
    assert made.exit_code == 0, made.output
    result = export_cli(run, tmp_path / "out.zip", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["exported"] == 2
    for record in check_export(run, zip_files(tmp_path / "out.zip")):
        params = png_chunk(zip_files(tmp_path / "out.zip")[record["file"]])["attempt"]["params"]
        assert (record["width"], record["height"], record["steps"]) == (80, 64, 2)
        for key in ("text_guidance", "image_guidance", "cfg_range", "scheduler"):
            assert record[key] == params[key]
        assert record["negative_prompt"] == "blurry" and record["model"] == "tiny"
        assert "text" in record["score"]


# ------------------------------------------------------------------------------ which attempt
def two_attempt_run(root: Path) -> Path:
    """One kept job whose second attempt (new seed, stronger guidance) made the image."""
    job = Job("prompts", "bird", "t2i", "a blue bird", negative_prompt="blurry", seed=7, steps=3,
              width=64, height=48, model="tiny", scoring=Scoring(thresholds={"text": 0.2}))
    used = {"steps": 3, "width": 64, "height": 48, "cfg_range": [0.0, 1.0], "scheduler": "euler",
            "image_guidance": 2.0}
    first = Attempt(0, 7, "initial", "first attempt", {**used, "text_guidance": 5.0},
                    {"text": 0.1}, False, ("text",), 1.0, attempt(0, {}, False).image)
    second = Attempt(1, 8, "stronger_guidance", "text too low", {**used, "text_guidance": 7.5},
                     {"text": 0.3}, True, (), 1.0, attempt(1, {}, True).image)
    with open_run(root, "two attempts") as store:
        store.commit(job, JobResult(job.id, "kept", [first, second], best=1))
    return root


@pytest.mark.parametrize("best_recorded", [True, False])
def test_the_record_is_of_the_attempt_that_made_the_image(tmp_path, best_recorded):
    run = two_attempt_run(tmp_path / "run")
    if not best_recorded:  # a run from before jobs.best: the PNG's own chunk says which
        sql(run, "UPDATE jobs SET best=NULL")
    result = export_run(run, tmp_path / "out")
    (record,) = result.records
    assert (record["seed"], record["strategy"], record["attempt"], record["attempts"]) == (
        8, "stronger_guidance", 1, 2)
    assert record["text_guidance"] == 7.5 and record["score"] == {"text": 0.3}
    check_export(run, folder_files(tmp_path / "out"))


# ------------------------------------------------------------------------------ what is left out
def test_superseded_jobs_are_skipped_and_missing_images_listed_with_exit_1(mixed_run, tmp_path):
    gone, superseded, *rest = kept_ids(mixed_run)
    sql(mixed_run, "UPDATE jobs SET status='superseded' WHERE id=?", superseded)
    (image,) = sql(mixed_run, "SELECT image FROM jobs WHERE id=?", gone)[0]
    (mixed_run / image).unlink()
    result = export_cli(mixed_run, tmp_path / "out", "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert (report["ok"], report["exported"], report["not_exported"]) == (False, len(rest), 1)
    assert report["errors"][0]["job_id"] == gone and image in report["errors"][0]["error"]
    records = check_export(mixed_run, folder_files(tmp_path / "out"))
    assert [r["job_id"] for r in records] == rest


def test_flat_names_are_unique_and_safe(tmp_path):
    labels = [("a/b", "c"), ("a_b", "c"), ("../..", "../../etc/passwd"), (".hidden", "-rf *"),
              ("长/" * 60, "名" * 60), ("S", "Same"), ("s", "same")]
    with open_run(tmp_path / "run", "names") as store:
        for i, (section, name) in enumerate(labels):
            kept(store, Job(section, name, "t2i", f"prompt {i}", model="tiny"), {"text": 0.3})
    assert export_cli(tmp_path / "run", tmp_path / "out").exit_code == 0
    names = [p.name for p in (tmp_path / "out").iterdir()]
    assert len(names) == len(labels) + 2 and len({n.casefold() for n in names}) == len(names)
    for name in names:
        assert "/" not in name and not name.startswith((".", "-")) and len(name.encode()) <= 255
    check_export(tmp_path / "run", folder_files(tmp_path / "out"))


# ------------------------------------------------------------------------------ refusals
def refused(result, tmp_path: Path, before: dict, message: str) -> None:
    """Exit 2, one clear line, no traceback, nothing written anywhere."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0 and message in result.output
    assert tree(tmp_path) == before


def test_refuses_a_dest_inside_the_run_dir_even_through_a_link(mixed_run, tmp_path):
    (tmp_path / "link").symlink_to(mixed_run)
    before = tree(tmp_path)
    for dest in (mixed_run / "export", mixed_run / "kept" / "x.zip", mixed_run, tmp_path / "link" / "x"):
        refused(export_cli(mixed_run, dest), tmp_path, before, "inside the run dir")


def test_refuses_a_non_empty_folder_without_force(mixed_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    refused(export_cli(mixed_run, tmp_path / "out"), tmp_path, before, "--force")


def test_refuses_what_is_not_a_run_dir_or_not_a_place_to_write(mixed_run, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "file.txt").write_text("x")
    before = tree(tmp_path)
    refused(export_cli(tmp_path / "plain", tmp_path / "out"), tmp_path, before, "not a run directory")
    refused(export_cli(tmp_path / "nowhere", tmp_path / "out"), tmp_path, before, "not a run directory")
    refused(export_cli(mixed_run, tmp_path / "file.txt" / "out"), tmp_path, before, "does not exist")
    refused(export_cli(mixed_run, tmp_path / "file.txt"), tmp_path, before, "not a folder")
    refused(export_cli(mixed_run, tmp_path / "refs.zip" / "x"), tmp_path, before, "does not exist")


def test_force_replaces_only_the_files_the_export_writes(mixed_run, tmp_path):
    first = export_run(mixed_run, tmp_path / "out")
    stale = tmp_path / "out" / first.records[0]["file"]
    stale.write_bytes(b"stale")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "sub").mkdir()
    result = export_cli(mixed_run, tmp_path / "out", "--force")
    assert result.exit_code == 0, result.output
    files = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert files.pop("notes.txt") == b"mine" and (tmp_path / "out" / "sub").is_dir()
    check_export(mixed_run, files)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_json_reports_success_and_refusal(mixed_run, tmp_path):
    ok = export_cli(mixed_run, tmp_path / "out.zip", "--json")
    report = json.loads(ok.output)
    assert ok.exit_code == 0 and report["ok"] and report["errors"] == []
    assert report["dest"] == str((tmp_path / "out.zip").resolve())
    assert report["exported"] == report["kept"] == len(kept_ids(mixed_run))
    bad = export_cli(mixed_run, mixed_run / "x", "--json")
    report = json.loads(bad.output)
    assert bad.exit_code == 2 and not report["ok"] and report["exit_code"] == 2
    assert "inside the run dir" in report["errors"][0]["message"]


# ------------------------------------------------------------------------------ picks
def test_picked_without_picks_says_how_to_pick(mixed_run, tmp_path):
    before = tree(tmp_path)
    refused(export_cli(mixed_run, tmp_path / "out", "--picked"), tmp_path, before, NO_PICKS)


@pytest.mark.parametrize("where", ["column", "meta"])
def test_picked_exports_only_the_picked_images(mixed_run, tmp_path, where):
    chosen = kept_ids(mixed_run)[1::3]
    if where == "column":
        sql(mixed_run, "ALTER TABLE jobs ADD COLUMN picked INT DEFAULT 0")
        for job_id in chosen:
            sql(mixed_run, "UPDATE jobs SET picked=1 WHERE id=?", job_id)
    else:
        sql(mixed_run, "INSERT INTO meta VALUES('picks', ?)", json.dumps(chosen))
    result = export_cli(mixed_run, tmp_path / "out", "--picked")
    assert result.exit_code == 0, result.output
    records = check_export(mixed_run, folder_files(tmp_path / "out"))
    assert [r["job_id"] for r in records] == chosen


# ------------------------------------------------------------------------------ a full disk
@pytest.mark.parametrize("dest_name", ["out", "out.zip"])
def test_a_write_that_fails_midway_leaves_nothing_and_exits_1(mixed_run, tmp_path, dest_name):
    """RLIMIT_FSIZE makes the kernel refuse writes past 2000 bytes (EFBIG), as a full disk would
    refuse them: a real failed write, in a child process so the limit stays there."""
    before = tree(tmp_path)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    # A reader held open here sets up SQLite's 32 KiB shared-memory file, which the child could
    # not (the limit applies to it too): only the export's own writes hit the limit.
    with RunStore.open(mixed_run, readonly=True) as reader:
        reader.meta()
        done = subprocess.run([sys.executable, str(REPO / "cli.py"), "export", str(mixed_run),
                               str(tmp_path / dest_name)], capture_output=True, text=True, env=env,
                              preexec_fn=limit_file_size, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: cannot write")
    assert done.stderr.strip().count("\n") == 0 and "nothing was left half-written" in done.stderr
    assert tree(tmp_path) == before
