"""The report under faults (issue 9): concurrent writers, a read-only run dir, a full disk,
superseded jobs, and a report that must follow the manifest however the last run ended.

Writers run as real processes, so they race for real; a full disk is a file-size limit
(RLIMIT_FSIZE) on the writer, and a read-only dir is a dir without write bits, written by a
process that cannot override them (root drops that capability through setpriv)."""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers_rundir import kept, write_bulk_run, write_mixed_run
from omnigen2_batch.jobs import Job, Scoring
from omnigen2_batch.report import ReportError, write_report
from omnigen2_batch.store import TEMP_PREFIX, RunStore

REPO = Path(__file__).resolve().parents[1]
WRITER = """import sys
from omnigen2_batch.report import ReportError, write_report
try:
    write_report(sys.argv[1])
except ReportError as err:
    sys.exit(f"ReportError: {err}")
"""
NO_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def start_writer(run: Path, prefix: list[str] = (), preexec=None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([*prefix, sys.executable, "-c", WRITER, str(run)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec)


def finish(writer: subprocess.Popen) -> tuple[int, str]:
    _, err = writer.communicate(timeout=120)
    return writer.returncode, err


def manifest(run: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(run / "manifest.sqlite") as db:
        return db.execute(sql, args).fetchall()


def page_data(run: Path) -> dict:
    text = (run / "report.html").read_text()
    assert text.endswith("</html>\n")  # complete, not cut short
    blob = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
    return json.loads(blob.group(1))


def shown_ids(data: dict) -> set[str]:
    """Every job id anywhere in the page's lists (cards, pairs, rejected, failed)."""
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            found.update([node["id"]] if isinstance(node.get("id"), str) else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(data["lists"])
    return found


def temp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if p.name.startswith(TEMP_PREFIX)]


# ----------------------------------------------------------------------------- several writers
def test_concurrent_report_writers_all_succeed(tmp_path: Path) -> None:
    run = write_bulk_run(tmp_path / "run", n_jobs=120, sections=1)  # one big sheet: slow to write
    with_image = {row[0] for row in manifest(run, "SELECT id FROM jobs WHERE image IS NOT NULL")}
    for _ in range(3):  # from scratch each round, so the writers make every file at the same time
        for made in ("thumbs", "sheets"):
            shutil.rmtree(run / made, ignore_errors=True)
        writers = [start_writer(run) for _ in range(3)]
        assert [finish(w) for w in writers] == [(0, "")] * 3
        assert shown_ids(page_data(run)) >= with_image
        assert temp_files(run) == []
        assert [p.name for p in (run / "sheets").iterdir()] == ["section0.png"]


# ------------------------------------------------------------------------- failures to write
def read_only(run: Path) -> None:
    for path in [run, *run.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)


def writable(run: Path) -> None:
    for path in [run, *run.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)


def test_read_only_run_dir_is_a_clear_error_and_the_old_report_stays(tmp_path: Path) -> None:
    prefix = NO_OVERRIDE if os.geteuid() == 0 else []
    if prefix and not shutil.which("setpriv"):
        pytest.skip("root ignores file modes, and setpriv (util-linux) is not here to drop that")
    run = write_mixed_run(tmp_path / "run", tmp_path / "refs")
    old = write_report(run).read_bytes()
    read_only(run)
    try:
        code, err = finish(start_writer(run, prefix))
    finally:
        writable(run)
    assert code == 1 and err.startswith("ReportError: cannot write the report at ")
    assert str(run.resolve()) in err and "Traceback" not in err
    assert (run / "report.html").read_bytes() == old and temp_files(run) == []


def limit_file_size(limit: int):
    def apply() -> None:  # in the writer: a write past the limit fails with EFBIG instead of a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("fails_at", ["thumbs", "report.html"])
def test_a_full_disk_is_a_clear_error_and_leaves_no_partial_report(tmp_path: Path, fails_at: str) -> None:
    run = write_bulk_run(tmp_path / "run", n_jobs=150, sections=1)
    old = write_report(run).read_bytes()
    limit = 40_000  # under the page (~60 kB), over the manifest's shared-memory file (32 kB)
    assert len(old) > limit
    if fails_at == "thumbs":  # a noisy image: its thumbnail is over the limit, and comes before the page
        image = manifest(run, "SELECT image FROM jobs WHERE status='kept' ORDER BY ord LIMIT 1")[0][0]
        Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3)).save(run / image)
    code, err = finish(start_writer(run, preexec=limit_file_size(limit)))
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"ReportError: cannot write the report at {run.resolve() / fails_at}")
    assert "no space left" in err
    assert (run / "report.html").read_bytes() == old and temp_files(run) == []


# ---------------------------------------------------------------------- what the page shows
def test_superseded_jobs_are_not_shown_or_counted(tmp_path: Path) -> None:
    run = write_mixed_run(tmp_path / "run", tmp_path / "refs")
    # What the store does when a recipe drops jobs (status "superseded"), done here in SQL
    # because the store's own method is still being written.
    gone = {row[0] for row in manifest(run, "SELECT id FROM jobs WHERE name IN ('p0', 'hard', 'pair0-en')")}
    with sqlite3.connect(run / "manifest.sqlite") as db:
        db.executemany("UPDATE jobs SET status='superseded' WHERE id=?", [(i,) for i in gone])
    write_report(run)
    data, text = page_data(run), (run / "report.html").read_text()

    assert shown_ids(data).isdisjoint(gone)
    live = manifest(run, "SELECT status, COUNT(*) FROM jobs WHERE status != 'superseded' GROUP BY status")
    for status, n in live:
        assert f'<dd data-count="{status}">{n}</dd>' in text
    assert f'<dd data-count="jobs">{sum(n for _, n in live)}</dd>' in text
    assert "superseded" not in text
    assert data["lists"]["rejected"]["items"] == []
    pair0 = next(p for p in data["lists"]["s3"]["items"] if p["pair"] == "pair0")
    assert pair0["en"] is None and pair0["sim"] is None  # its pairs row measured the superseded job
    attempts = manifest(run, "SELECT COUNT(*) FROM attempts JOIN jobs ON jobs.id = job_id "
                             "WHERE status != 'superseded' AND attempts.scores LIKE '%\"text\"%'")[0][0]
    histogram = re.search(r'aria-label="text: every attempt">(.*?)</svg>', text, re.S).group(1)
    assert sum(int(n) for n in re.findall(r"<title>(\d+)</title>", histogram)) == attempts


def test_every_report_follows_the_manifest(tmp_path: Path) -> None:
    """A run killed between its last commit and its report: the next report shows that commit."""
    run = write_mixed_run(tmp_path / "run", tmp_path / "refs")
    write_report(run)
    with RunStore.open(run) as store:
        late = kept(store, Job("prompts", "late", "t2i", "a late job", model="tiny"), {"text": 0.4})
    write_report(run)
    assert late.id in shown_ids(page_data(run))
    total = manifest(run, "SELECT COUNT(*) FROM jobs")[0][0]
    assert f'<dd data-count="jobs">{total}</dd>' in (run / "report.html").read_text()


def test_one_rule_for_the_side_of_a_bilingual_pair() -> None:
    def side(lang: str, pair: str = "p") -> str | None:
        return Job("b", "j", "t2i", "x", lang=lang, scoring=Scoring(pair=pair)).pair_side

    assert [side("en"), side("zh"), side("zh-Hans"), side("ja")] == ["en", "zh", "zh", "zh"]
    assert side("en", pair="") is None


@pytest.mark.parametrize("folder", ["thumbs", "sheets"])
def test_a_report_folder_that_is_a_link_is_refused_and_nothing_written_through_it(
        tmp_path: Path, folder: str) -> None:
    run = write_mixed_run(tmp_path / "run", tmp_path / "refs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(run / folder, ignore_errors=True)
    (run / folder).symlink_to(elsewhere)
    with pytest.raises(ReportError, match="link"):
        write_report(run)
    assert list(elsewhere.iterdir()) == []
