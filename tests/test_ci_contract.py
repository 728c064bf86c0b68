"""What a CI job relies on, through the real CLI in subprocesses: the run directory always
describes the current recipe, exit codes it can branch on, one JSON document for every outcome,
preflight before any work, --set for smoke runs, SIGTERM within seconds, plain progress in logs.

Scores come from a random tiny CLIP, so thresholds of -1 (every cosine passes) and 0.99 (none
does) decide deterministically."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PASS_ALL, FAIL_ALL = -1.0, 0.99

RECIPE = """\
name: contract
model: tiny
defaults:
  size: [64, 64]
  steps: 2
  max_attempts: 3
  scoring: {{model: tiny-clip, pretrained: random, thresholds: {{text: {threshold}}}}}
prompts:
  - name: shapes
    prompt: {prompts}
bilingual:
  - name: fest
    pairs:
      - {{name: lantern, en: "{lantern}", zh: "一个纸灯笼"}}
"""


def write(folder: Path, *, threshold: float = PASS_ALL, lantern: str = "a paper lantern",
          prompts=("a red circle", "a blue square", "a green triangle"), name="r.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(RECIPE.format(threshold=threshold, lantern=lantern, prompts=json.dumps(list(prompts))),
                    encoding="utf-8")
    return path


def cli(*args, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "omnigen2_batch.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout, **popen)


def run_json(recipe: Path, out: Path, *extra) -> tuple[int, dict]:
    done = cli("run", recipe, "--out", out, "--json", *extra)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def rows(run_dir: Path, query: str) -> list[tuple]:
    with sqlite3.connect(f"file:{run_dir / 'manifest.sqlite'}?mode=ro", uri=True) as db:
        return db.execute(query).fetchall()


def outputs(run_dir: Path) -> dict[Path, int]:
    """mtime of every file a run made (the lock and SQLite's side files aside)."""
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and not p.name.endswith((".lock", "-wal", "-shm"))}


def pngs(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*.png")} if folder.exists() else set()


def test_an_edited_recipe_leaves_a_directory_that_describes_it_and_no_other(tmp_path):
    out = tmp_path / "run"
    code, first = run_json(write(tmp_path), out)
    assert code == 0 and first["kept"] == first["total"] == 5

    recipe = write(tmp_path, lantern="a red paper lantern", prompts=("a red circle", "a blue square"))
    code, second = run_json(recipe, out)
    assert code == 0 and second["total"] == second["kept"] == 4
    assert second["superseded"] == 3  # the triangle, and both sides of the changed pair
    status = json.loads(cli("status", out, "--json").stdout)
    assert (status["total"], status["status"]["kept"], status["superseded"]) == (4, 4, 3)

    current = {job_id for (job_id,) in rows(out, "SELECT id FROM jobs WHERE status='kept'")}
    kept_files = pngs(out / "kept")
    assert len(kept_files) == 4 and all(any(i[:8] in f for i in current) for f in kept_files)
    assert len(pngs(out / "superseded")) == 3
    (pair,) = rows(out, "SELECT en_job, zh_job FROM pairs")
    assert set(pair) <= current  # parity compares the current pair, not the old images
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "a red paper lantern" in report and "a green triangle" not in report

    before = outputs(out)  # another recipe into the same directory: refused, nothing touched
    other = tmp_path / "other.yaml"
    other.write_text(recipe.read_text().replace("name: contract", "name: other"))
    code, answer = run_json(other, out)
    assert code == 2 and not answer["ok"]
    assert "holds the run of recipe 'contract'" in answer["errors"][0]["message"]
    assert outputs(out) == before


def test_decisions_follow_the_thresholds_of_the_current_recipe(tmp_path):
    out = tmp_path / "run"
    code, made = run_json(write(tmp_path), out)
    assert code == 0 and made["kept"] == 5
    attempts_before = dict(rows(out, "SELECT id, n_attempts FROM jobs"))

    code, raised = run_json(write(tmp_path, threshold=FAIL_ALL), out)
    assert code == 1 and raised["rejected"] == 5 and raised["ran"] == 5
    climbed = dict(rows(out, "SELECT id, n_attempts FROM jobs"))
    assert all(climbed[i] == 3 > attempts_before[i] for i in climbed)  # on from attempt 1, not anew

    files = {p: p.stat().st_mtime_ns for p in (out / "rejected").rglob("*.png")}
    code, lowered = run_json(write(tmp_path, threshold=PASS_ALL), out)
    assert code == 0 and lowered["kept"] == 5 and lowered["ran"] == 0 and lowered["redecided"] == 5
    assert dict(rows(out, "SELECT id, n_attempts FROM jobs")) == climbed  # nothing regenerated
    assert len(pngs(out / "kept")) == len(files) == 5 and not pngs(out / "rejected")

    write(tmp_path, threshold=FAIL_ALL)  # `score` re-decides with the thresholds the run recorded
    scored = json.loads(cli("score", out, "--json").stdout)
    assert scored["kept"] == 5 and scored["changed"] == []


def test_json_answers_every_failure_with_one_document(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nmodel: tiny\nprompts:\n  - name: a\n    prompt: hi\n    steps: -3\n")
    cases = {  # arguments -> exit code
        ("run", broken, "--out", tmp_path / "a"): 2,
        ("run", tmp_path / "missing.yaml"): 2,
        ("run", write(tmp_path), "--bogus-option"): 2,
        ("status", tmp_path): 2,
        ("run", write(tmp_path), "--out", tmp_path / "c", "--executor", "ray",
         "--ray-address", "127.0.0.1:9"): 3,  # nothing listens: found in seconds, not minutes
        ("export", tmp_path / "nowhere", tmp_path / "dest"): 2,
    }
    for args, code in cases.items():
        done = cli(*args, "--json")
        answer = json.loads(done.stdout)  # the whole of stdout is one document
        assert done.returncode == answer["exit_code"] == code, (args, done.stderr)
        assert answer["ok"] is False and answer["errors"] and "Traceback" not in done.stderr
    recipe_error = json.loads(cli("validate", broken, "--json").stdout)["errors"][0]
    assert (recipe_error["file"], recipe_error["line"]) == (str(broken), 6)
    assert recipe_error["field"] == "prompts[0].steps"
    assert not [name for name in "ac" if (tmp_path / name).exists()]  # nothing was started


def test_preflight_names_the_missing_scorer_file_before_any_work(tmp_path):
    recipe = write(tmp_path)
    recipe.write_text(recipe.read_text().replace("pretrained: random",
                                                 "pretrained: /no/such/clip.safetensors"))
    for command in (("run", recipe, "--out", tmp_path / "run"), ("validate", recipe, "--deep")):
        done = cli(*command, "--json")
        (error,) = json.loads(done.stdout)["errors"]
        assert done.returncode == 3 and "/no/such/clip.safetensors" in error["message"]
        assert "no such weights file" in error["message"] and not (tmp_path / "run").exists()
    assert cli("validate", recipe).returncode == 0  # only --deep looks at this machine


def test_set_overrides_recipe_values_typed_and_validated(tmp_path):
    recipe = write(tmp_path)
    plan = json.loads(cli("plan", recipe, "--json", "--set", "defaults.steps=3",
                          "--set", "defaults.size=[64, 96]").stdout)
    assert {(job["steps"], job["width"], job["height"]) for job in plan["jobs"]} == {(3, 64, 96)}
    wrong = cli("validate", recipe, "--set", "defaults.steps=many")
    assert wrong.returncode == 2 and "--set defaults.steps=many" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    code, summary = run_json(recipe, tmp_path / "run", "--set", "defaults.steps=1",
                             "--min-kept", "100%")
    assert code == 0 and summary["min_kept"] == 5
    rejecting = write(tmp_path, threshold=FAIL_ALL)
    code, summary = run_json(rejecting, tmp_path / "run2", "--set", "defaults.max_attempts=1", "--min-kept", "1")
    assert code == 1 and summary["kept"] == 0 and summary["rejected"] == 5
    # --min-kept is a floor, not an extra demand: a run that only has to finish passes with rejections
    code, summary = run_json(rejecting, tmp_path / "run2", "--set", "defaults.max_attempts=1", "--min-kept", "0%")
    assert code == 0 and summary["rejected"] == 5
    code, summary = run_json(rejecting, tmp_path / "run2", "--set", "defaults.max_attempts=1")
    assert code == 1


def test_sigterm_commits_what_is_finished_and_exits_143_at_once(tmp_path):
    recipe = tmp_path / "long.yaml"
    recipe.write_text("name: long\nmodel: tiny\ndefaults:\n  size: [512, 512]\n  steps: 200\n"
                      "  scoring: {enabled: false}\nprompts:\n  - name: p\n"
                      "    prompt: [one, two, three, four, five, six, seven, eight]\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "omnigen2_batch.cli", "run", str(recipe), "--out",
         str(tmp_path / "run"), "--batch-size", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in process.stderr:  # a plain progress line: the run has started its batches
        if "jobs to run" in line:
            break
    else:
        pytest.fail(f"the run ended before it started: exit {process.wait()}")
    time.sleep(2)  # a long batch is in flight now
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)
    waited = time.monotonic() - sent
    assert code == 143 and waited < 10, waited
    assert "stopped by SIGTERM" in process.stderr.read()
    statuses = rows(tmp_path / "run", "SELECT status FROM jobs")
    assert {s for (s,) in statuses} <= {"kept", "pending"}  # nothing half-recorded
    assert not [p for p in (tmp_path / "run").rglob(".tmp-*")]


def test_a_pipe_gets_plain_progress_on_stderr_and_the_summary_on_stdout(tmp_path):
    done = cli("run", write(tmp_path), "--out", tmp_path / "run")
    assert done.returncode == 0
    assert done.stdout.strip().splitlines()[0].startswith(f"{tmp_path / 'run'}: 5 kept")
    progress = [line for line in done.stderr.splitlines() if line.startswith("progress:")]
    assert progress[0] == "progress: 5 of 5 jobs to run"
    assert "progress: section prompts/shapes done: 3 kept" in progress
    assert "\r" not in done.stderr  # no bar redrawing in a log
    assert done.stderr.count("RANDOM weights") == 1  # each warning once
