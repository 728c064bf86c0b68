"""Crash safety of `run`: SIGKILL at several points resumes to the same files, SIGINT exits 130.

The real CLI runs in a subprocess on the tiny model; the test polls the manifest (read-only,
as `status` does) and kills the run once enough jobs are committed.
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from omnigen2_batch.store import TEMP_PREFIX, RunStore, StoreError
from test_run_local import plan_of, write_tiny_recipe

ROOT = Path(__file__).parents[1]
RECIPE = """\
name: resume-test
model: tiny
defaults:
  size: [64, 64]
  steps: 2
  scoring: {model: tiny-clip, pretrained: random, thresholds: {text: -1}}
prompts:
  - name: animals
    prompt: "a {animal} on a hill"
    matrix: {animal: [cat, fox, owl, hen, elk, yak, bee, eel]}
characters:
  robo: {portrait: "a round white robot"}
series:
  - character: robo
    shots: ["robo reading", "robo at sea"]
"""
JOBS = 11


def start_run(recipe: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "cli.py"), "run", str(recipe), "--out", str(out),
               "--device", "cpu", "--batch-size", "1", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(out: Path) -> int:
    try:
        with RunStore.open(out, readonly=True) as store:
            counts = store.counts()
    except (StoreError, sqlite3.OperationalError):  # not created yet
        return 0
    return counts["total"] - counts["status"]["pending"]


def wait_for(proc: subprocess.Popen, out: Path, at_least: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = finished(out)
        if done >= at_least:
            return done
        assert proc.poll() is None, f"run ended before {at_least} jobs: {proc.communicate()}"
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"fewer than {at_least} jobs committed within {timeout} s")


def interrupt_mid_run(proc: subprocess.Popen, out: Path) -> int:
    """SIGINT the run at a moment it is known to have work left, without racing it: freeze it
    once a job is committed, read how far it got, then deliver SIGINT as it thaws. With batch
    size 1 it may commit only the job in flight after that. Returns the jobs done when frozen."""
    wait_for(proc, out, 1)
    proc.send_signal(signal.SIGSTOP)
    os.waitpid(proc.pid, os.WUNTRACED)  # returns once the run is really stopped
    done = finished(out)
    assert done <= JOBS - 2, f"the run had done {done} of {JOBS} jobs before it could be frozen"
    proc.send_signal(signal.SIGINT)  # pending until it runs again
    proc.send_signal(signal.SIGCONT)
    return done


def assert_consistent(out: Path) -> dict[str, dict]:
    """Every row that names an image has a complete PNG; returns the rows by id."""
    with RunStore.open(out, readonly=True) as store:
        rows = {row["id"]: row for row in store.jobs()}
    for row in rows.values():
        assert (row["image"] is not None) == (row["status"] in ("kept", "rejected")), row
        if row["image"]:
            with Image.open(out / row["image"]) as image:
                image.load()  # a truncated file raises here
    return rows


@pytest.mark.slow
def test_sigkill_at_several_points_resumes_to_the_same_files(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "in", RECIPE)
    out = tmp_path / "run"
    reached = 0
    for kill_at in (1, 4):
        proc = start_run(recipe, out)
        reached = wait_for(proc, out, max(kill_at, reached + 2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        rows = assert_consistent(out)
        assert 0 < sum(r["status"] == "kept" for r in rows.values()) < JOBS

    proc = start_run(recipe, out)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["kept"] == JOBS and 0 < summary["ran"] < JOBS
    rows = assert_consistent(out)
    assert all(row["status"] == "kept" for row in rows.values())

    with RunStore.open(out, readonly=True) as store:
        expected = {store.image_path(job, "kept") for job in plan_of(recipe).jobs}
    images = {str(p.relative_to(out)) for p in out.rglob("*.png")
              if p.relative_to(out).parts[0] in ("kept", "rejected", "attempts")}
    assert images == expected == {row["image"] for row in rows.values()}
    assert not [p for p in out.rglob("*") if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.slow
def test_sigint_commits_the_batch_in_flight_and_exits_130(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "in", RECIPE)
    out = tmp_path / "run"
    proc = start_run(recipe, out)
    done_when_frozen = interrupt_mid_run(proc, out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "stopping after the batch in flight" in stderr and "Traceback" not in stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] and summary["pending"] > 0 and summary["failed"] == 0
    rows = assert_consistent(out)
    assert summary["kept"] == sum(r["status"] == "kept" for r in rows.values())
    assert done_when_frozen <= summary["kept"] <= done_when_frozen + 1  # + the job in flight
    assert not [p for p in out.rglob("*") if p.name.startswith(TEMP_PREFIX)]
