"""The run store: atomic writes, the writer lock, resume sets, PNG metadata, a full disk."""
import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from omnigen2_batch.jobs import Attempt, ImageRef, Job, JobResult, Scoring
from omnigen2_batch.store import TEMP_PREFIX, RunLocked, RunStore, StoreError, StoreFull


def make_job(name: str, prompt: str = "a red fox", model: str = "tiny", **fields) -> Job:
    return Job("prompts", name, "t2i", prompt, width=64, height=64, steps=2, model=model, **fields)


def result_for(job: Job, status: str = "kept", n_attempts: int = 1, colour=(200, 30, 30)) -> JobResult:
    attempts = [Attempt(n, seed=job.seed + n, strategy="initial" if n == 0 else "new_seed",
                        reason="" if n == 0 else "text below 0.25", params={"text_guidance": 5.0 + n},
                        scores={"text": 0.2 + n / 10}, passed=status == "kept" and n == n_attempts - 1,
                        failed_metrics=() if n == n_attempts - 1 else ("text",), seconds=0.5,
                        image=Image.new("RGB", (64, 64), (colour[0], colour[1], n * 40)))
                for n in range(n_attempts)]
    return JobResult(job.id, status, attempts, best=n_attempts - 1)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def store(tmp_path):
    with RunStore.open(tmp_path / "run") as opened:
        yield opened


def test_layout_and_schema(store):
    assert (store.run_dir / "manifest.sqlite").is_file()
    mode = store._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    tables = {r[0] for r in store._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"meta", "jobs", "attempts", "pairs"}
    assert store.get_meta("version")


def test_add_jobs_keeps_existing_rows_and_order(store):
    first, second = make_job("a"), make_job("b", "a blue fox")
    assert store.add_jobs([first, second]) == 2
    store.commit(first, result_for(first))
    changed = make_job("c", "a green fox")
    assert store.add_jobs([changed, first, second]) == 1  # only the new prompt is new work
    rows = {row["id"]: row for row in store.jobs()}
    assert rows[first.id]["status"] == "kept" and rows[first.id]["ord"] == 0
    assert rows[changed.id]["status"] == "pending"
    assert Job.from_dict(rows[second.id]["job"]) == second


def test_resume_sets(store):
    kept, rejected, failed, pending = (make_job(n, f"prompt {n}") for n in "krfp")
    store.add_jobs([kept, rejected, failed, pending])
    store.commit(kept, result_for(kept))
    store.commit(rejected, result_for(rejected, "rejected", 3))
    store.commit(failed, JobResult(failed.id, "failed", error="ImageError: x.png: no such file"))
    assert store.done_ids() == {kept.id, rejected.id}
    assert store.pending([kept, rejected, failed, pending]) == [failed, pending]
    counts = store.counts()
    assert counts["total"] == 4
    assert counts["status"] == {"pending": 1, "kept": 1, "rejected": 1, "failed": 1}
    assert counts["sections"]["prompts"]["failed"] == 1
    row = {r["id"]: r for r in store.jobs()}[failed.id]
    assert row["error"].startswith("ImageError") and row["image"] is None


def test_commit_writes_image_then_rows(store):
    job = make_job("fox 1")
    store.add_jobs([job])
    store.commit(job, result_for(job, n_attempts=2), keep_attempts=True)
    row = store.jobs()[0]
    assert row["image"] == f"kept/prompts/fox_1-{job.id[:8]}.png"
    assert row["n_attempts"] == 2 and row["scored"] == 1
    attempts = store.attempts(job.id)
    assert [a["n"] for a in attempts] == [0, 1]
    assert attempts[0]["failed_metrics"] == ["text"] and attempts[1]["passed"] == 1
    assert all((store.run_dir / a["image"]).is_file() for a in attempts)
    kept = store.kept_image(job.id)
    assert kept.mode == "RGB" and kept.getpixel((0, 0)) == (200, 30, 40)
    assert not any(TEMP_PREFIX in name for name in files_under(store.run_dir))


def test_rejected_image_and_no_kept_image(store):
    job = make_job("hard")
    store.commit(job, result_for(job, "rejected", 3))  # no add_jobs first: commit adds the row
    assert store.jobs()[0]["image"].startswith("rejected/prompts/hard-")
    assert store.kept_image(job.id) is None
    assert store.kept_image("0" * 16) is None


def test_png_chunks_carry_parameters(store):
    job = make_job("chunky", "a fox\nin snow", negative_prompt="blurry", seed=7,
                   scoring=Scoring(text="a fox in snow"))
    store.commit(job, result_for(job))
    with Image.open(store.run_dir / store.jobs()[0]["image"]) as image:
        text = image.text
    prompt, negative, fields = text["parameters"].rsplit("\n", 2)
    assert prompt == "a fox\nin snow" and negative == "Negative prompt: blurry"
    for expected in ("Steps: 2", "Seed: 7", "Size: 64x64", "Model: tiny", "CFG scale: 5.0",
                     "Sampler: euler", "noise"):
        assert expected in fields
    record = json.loads(text["omnigen2_batch"])
    assert record["job_id"] == job.id and record["status"] == "kept"
    assert record["attempt"]["scores"] == {"text": pytest.approx(0.2)}
    assert record["identity"]["prompt"] == job.prompt and "noise" in record["note"]
    assert "noise" in text["Comment"]


def test_png_chunks_of_real_model_have_no_noise_note(store):
    job = make_job("real", "一只红色的狐狸", model="OmniGen2/OmniGen2")
    store.commit(job, result_for(job))
    with Image.open(store.run_dir / store.jobs()[0]["image"]) as image:
        assert "noise" not in image.text["parameters"] and "Comment" not in image.text
        assert image.text["parameters"].startswith("一只红色的狐狸")  # iTXt keeps non-Latin text


def test_disk_full_leaves_no_partial_file(store, monkeypatch):
    done, victim = make_job("done"), make_job("victim", "another prompt")
    store.add_jobs([done, victim])
    store.commit(done, result_for(done))
    before = files_under(store.run_dir)
    real_write = os.write

    def write_half_then_fail(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))  # a real partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write_half_then_fail)
    with pytest.raises(StoreFull, match="no space left"):
        store.commit(victim, result_for(victim, n_attempts=2), keep_attempts=True)
    monkeypatch.undo()
    assert files_under(store.run_dir) - before <= {"manifest.sqlite-wal", "manifest.sqlite-shm"}
    rows = {r["id"]: r for r in store.jobs()}
    assert rows[victim.id]["status"] == "pending" and store.attempts(victim.id) == []
    assert rows[done.id]["status"] == "kept"
    store.commit(victim, result_for(victim))  # space is back: the same store goes on
    assert store.done_ids() == {done.id, victim.id}


def test_other_write_errors_are_store_errors(store, monkeypatch):
    job = make_job("ro")

    def refuse(fd, data):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "write", refuse)
    with pytest.raises(StoreError, match="cannot write") as info:
        store.commit(job, result_for(job))
    assert not isinstance(info.value, StoreFull)


def test_second_writer_is_refused_by_another_process(store):
    script = textwrap.dedent(f"""
        from omnigen2_batch.store import RunStore, RunLocked
        try:
            RunStore.open({str(store.run_dir)!r})
        except RunLocked as exc:
            print(exc)
            raise SystemExit(3)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 3, done.stderr
    assert f"in use by pid {os.getpid()}" in done.stdout and "another --out" in done.stdout


def test_lock_is_released_on_close_and_readers_take_none(tmp_path):
    run = tmp_path / "run"
    writer = RunStore.open(run)
    with pytest.raises(RunLocked):
        RunStore.open(run)
    reader = RunStore.open(run, readonly=True)  # status during a run
    assert reader.counts()["total"] == 0
    with pytest.raises(StoreError, match="read-only"):
        reader.set_meta("x", "y")
    writer.close()
    RunStore.open(run).close()
    reader.close()


def test_readonly_open_of_a_missing_run(tmp_path):
    with pytest.raises(StoreError, match="not a run directory"):
        RunStore.open(tmp_path / "nothing", readonly=True)
    assert not (tmp_path / "nothing").exists()


def test_stale_temp_files_are_swept_on_open(tmp_path):
    """Only our exact temp names (pid, writer token, final name) in the folders the store makes."""
    run = tmp_path / "run"
    RunStore.open(run).close()
    stale = run / "kept" / "prompts" / f"{TEMP_PREFIX}999-0123abcd-fox-12345678.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\x89PNG half")
    not_ours = [stale.with_name(f"{TEMP_PREFIX}999-fox-12345678.png"), run / f"{TEMP_PREFIX}notes",
                run / "thumbs" / stale.name, run / f"{TEMP_PREFIX}999-0123abcd-mine.txt"]
    for path in not_ours:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"someone else's")
    RunStore.open(run, readonly=True).close()
    assert stale.exists()  # readers never delete
    RunStore.open(run).close()
    assert not stale.exists()
    assert all(path.read_bytes() == b"someone else's" for path in not_ours)


def test_unchanged_recipe_and_meta_do_not_touch_the_manifest(store):
    store.save_recipe("prompts: [a]\n")
    recipe = store.run_dir / "recipe.yaml"
    stamp = recipe.stat().st_mtime_ns
    writes = store._conn.total_changes
    store.save_recipe("prompts: [a]\n")
    store.set_meta("model", "tiny")
    store.set_meta("model", "tiny")
    assert recipe.stat().st_mtime_ns == stamp and store._conn.total_changes == writes + 1
    store.save_recipe("prompts: [b]\n")
    assert recipe.read_text() == "prompts: [b]\n"


def test_pairs_and_meta(store):
    store.save_pair("pair0", "a" * 16, "b" * 16, similarity=0.8, text_gap=0.05)
    store.save_pair("pair0", "a" * 16, "b" * 16, similarity=0.7, text_gap=0.1)
    assert store.pairs() == [{"pair": "pair0", "en_job": "a" * 16, "zh_job": "b" * 16,
                              "similarity": 0.7, "text_gap": 0.1}]
    store.set_meta("settings", {"batch_size": 2})
    assert json.loads(store.meta()["settings"]) == {"batch_size": 2}


def test_file_names_are_safe_and_sections_nest(store):
    ref = ImageRef("sha256:" + "0" * 64, "/x.png")
    job = Job("series/hero", "../shot: 1/2", "incontext", "the hero", inputs=(ref,), model="tiny")
    path = store.image_path(job, "kept")
    assert path.startswith("kept/series/hero/shot_1_2-") and ".." not in path
