"""The run directory always tells the truth about the current recipe, and nothing outside it is
touched (issue 9): real files, real SQLite, no mocks.

Read-only folders and full disks need a file system that really is read-only or full; root (as
these tests often run) ignores permissions, so those tests mount a small tmpfs in a private user
and mount namespace (`unshare -Urm`) and are skipped where that is not allowed.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from omnigen2_batch.jobs import Scoring
from omnigen2_batch.store import (SET_ASIDE, TEMP_PREFIX, ManifestDamaged, NotARunDir,
                                  OtherRecipe, RunStore, StoreError, UnsafePath)
from test_store import make_job, result_for

ROOT = Path(__file__).parents[1]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (links not followed) -> what it is: a file's hash and mtime, a
    link's target, or "dir"."""
    entries = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            entries[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            entries[rel] = "dir"
        else:
            entries[rel] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.stat().st_mtime_ns}"
    return entries


EMPTY = hashlib.sha256(b"").hexdigest()


def lasting(entries: dict[str, str]) -> dict[str, str]:
    """A snapshot without what every open may change: the writer's pid in .lock, SQLite's
    shared-memory index, and an empty WAL."""
    return {k: v for k, v in entries.items() if k not in (".lock", "manifest.sqlite-shm")
            and not (k == "manifest.sqlite-wal" and v.startswith(EMPTY))}


def outputs(entries: dict[str, str]) -> dict[str, str]:
    """The image files and folders of a snapshot."""
    return {k: v for k, v in entries.items()
            if k.split("/")[0] in ("kept", "rejected", "attempts", "superseded", SET_ASIDE)}


def finished_run(root: Path, names=("a", "b", "c"), **open_args) -> tuple[Path, list]:
    jobs = [make_job(name, f"a {name} fox") for name in names]
    with RunStore.open(root, **open_args) as store:
        store.add_jobs(jobs)
        for job in jobs:
            store.commit(job, result_for(job))
    return root, jobs


# ------------------------------------------------------------------------- whose folder is it
def test_unrelated_folder_is_refused_and_left_exactly_as_it_was(tmp_path):
    out = tmp_path / "photos"
    (out / "kept").mkdir(parents=True)
    (out / "kept" / "holiday.png").write_bytes(b"my picture")
    (out / "notes.txt").write_text("mine")
    (out / f"{TEMP_PREFIX}123-0123abcd-recipe.yaml").write_text("looks like ours, is not")
    before = snapshot(out)
    with pytest.raises(NotARunDir, match="not a run directory") as info:
        RunStore.open(out)
    assert "new or empty folder" in str(info.value) and info.value.exit_code == 2
    assert snapshot(out) == before  # no .lock, no manifest, no sweep


@pytest.mark.parametrize("lone", ["report.html", "recipe.yaml", ".lock-other"])
def test_a_folder_with_one_file_of_a_familiar_name_is_still_not_ours(tmp_path, lone):
    (tmp_path / lone).write_text("someone else's")
    before = snapshot(tmp_path)
    with pytest.raises(NotARunDir):
        RunStore.open(tmp_path)
    assert snapshot(tmp_path) == before


def test_empty_existing_folder_and_a_file_as_out(tmp_path):
    RunStore.open(tmp_path).close()  # an empty folder becomes a run dir
    assert (tmp_path / "manifest.sqlite").is_file()
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(StoreError, match="not a folder|is a file"):
        RunStore.open(not_a_folder)
    with pytest.raises(StoreError, match="cannot create|not a folder"):
        RunStore.open(not_a_folder / "run")  # a file where a parent folder is expected
    assert not_a_folder.read_text() == "x"


def test_one_recipe_per_run_dir(tmp_path):
    run, _ = finished_run(tmp_path / "run", recipe_name="quickstart", recipe_origin="/r/quickstart.yaml")
    before = snapshot(run)
    with pytest.raises(OtherRecipe) as info:
        RunStore.open(run, recipe_name="portraits", recipe_origin="portraits.yaml")
    message = str(info.value)
    for expected in ("'quickstart'", "quickstart.yaml", "'portraits'", "portraits.yaml", "another --out",
                     "delete"):
        assert expected in message
    with pytest.raises(OtherRecipe):  # same name, another file: another recipe
        RunStore.open(run, recipe_name="quickstart", recipe_origin="copy.yaml")
    assert lasting(snapshot(run)) == lasting(before)
    with RunStore.open(run, recipe_name="quickstart", recipe_origin="quickstart.yaml") as store:
        assert store.counts()["status"]["kept"] == 3


def test_an_old_run_dir_without_recipe_identity_is_adopted(tmp_path):
    run, _ = finished_run(tmp_path / "run")
    with RunStore.open(run, recipe_name="old", recipe_origin="old.yaml") as store:
        assert store.meta()["recipe_origin"] == "old.yaml"
    with pytest.raises(OtherRecipe):
        RunStore.open(run, recipe_name="new", recipe_origin="new.yaml")


# ------------------------------------------------------------------------- damaged manifest
def damage(manifest: Path, how: str) -> None:
    if how == "empty":
        manifest.write_bytes(b"")
    elif how == "garbage":
        manifest.write_bytes(os.urandom(20_000))
    else:  # truncated: the header survives, later pages are gone
        manifest.write_bytes(manifest.read_bytes()[:2 * 4096 + 100])


@pytest.mark.parametrize("how", ["empty", "garbage", "truncated"])
def test_damaged_manifest_is_refused_by_writer_and_reader(tmp_path, how):
    run, _ = finished_run(tmp_path / "run", names=[f"j{i}" for i in range(60)])
    damage(run / "manifest.sqlite", how)
    before = snapshot(run)
    for readonly in (False, True):
        with pytest.raises(ManifestDamaged, match="damaged") as info:
            RunStore.open(run, readonly=readonly)
        assert "move it aside" in str(info.value) and info.value.exit_code == 2
    assert lasting(snapshot(run)) == lasting(before)  # nothing rewritten, nothing started over

    (run / "manifest.sqlite").rename(run / "manifest.sqlite.damaged")  # what the message says
    with RunStore.open(run) as store:  # starts over in the same folder; the images stay
        assert store.counts()["total"] == 0
    assert outputs(snapshot(run)) == outputs(before)


def test_a_sqlite_file_that_is_not_our_manifest_is_refused(tmp_path):
    import sqlite3

    with sqlite3.connect(tmp_path / "manifest.sqlite") as conn:
        conn.execute("CREATE TABLE photos(name TEXT)")
    before = snapshot(tmp_path)
    with pytest.raises(NotARunDir, match="something else"):
        RunStore.open(tmp_path)
    assert snapshot(tmp_path) == before  # no .lock left, no -wal/-shm made
    with pytest.raises(NotARunDir, match="something else"):
        RunStore.open(tmp_path, readonly=True)


# ------------------------------------------------------------------------- links
def test_symlinked_lock_is_refused_and_its_target_untouched(tmp_path):
    run, _ = finished_run(tmp_path / "run")
    outside = tmp_path / "precious.txt"
    outside.write_text("do not truncate me")
    stamp = outside.stat().st_mtime_ns
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(outside)
    with pytest.raises(UnsafePath, match="link"):
        RunStore.open(run)
    assert outside.read_text() == "do not truncate me" and outside.stat().st_mtime_ns == stamp
    (run / ".lock").unlink()
    os.link(outside, run / ".lock")  # a hard link writes through just the same
    with pytest.raises(UnsafePath):
        RunStore.open(run)
    assert outside.read_text() == "do not truncate me"


def test_dangling_lock_link_creates_nothing_outside(tmp_path):
    run, _ = finished_run(tmp_path / "run")
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(tmp_path / "created-through-link")
    with pytest.raises(UnsafePath):
        RunStore.open(run)
    assert not (tmp_path / "created-through-link").exists()


def test_symlinked_manifest_and_output_folder_are_refused(tmp_path):
    run, jobs = finished_run(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    (run / "manifest.sqlite").rename(elsewhere)
    (run / "manifest.sqlite").symlink_to(elsewhere)
    with pytest.raises(UnsafePath):
        RunStore.open(run)
    with pytest.raises(UnsafePath):
        RunStore.open(run, readonly=True)
    (run / "manifest.sqlite").unlink()
    elsewhere.rename(run / "manifest.sqlite")

    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(run / "rejected", ignore_errors=True)
    (run / "rejected").symlink_to(outside)
    with RunStore.open(run) as store:
        job = make_job("hard", "a hard fox")
        with pytest.raises(UnsafePath, match="link"):
            store.commit(job, result_for(job, "rejected"))
        assert store.statuses().get(job.id) is None
    assert list(outside.iterdir()) == []


# ------------------------------------------------------------------------- superseded work
def test_supersede_restore_prune_round_trip(tmp_path):
    run = tmp_path / "run"
    a, b, c, d = (make_job(n, f"a {n} fox") for n in "abcd")
    with RunStore.open(run) as store:
        store.add_jobs([a, b, c, d])
        store.commit(a, result_for(a))
        store.commit(b, result_for(b, "rejected", 3), keep_attempts=True)
        store.commit(c, result_for(c, "failed"))
        store.save_pair("p", a.id, b.id, 0.5, 0.1)
        kept_a, rejected_b = store.jobs()[0]["image"], store.jobs()[1]["image"]
    (run / "kept" / "mine.txt").write_text("a file of the user's")
    start = outputs(snapshot(run))

    with RunStore.open(run) as store:  # the recipe now plans only a and d
        assert store.supersede([a.id, d.id]) == 2
        assert store.supersede([a.id, d.id]) == 0  # idempotent
        assert store.counts()["total"] == 2 and store.counts()["superseded"] == 2
        assert set(store.statuses()) == {a.id, d.id} and store.done_ids() == {a.id}
        assert store.pairs() == [] and [r["id"] for r in store.jobs()] == [a.id, d.id]
    assert not (run / rejected_b).exists() and (run / "superseded" / rejected_b).is_file()
    assert not (run / "attempts" / b.id).exists()
    assert len(list((run / "superseded" / "attempts" / b.id).iterdir())) == 3

    with RunStore.open(run) as store:  # b comes back: restored exactly
        assert store.supersede([a.id, b.id, d.id]) == 0
        rows = {r["id"]: r for r in store.jobs()}
        assert rows[b.id]["status"] == "rejected" and rows[b.id]["image"] == rejected_b
        assert all(att["image"].startswith("attempts/") for att in store.attempts(b.id))
        assert store.verify_files() == []
    assert outputs(snapshot(run)) == start

    (run / "superseded" / "kept").mkdir(parents=True)
    (run / "superseded" / "kept" / "user.png").write_bytes(b"not ours")
    with RunStore.open(run) as store:
        assert store.supersede([d.id]) == 2  # a and b; c stayed superseded
        pruned = store.prune()
        assert pruned["jobs"] == 3 and pruned["left"] == []
        assert set(pruned["removed"]) == {"superseded/" + kept_a, "superseded/" + rejected_b} | {
            f"superseded/attempts/{b.id}/{n}.png" for n in range(3)}
        assert store.counts() == {"total": 1, "status": {"pending": 1, "kept": 0, "rejected": 0,
                                                         "failed": 0},
                                  "sections": {"prompts": {"pending": 1, "kept": 0, "rejected": 0,
                                                           "failed": 0}}, "superseded": 0}
    left = outputs(snapshot(run))
    assert left["kept/mine.txt"] == start["kept/mine.txt"]
    assert (run / "superseded" / "kept" / "user.png").read_bytes() == b"not ours"
    assert not any(k.endswith(".png") and not k.endswith("user.png") for k in left)


def test_prune_leaves_a_superseded_file_that_was_replaced(tmp_path):
    run, (a, b, _) = finished_run(tmp_path / "run")
    with RunStore.open(run) as store:
        store.supersede([b.id])
        rel = {r["id"]: r for r in store.jobs(include_superseded=True)}[a.id]["image"]
        (run / rel).write_bytes(b"the user's own picture now")
        pruned = store.prune()
    assert pruned["left"] == [rel] and (run / rel).read_bytes() == b"the user's own picture now"


# ------------------------------------------------------------------------- decisions follow the recipe
def test_update_scoring_rewrites_known_jobs_only_when_they_differ(tmp_path):
    run = tmp_path / "run"
    jobs = [make_job(f"j{i}", f"prompt {i}", scoring=Scoring(thresholds={"text": 0.2}))
            for i in range(3)]
    with RunStore.open(run) as store:
        store.add_jobs(jobs)
        assert store.update_scoring(jobs) == []
        changes = store._conn.total_changes
        assert store.update_scoring(jobs) == [] and store._conn.total_changes == changes
        stricter = [jobs[0].with_(scoring=Scoring(thresholds={"text": 0.3})), *jobs[1:]]
        assert store.add_jobs(stricter) == 0  # add_jobs alone keeps the old thresholds ...
        assert store.update_scoring(stricter) == [jobs[0].id]  # ... update_scoring does not
        stored = {r["id"]: r["job"] for r in store.jobs()}
        assert stored[jobs[0].id]["scoring"]["thresholds"] == {"text": 0.3}
        assert stored[jobs[1].id]["scoring"]["thresholds"] == {"text": 0.2}


def test_finished_and_redecide_move_the_image_and_rewrite_its_chunks(tmp_path):
    run = tmp_path / "run"
    job = make_job("fox", scoring=Scoring(thresholds={"text": 0.25}))
    with RunStore.open(run) as store:
        store.commit(job, result_for(job, "kept", 3), keep_attempts=True)
        (result,) = store.finished([job.id])
        assert result.status == "kept" and result.best == 2 and result.image.startswith("kept/")
        assert [a.n for a in result.attempts] == [0, 1, 2] and result.attempts[2].passed
        assert result.attempt(0).failed_metrics == ("text",) and result.attempt(0).scores["text"] == 0.2
        old = run / result.image

        stricter = job.with_(scoring=Scoring(thresholds={"text": 0.9}))
        verdicts = {a.n: (False, ("text",)) for a in result.attempts}
        assert store.redecide(stricter, "rejected", 2, verdicts)
        assert not store.redecide(stricter, "rejected", 2, verdicts)  # nothing changes twice
        (now,) = store.finished([job.id])
        assert now.status == "rejected" and not any(a.passed for a in now.attempts)
        assert not old.exists() and store.verify_files() == []
        with Image.open(run / now.image) as image:
            record = json.loads(image.text["omnigen2_batch"])
            assert record["status"] == "rejected" and record["attempt"]["passed"] is False
            assert image.convert("RGB").getpixel((0, 0)) == (200, 30, 80)

        assert store.redecide(stricter, "rejected", 0, verdicts)  # another attempt's image
        with Image.open(run / store.finished()[0].image) as image:
            assert image.convert("RGB").getpixel((0, 0)) == (200, 30, 0)
        assert store.counts()["status"]["rejected"] == 1


def test_redecide_without_the_attempt_image_says_to_reopen(tmp_path):
    run, (job, *_) = finished_run(tmp_path / "run")
    with RunStore.open(run) as store:
        with pytest.raises(StoreError, match="reopen"):
            store.redecide(job, "kept", 5, {})


# ------------------------------------------------------------------------- files vs manifest
def test_verify_files_finds_deleted_and_replaced_images_and_reopen_sets_them_aside(tmp_path):
    run, (a, b, c) = finished_run(tmp_path / "run")
    with RunStore.open(run) as store:
        paths = {r["id"]: r["image"] for r in store.jobs()}
    (run / paths[a.id]).unlink()
    Image.new("RGB", (64, 64), "blue").save(run / paths[b.id])  # someone's own image now
    foreign = (run / paths[b.id]).read_bytes()
    os.utime(run / paths[c.id])  # touched only: not a problem, and not hashed again next time

    with RunStore.open(run) as store:
        problems = {p.job_id: p.problem for p in store.verify_files()}
        assert problems == {a.id: "missing", b.id: "replaced"}
        assert store.kept_image(b.id) is None and store.kept_image(c.id) is not None
        moved = store.reopen(problems)
        assert moved == [f"{SET_ASIDE}/{paths[b.id]}"]
        assert (run / moved[0]).read_bytes() == foreign  # never written into, never deleted
        assert store.pending([a, b, c]) == [a, b] and store.verify_files() == []
        store.commit(b, result_for(b))  # regenerated
        assert store.kept_image(b.id).getpixel((0, 0)) == (200, 30, 0)
    assert (run / moved[0]).read_bytes() == foreign


def test_commit_sets_aside_a_foreign_file_in_its_way(tmp_path):
    run = tmp_path / "run"
    job = make_job("fox")
    with RunStore.open(run) as store:
        target = run / store.image_path(job, "kept")
        target.parent.mkdir(parents=True)
        target.write_bytes(b"the user's file")
        store.commit(job, result_for(job))
        assert store.kept_image(job.id) is not None
    assert (run / SET_ASIDE / target.relative_to(run)).read_bytes() == b"the user's file"


# ------------------------------------------------------------------------- odd paths
def test_a_run_dir_path_that_is_not_utf8(tmp_path):
    run = tmp_path / os.fsdecode(b"run-\xff\xfe")
    finished_run(run)
    with RunStore.open(run, readonly=True) as reader:
        assert reader.counts()["status"]["kept"] == 3
    with RunStore.open(run) as store:
        assert store.verify_files() == []


def _namespace_ok() -> bool:
    return bool(shutil.which("unshare")) and subprocess.run(
        ["unshare", "-Urm", "true"], capture_output=True).returncode == 0


needs_namespace = pytest.mark.skipif(not _namespace_ok(), reason="needs `unshare -Urm` to mount a tmpfs")

TMPFS_PRELUDE = """
import json, os, subprocess, sys
from pathlib import Path
from PIL import Image
sys.path.insert(0, {tests!r})
from omnigen2_batch.store import RunStore, StoreError, StoreFull
from test_store import make_job, result_for
MNT = Path({mnt!r})

def fill(path, leave=0):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        os.close(fd)
    if leave:
        os.truncate(path, max(os.path.getsize(path) - leave, 0))

def listing():
    return sorted(str(p.relative_to(MNT)) for p in MNT.rglob("*"))
"""


def run_on_tmpfs(tmp_path, body: str, size: str) -> dict:
    """Run `body` in a private mount namespace with a tmpfs of `size` at MNT; returns its JSON."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = TMPFS_PRELUDE.format(tests=str(ROOT / "tests"), mnt=str(mnt)) + textwrap.dedent(body)
    done = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs -o size="$0" tmpfs "$1" && exec "$2" -c "$3"',
         size, str(mnt), sys.executable, script],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_namespace
def test_disk_full_before_the_first_write(tmp_path):
    out = run_on_tmpfs(tmp_path, """
        fill(MNT / "filler")
        try:
            RunStore.open(MNT / "run")
            error = None
        except StoreFull as exc:
            error = [str(exc), exc.exit_code]
        after_full = listing()
        os.unlink(MNT / "filler")
        with RunStore.open(MNT / "run") as store:
            store.commit(make_job("a"), result_for(make_job("a")))
            kept = store.counts()["status"]["kept"]
        print(json.dumps({"error": error, "after_full": after_full, "kept": kept}))
    """, size="256k")
    message, code = out["error"]
    assert code == 3 and "full" in message
    assert set(out["after_full"]) <= {"filler", "run", "run/.lock"}  # no manifest, no temp file
    assert out["kept"] == 1


@needs_namespace
def test_disk_full_during_a_commit_leaves_no_partial_file(tmp_path):
    out = run_on_tmpfs(tmp_path, """
        done, big = make_job("done"), make_job("big", "a big noisy fox")
        store = RunStore.open(MNT / "run")
        store.commit(done, result_for(done))
        before = listing()
        fill(MNT / "filler", leave=16384)
        result = result_for(big)
        result.attempts[0].image = Image.effect_noise((256, 256), 100).convert("RGB")
        try:
            store.commit(big, result)
            error = None
        except StoreFull as exc:
            error = exc.exit_code
        after = [p for p in listing() if p != "filler"]
        statuses = store.statuses()
        os.unlink(MNT / "filler")
        store.commit(big, result)
        print(json.dumps({"error": error, "before": before, "after": after,
                          "statuses": statuses, "kept": sorted(store.done_ids())}))
        store.close()
    """, size="2m")
    assert out["error"] == 3
    assert set(out["after"]) - set(out["before"]) <= {"run/manifest.sqlite-wal", "run/manifest.sqlite-shm",
                                                      "run/kept/prompts"}
    assert not [p for p in out["after"] if TEMP_PREFIX in p or "big" in p]
    assert list(out["statuses"].values()) == ["kept"]
    assert len(out["kept"]) == 2


@needs_namespace
def test_read_only_run_dir(tmp_path):
    out = run_on_tmpfs(tmp_path, """
        RunStore.open(MNT / "run").close()
        job = make_job("a")
        with RunStore.open(MNT / "run") as store:
            store.commit(job, result_for(job))
        subprocess.run(["mount", "-o", "remount,ro", str(MNT)], check=True)
        try:
            RunStore.open(MNT / "run")
            error = None
        except StoreError as exc:
            error = [type(exc).__name__, str(exc), exc.exit_code]
        try:
            RunStore.open(MNT / "new-run")
            new_error = None
        except StoreError as exc:
            new_error = [type(exc).__name__, exc.exit_code]
        with RunStore.open(MNT / "run", readonly=True) as reader:
            kept = reader.counts()["status"]["kept"]
        print(json.dumps({"error": error, "new_error": new_error, "kept": kept}))
    """, size="1m")
    name, message, code = out["error"]
    assert name == "NotWritable" and code == 2 and "writable" in message
    assert out["new_error"] == ["NotWritable", 2]
    assert out["kept"] == 1  # status still reads a read-only run dir

