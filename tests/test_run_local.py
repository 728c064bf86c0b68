"""The local executor and the driver: DAG order, micro-batches, failures, reruns, a full disk.

End-to-end tests run the real tiny OmniGen2 pipeline and the real tiny CLIP scorer (random
weights) on 64x64 images with 2 steps: well under a second each once the model code is
imported, so only the Ray variant of the executor contract is marked slow.
"""
import errno
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from omnigen2_batch.cli import main
from omnigen2_batch.config import RunConfig

from omnigen2_batch.executors.local import LocalExecutor
from omnigen2_batch.executors.driver import Driver, MicroBatch, failed_result, run_isolated
from omnigen2_batch.jobs import Attempt, ImageRef, Job, JobResult
from omnigen2_batch.plan import build_plan
from omnigen2_batch.recipe import load_recipe
from omnigen2_batch.store import TEMP_PREFIX, RunStore
from omnigen2_batch.run import run_jobs

TINY_RECIPE = """\
name: tiny-test
model: tiny
batch_size: 2
defaults:
  size: [64, 64]
  steps: 2
  max_attempts: 2
  scoring: {model: tiny-clip, pretrained: random, thresholds: {text: -1}}
prompts:
  - name: animals
    prompt: "a {animal}"
    matrix: {animal: [cat, fox]}
characters:
  robo: {portrait: "a round white robot", scoring: {thresholds: {text: 1.0}}}
  mira: {references: [mira.png]}
series:
  - character: robo
    shots: ["robo reading"]
  - character: mira
    shots: ["mira at sea"]
edits:
  - name: night
    inputs: [street.png]
    instructions: ["make it night"]
    size: [64, 64]
"""
PROMPTS_ONLY = TINY_RECIPE.split("characters:")[0]


def write_tiny_recipe(folder: Path, text: str = TINY_RECIPE) -> Path:
    """A recipe and its two small input images in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.radial_gradient("L").convert("RGB").resize((64, 64)).save(folder / "mira.png")
    Image.linear_gradient("L").convert("RGB").resize((64, 64)).save(folder / "street.png")
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def plan_of(recipe: Path):
    return build_plan(load_recipe(recipe))


def image_files(run_dir: Path) -> dict[str, int]:
    """Every image file under the run dir -> its mtime."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*.png")}


def manifest_rows(run_dir: Path) -> list:
    with sqlite3.connect(run_dir / "manifest.sqlite") as conn:
        return (conn.execute("SELECT * FROM jobs ORDER BY id").fetchall()
                + conn.execute("SELECT * FROM attempts ORDER BY job_id, n").fetchall())


@pytest.fixture
def worker(tmp_path):
    """A fresh worker per test (60 ms once the model code is imported): its scorer caches
    embeddings, which is state."""
    from omnigen2_batch.worker import build_worker

    plan = plan_of(write_tiny_recipe(tmp_path / "settings"))
    return build_worker(plan.config.with_(device="cpu"))


UNSCORED_TINY = RunConfig(model="tiny", device="cpu", score=False)


def local(worker, batch_size: int = 4) -> LocalExecutor:
    """The local executor with a ready worker."""
    return LocalExecutor(UNSCORED_TINY.with_(batch_size=batch_size), worker)


def by_name(store: RunStore) -> dict[str, dict]:
    return {row["name"]: row for row in store.jobs()}


def test_outcomes_then_reruns_retry_only_failed_jobs(tmp_path, worker):
    recipe = write_tiny_recipe(tmp_path / "in")
    plan = plan_of(recipe)
    Path(tmp_path / "in" / "street.png").write_bytes(b"\x89PNG\r\n")  # broken after planning
    run_dir = tmp_path / "run"
    with RunStore.open(run_dir) as store:
        store.add_jobs(plan.jobs)
        summary = run_jobs(plan.jobs, store, UNSCORED_TINY, executor=local(worker, 2))
        rows = by_name(store)
    assert (summary.total, summary.kept, summary.rejected, summary.failed, summary.pending) == (6, 3, 1, 2, 0)
    assert summary.exit_code == 1 and summary.ran == 6
    assert {n for n, r in rows.items() if r["status"] == "kept"} == {"a-cat", "a-fox", "mira-at-sea"}
    assert rows["portrait"]["status"] == "rejected" and rows["portrait"]["n_attempts"] == 2
    assert "anchor characters/robo/portrait" in rows["robo-reading"]["error"]
    assert "was rejected" in rows["robo-reading"]["error"]
    assert rows["robo-reading"]["n_attempts"] == 0  # never generated
    edit = next(r for r in rows.values() if r["section"] == "edits/night")
    assert edit["status"] == "failed" and "ImageError" in edit["error"] and "street.png" in edit["error"]
    for row in rows.values():
        assert (row["image"] is not None) == (row["status"] in ("kept", "rejected"))
        if row["image"]:
            with Image.open(run_dir / row["image"]) as image:
                assert image.size == (64, 64) and "noise" in image.text["parameters"]
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(TEMP_PREFIX)]

    before = image_files(run_dir)
    with RunStore.open(run_dir) as store:
        # Failed jobs run again: the edit fails again, and so does the shot of the rejected anchor.
        again = run_jobs(plan.jobs, store, UNSCORED_TINY, executor=local(worker))
    assert (again.ran, again.failed, again.kept) == (2, 2, 3)
    assert image_files(run_dir) == before

    write_tiny_recipe(tmp_path / "in")  # the edit input is readable again, same pixels
    with RunStore.open(run_dir) as store:
        healed = run_jobs(plan.jobs, store, UNSCORED_TINY, executor=local(worker))
        edit = by_name(store)["street-make-it-night"]
    assert (healed.ran, healed.failed, healed.kept) == (2, 1, 4) and edit["status"] == "kept"
    assert set(image_files(run_dir)) - set(before) == {edit["image"]}


def run_dir_stamps(run_dir: Path) -> dict[str, int]:
    """mtime of every file a run leaves (SQLite's -wal/-shm and the lock file aside)."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and not p.name.endswith(("-wal", "-shm", ".lock"))}


def test_a_finished_run_again_changes_nothing_and_loads_no_model(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "in", PROMPTS_ONLY)
    run_dir = tmp_path / "run"
    command = ["run", str(recipe), "--out", str(run_dir), "--device", "cpu", "--json"]
    first = CliRunner().invoke(main, command)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["kept"] == 2
    assert {"recipe.yaml", "report.html", "manifest.sqlite"} <= set(run_dir_stamps(run_dir))
    stamps, rows = run_dir_stamps(run_dir), manifest_rows(run_dir)

    again = CliRunner().invoke(main, command)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["ran"] == 0
    assert run_dir_stamps(run_dir) == stamps and manifest_rows(run_dir) == rows

    plan = plan_of(recipe)
    with RunStore.open(run_dir) as store:
        # A model that cannot load: the rerun would fail if it tried to build a worker.
        summary = run_jobs(plan.jobs, store, RunConfig(model="/no/such/model"))
    assert summary.ran == 0 and summary.kept == 2 and summary.exit_code == 0


def test_a_model_that_cannot_load_is_found_before_the_run_starts(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "in", PROMPTS_ONLY)
    not_a_model = tmp_path / "empty-folder"
    not_a_model.mkdir()
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "run"),
                                       "--model", str(not_a_model)])
    assert result.exit_code == 3
    assert str(not_a_model) in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # found before any work: nothing was written


def test_full_disk_stops_the_run_and_leaves_jobs_pending(tmp_path, worker, monkeypatch):
    recipe = write_tiny_recipe(tmp_path / "in", PROMPTS_ONLY)
    plan = plan_of(recipe)
    with RunStore.open(tmp_path / "run") as store:
        store.add_jobs(plan.jobs)

        def disk_full(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "write", disk_full)
        summary = run_jobs(plan.jobs, store, UNSCORED_TINY, executor=local(worker, 1))
        monkeypatch.undo()
        assert "no space left" in summary.error and summary.exit_code == 1
        assert summary.pending == 2 and store.counts()["status"]["pending"] == 2
    assert image_files(tmp_path / "run") == {}


def small_job(name: str, size: int = 64, **fields) -> Job:
    return Job("prompts", name, "t2i", f"prompt {name}", width=size, height=size, steps=2,
               model="tiny", **fields)


def kept_result(job: Job) -> JobResult:
    attempt = Attempt(0, job.seed, "initial", "", {}, image=Image.new("RGB", (job.width, job.height)))
    return JobResult(job.id, "kept", [attempt], best=0)


def test_micro_batches_share_a_shape_and_follow_plan_order(tmp_path):
    jobs = [small_job(f"j{n}", 64 if n % 3 else 128) for n in range(9)]
    with RunStore.open(tmp_path / "run") as store:
        driver = Driver(jobs, store)
        batches = []
        while (batch := driver.next_batch(4)) is not None:
            batches.append([job.name for job in batch.jobs])
            driver.complete(batch, [kept_result(job) for job in batch.jobs])
        assert store.counts()["status"]["kept"] == 9
    assert batches == [["j0", "j3", "j6"], ["j1", "j2", "j4", "j5"], ["j7", "j8"]]


def test_input_sizes_split_batches(tmp_path):
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    Image.new("RGB", (32, 32)).save(small)
    Image.new("RGB", (48, 32)).save(large)
    refs = [ImageRef(f"sha256:{n}", str(p)) for n, p in enumerate((small, large, small))]
    jobs = [Job("edits", f"e{n}", "edit", "make it red", inputs=(ref,), width=64, height=64,
                model="tiny") for n, ref in enumerate(refs)]
    with RunStore.open(tmp_path / "run") as store:
        driver = Driver(jobs, store)
        first = driver.next_batch(4)
        assert [job.name for job in first.jobs] == ["e0", "e2"]
        assert set(first.images) == {"sha256:0", "sha256:2"}
        assert first.images["sha256:0"].size == (32, 32)
        driver.complete(first, [kept_result(job) for job in first.jobs])
        assert [job.name for job in driver.next_batch(4).jobs] == ["e1"]


def test_anchor_images_flow_to_dependants_and_failures_cascade(tmp_path):
    anchor, other = small_job("anchor"), small_job("other")
    shot = Job("series/a", "shot", "incontext", "the hero", inputs=(ImageRef(f"job:{anchor.id}"),),
               width=64, height=64, model="tiny")
    second = Job("series/b", "shot2", "incontext", "the other", inputs=(ImageRef(f"job:{other.id}"),),
                 width=64, height=64, model="tiny")
    with RunStore.open(tmp_path / "run") as store:
        driver = Driver([anchor, other, shot, second], store)
        first = driver.next_batch(4)
        assert [job.name for job in first.jobs] == ["anchor", "other"]  # dependants wait
        assert driver.next_batch(4) is None and driver.unfinished == 4
        driver.complete(first, [kept_result(anchor), failed_result(other, "RuntimeError: boom")])
        rows = by_name(store)
        assert rows["shot2"]["status"] == "failed" and "RuntimeError: boom" in rows["shot2"]["error"]
        released = driver.next_batch(4)
        assert [job.name for job in released.jobs] == ["shot"]
        assert released.images[f"job:{anchor.id}"].size == (64, 64)

    # A later run of a plan without the anchor still finds its kept image in the run dir.
    with RunStore.open(tmp_path / "run") as store:
        assert [job.name for job in Driver([shot], store).next_batch(4).jobs] == ["shot"]
    with RunStore.open(tmp_path / "other") as store:
        Driver([shot], store)
        assert "neither in this plan nor kept" in by_name(store)["shot"]["error"]


def test_run_isolated_blames_only_the_job_that_raises(tmp_path):
    jobs = [small_job("good"), small_job("bad"), small_job("fine")]

    def run(batch_jobs, images, earlier):
        if any(job.name == "bad" for job in batch_jobs):
            raise MemoryError("out of memory")
        return [kept_result(job) for job in batch_jobs]

    results = run_isolated(run, MicroBatch(jobs, {}))
    assert [r.status for r in results] == ["kept", "failed", "kept"]
    assert results[1].error == "MemoryError: out of memory"


def test_cli_refuses_a_run_dir_in_use_and_reports_status(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "in", PROMPTS_ONLY)
    run_dir = tmp_path / "run"
    runner = CliRunner()
    with RunStore.open(run_dir) as store:
        store.add_jobs(plan_of(recipe).jobs)
        locked = runner.invoke(main, ["run", str(recipe), "--out", str(run_dir), "--device", "cpu"])
        status = runner.invoke(main, ["status", str(run_dir), "--json"])
    assert locked.exit_code == 2 and f"in use by pid {os.getpid()}" in locked.output
    assert status.exit_code == 0
    assert '"pending": 2' in status.output and '"prompts/animals"' in status.output
    invalid = runner.invoke(main, ["run", str(tmp_path / "missing.yaml")])
    assert invalid.exit_code == 2 and "missing.yaml" in invalid.output
    not_a_run = runner.invoke(main, ["status", str(tmp_path / "in")])
    assert not_a_run.exit_code == 2 and "not a run directory" in not_a_run.output


def test_status_reads_the_manifest_without_importing_torch(tmp_path):
    with RunStore.open(tmp_path / "run") as store:
        store.add_jobs([small_job("a"), small_job("b")])
        store.commit(small_job("a"), kept_result(small_job("a")))
    script = ("import sys; from omnigen2_batch.cli import main\n"
              f"try: main(['status', {str(tmp_path / 'run')!r}])\n"
              "except SystemExit as done: assert done.code == 0, done.code\n"
              "assert 'torch' not in sys.modules, 'status imported torch'")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:]}
    assert rows["section"] == ["pending", "kept", "rejected", "failed"]
    assert rows["prompts"] == rows["total"] == ["1", "1", "0", "0"]


# -- contracts every executor keeps -------------------------------------------------------------
SERIES_RECIPE = """\
name: series
model: tiny
batch_size: 2
defaults:
  size: [64, 64]
  steps: 2
  max_attempts: 2
  scoring:
    model: tiny-clip
    pretrained: random
    thresholds: {text: 0.0}
characters:
  robo:
    portrait: "a small round white robot with blue eyes"
series:
  - character: robo
    shots:
      - "the robot from the image watering plants"
      - "the robot from the image playing chess"
      - "the robot from the image reading a book"
prompts:
  - name: shapes
    prompt: "a {color} cube on a table"
    matrix: {color: [red, blue, green]}
"""


def run_cli(*args: str) -> dict:
    result = CliRunner().invoke(main, ["run", *args, "--json"])
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def manifest(run_dir: Path) -> dict[str, tuple]:
    """job id -> (status, image, error), the part of the manifest a run decides."""
    with RunStore.open(run_dir, readonly=True) as store:
        return {row["id"]: (row["status"], row["image"], row["error"]) for row in store.jobs()}


def result_files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for folder in ("kept", "rejected")
                  for p in (run_dir / folder).rglob("*.png"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=int)


@pytest.fixture(scope="module")
def one_by_one_run(tmp_path_factory) -> Path:
    """The series recipe (an anchor, its 3 shots, 3 prompts) run locally one job per pipeline
    call: the reference every executor's batched run must match. Only read once made."""
    folder = tmp_path_factory.mktemp("one-by-one")
    recipe = folder / "series.yaml"
    recipe.write_text(SERIES_RECIPE)
    summary = run_cli(str(recipe), "--out", str(folder / "run"), "--executor", "local",
                      "--batch-size", "1")
    assert summary["total"] == 7 and summary["pending"] == 0 and summary["failed"] == 0
    return folder / "run"


ON_RAY = pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.slow])


@pytest.fixture(params=["local", ON_RAY])
def executor_args(request) -> list[str]:
    """The CLI options that pick each executor; Ray runs two workers on the loopback cluster."""
    if request.param == "ray":
        cluster = request.getfixturevalue("slot_cluster")
        return ["--executor", "ray", "--ray-address", cluster.address, "--workers", "2"]
    return ["--executor", "local"]


def test_a_batched_run_matches_one_by_one_generation(tmp_path, one_by_one_run, executor_args):
    recipe = tmp_path / "series.yaml"
    recipe.write_text(SERIES_RECIPE)
    summary = run_cli(str(recipe), "--out", str(tmp_path / "run"), *executor_args,
                      "--batch-size", "2")

    assert summary["total"] == 7 and summary["pending"] == 0 and summary["failed"] == 0
    assert manifest(tmp_path / "run") == manifest(one_by_one_run)  # same decisions, same files
    files = result_files(tmp_path / "run")
    assert files == result_files(one_by_one_run) and len(files) == 7
    # Same seeds, same pixels. Which jobs share a micro-batch depends on the executor (and on
    # Ray, on when each actor asks for work), and a batched matrix product may round
    # differently from a smaller one: up to one 8-bit level (the pipeline tests pin batched ==
    # one-by-one to the same bound).
    for name in files:
        diff = np.abs(pixels(tmp_path / "run" / name) - pixels(one_by_one_run / name))
        assert diff.max() <= 1, name


@pytest.mark.parametrize("size", [(128, 64), (64, 128), (96, 96)])
def test_a_shot_with_one_reference_comes_out_at_the_size_the_recipe_asks(tmp_path, size):
    """The official single-input rule (output = the input's size) must not override the recipe:
    what the PNG and the manifest say was made is what was made."""
    recipe = write_tiny_recipe(tmp_path / "in", f"""\
name: sizes
model: tiny
defaults:
  steps: 1
  scoring: {{enabled: false}}
characters:
  mira: {{references: [mira.png]}}
series:
  - character: mira
    size: [{size[0]}, {size[1]}]
    shots: ["mira from the image at sea"]
""")
    run_dir = tmp_path / "run"
    summary = run_cli(str(recipe), "--out", str(run_dir))
    assert summary["kept"] == 1
    (row,) = [r for r in manifest(run_dir).values()]
    with Image.open(run_dir / row[1]) as image:
        made, recorded = image.size, json.loads(image.text["omnigen2_batch"])["attempt"]["params"]
    assert made == size == (recorded["width"], recorded["height"])
