"""The HTML report, thumbnails and contact sheets, checked on synthetic run dirs and in a real
headless Chromium (every image loads, the counts shown match the manifest, no console errors)."""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from click.testing import CliRunner
from PIL import Image

from helpers_rundir import TEXT_MIN, XSS_PROMPT, kept, open_run, rejected, write_bulk_run, write_mixed_run
from omnigen2_batch.cli import main
from omnigen2_batch.jobs import Job, Scoring
from omnigen2_batch.report import ReportError, write_report

CHROMIUM = os.environ.get("OMNIGEN2_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def mixed_run(tmp_path: Path) -> Path:
    run = write_mixed_run(tmp_path / "run", tmp_path / "refs")
    write_report(run)
    return run


def manifest(run: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(run / "manifest.sqlite") as db:
        return db.execute(sql, args).fetchall()


def page_data(run: Path) -> dict:
    text = (run / "report.html").read_text()
    blob = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
    return json.loads(blob.group(1))


# ----------------------------------------------------------------------------- without a browser
def test_prompts_are_escaped_in_the_html(mixed_run: Path) -> None:
    text = (mixed_run / "report.html").read_text()
    assert "window.__pwned" in text  # the prompt is there ...
    assert "<script>window" not in text and "<img src=x" not in text  # ... but never as markup
    assert text.count("<script") == 2  # the data blob and our own code
    assert "mixed &lt;sections&gt;" in text  # recipe name from meta, escaped too


def test_contact_sheets_show_the_kept_thumbnails(mixed_run: Path) -> None:
    sheets = sorted(p.name for p in (mixed_run / "sheets").iterdir())
    assert sheets == ["bilingual_节日.png", "edits.png", "prompts.png", "series_hero.png"]
    first_kept = manifest(mixed_run, "SELECT id FROM jobs WHERE section='prompts' AND status='kept' ORDER BY ord")[0][0]
    with Image.open(mixed_run / "thumbs" / f"{first_kept}.jpg") as thumb:
        corner = thumb.convert("RGB").getpixel((2, 2))
    with Image.open(mixed_run / "sheets" / "prompts.png") as sheet:
        assert sheet.width == 8 * 128  # eight cells a row; three kept images in the first
        cell = sheet.convert("RGB").getpixel((4 + 4, 24 + 4 + 4))  # first cell, inside the image
    assert max(abs(a - b) for a, b in zip(cell, corner)) < 12


def test_sheets_page_and_stale_sheets_go(tmp_path: Path) -> None:
    run = write_bulk_run(tmp_path / "run", n_jobs=260, sections=1)  # over 200 kept: two sheets
    (run / "sheets").mkdir()
    (run / "sheets" / "gone_section.png").write_bytes(b"stale")
    write_report(run)
    kept = dict(manifest(run, "SELECT section, COUNT(*) FROM jobs WHERE status='kept' GROUP BY section"))
    names = {p.name for p in (run / "sheets").iterdir()}
    assert max(kept.values()) > 200
    expected = set()
    for section, n in kept.items():
        expected |= {f"{section}.png"} | {f"{section}-{page}.png" for page in range(2, -(-n // 200) + 1)}
    assert names == expected


def test_missing_image_becomes_a_placeholder_not_a_broken_link(tmp_path: Path) -> None:
    run = write_mixed_run(tmp_path / "run", tmp_path / "refs")
    write_report(run)
    job_id, image = manifest(run, "SELECT id, image FROM jobs WHERE name='p0'")[0]
    (run / image).unlink()  # e.g. deleted by hand after the first report
    write_report(run)
    card = next(c for c in page_data(run)["lists"]["s0"]["items"] if c["id"] == job_id)
    assert card["t"] is None and not (run / "thumbs" / f"{job_id}.jpg").exists()


def test_thumbnails_are_reused_until_the_image_changes(mixed_run: Path) -> None:
    job_id, image = manifest(mixed_run, "SELECT id, image FROM jobs WHERE name='p2'")[0]
    thumb = mixed_run / "thumbs" / f"{job_id}.jpg"
    os.utime(thumb, (1, 1))
    os.utime(mixed_run / image, (0, 0))
    write_report(mixed_run)
    assert thumb.stat().st_mtime == 1  # untouched: the image is older than its thumbnail
    Image.new("RGB", (64, 64), (0, 255, 0)).save(mixed_run / image)
    write_report(mixed_run)
    with Image.open(thumb) as rebuilt:
        assert rebuilt.convert("RGB").getpixel((32, 32))[1] > 200


def test_rejected_job_reports_the_attempt_that_made_its_image(mixed_run: Path) -> None:
    item = page_data(mixed_run)["lists"]["rejected"]["items"][0]
    assert [a["st"] for a in item["att"]] == ["initial", "new_seed", "stronger_guidance"]
    assert item["sc"] == {"text": 0.21}  # attempt 1 made the image, not the last attempt
    assert "best was attempt 1" in item["why"] and "text 0.210 < 0.25" in item["why"]


def test_a_run_that_has_not_finished_anything(tmp_path: Path) -> None:
    with open_run(tmp_path / "run", "fresh") as store:
        store.add_jobs([Job("prompts", f"p{i}", "t2i", f"prompt {i}", model="tiny") for i in range(3)])
    text = write_report(tmp_path / "run").read_text()
    assert '<dd data-count="pending">3</dd>' in text and '<dd data-count="kept">0</dd>' in text
    assert "Nothing finished yet." in text and not (tmp_path / "run" / "sheets").exists()


def test_cli_report_and_a_bad_run_dir(mixed_run: Path, tmp_path: Path) -> None:
    (mixed_run / "report.html").unlink()
    result = CliRunner().invoke(main, ["report", str(mixed_run)])
    assert result.exit_code == 0 and (mixed_run / "report.html").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["report", str(empty)])
    assert result.exit_code == 2 and "not a run directory" in result.output
    with pytest.raises(ReportError):
        write_report(empty)


# --------------------------------------------------------------------------------- in Chromium
@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip("no chromium on PATH (apt-get install -y chromium); CI installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Page:
    """A report opened in Chromium, with every console error and failed request collected."""

    def __init__(self, browser, path: Path):
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.errors.append(f"failed: {r.url}"))
        self.page.goto(path.as_uri())

    def show_everything(self) -> None:
        while self.page.locator("button.more:visible").count():
            self.page.locator("button.more:visible").first.click()

    def broken_images(self) -> list[str]:
        """Scroll each image into view (they load lazily), wait for it, return the broken ones."""
        return self.page.evaluate("""async () => {
            const broken = [];
            for (const img of document.images) {
                img.scrollIntoView();
                if (!img.complete) await new Promise(r => { img.onload = img.onerror = r; });
                if (!(img.naturalWidth > 0)) broken.push(img.getAttribute("src"));
            }
            return broken;
        }""")

    def texts(self, selector: str) -> list[str]:
        return self.page.locator(selector).all_inner_texts()


def check_against_manifest(page: Page, run: Path, banner: str = "#tiny-banner") -> None:
    """Every image loads, the counts shown are the manifest's, every job with an image is shown."""
    page.show_everything()
    assert page.broken_images() == []
    counts = dict(manifest(run, "SELECT status, COUNT(*) FROM jobs GROUP BY status"))
    shown = {s: int(page.page.locator(f'[data-count="{s}"]').inner_text()) for s in counts}
    assert shown == counts
    assert int(page.page.locator('[data-count="jobs"]').inner_text()) == sum(counts.values())
    for section, status, n in manifest(run, "SELECT section, status, COUNT(*) FROM jobs GROUP BY 1, 2"):
        block = page.page.locator(f'section[data-section="{section}"] [data-section-count="{status}"]')
        assert int(block.inner_text()) == n
    with_image = {row[0] for row in manifest(run, "SELECT id FROM jobs WHERE image IS NOT NULL")}
    on_page = set(page.page.locator(".run-section [data-job]").evaluate_all("ns => ns.map(n => n.dataset.job)"))
    assert on_page == with_image
    links = page.page.locator("a[href]").evaluate_all("as => as.map(a => a.href)")
    targets = {Path(unquote(urlparse(link).path)) for link in links}
    assert len(targets) > len(with_image) and all(target.is_file() for target in targets)
    assert page.page.locator(banner).is_visible()
    assert page.errors == []


@pytest.mark.browser
def test_report_in_chromium(browser, mixed_run: Path, tmp_path: Path) -> None:
    page = Page(browser, mixed_run / "report.html")
    check_against_manifest(page, mixed_run)
    assert page.page.locator("img").count() >= 16  # every kept/rejected job, refs, attempts
    page.page.screenshot(path=str(tmp_path / "report.png"), full_page=True)


@pytest.mark.slow
@pytest.mark.browser
def test_quickstart_run_report_in_chromium(browser, tmp_path: Path) -> None:
    """The real thing: the quickstart runs the toy model through every section, and writes the report."""
    recipe = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code in (0, 1), result.output  # 1: some job rejected by the toy CLIP
    run = tmp_path / "run"
    page = Page(browser, run / "report.html")
    check_against_manifest(page, run, banner="#toy-banner")
    page.page.screenshot(path=str(tmp_path / "quickstart.png"), full_page=True)
    assert page.page.locator("#tiny-banner").count() == 0
    sections = {row[0] for row in manifest(run, "SELECT DISTINCT section FROM jobs WHERE status='kept'")}
    assert {p.name for p in (run / "sheets").iterdir()} == {f"{s.replace('/', '_')}.png" for s in sections}


@pytest.mark.browser
def test_chromium_shows_prompts_as_text_and_the_detail_tables(browser, mixed_run: Path) -> None:
    page = Page(browser, mixed_run / "report.html")
    page.show_everything()
    assert page.page.evaluate("window.__pwned") is None
    assert XSS_PROMPT in page.texts('section[data-section="prompts"] .prompt')

    rejected = page.page.locator("#rejected .rejected-job")
    assert rejected.count() == 1
    rows = rejected.locator("tbody tr")
    assert [rows.nth(i).locator("td").nth(2).inner_text() for i in range(3)] == \
        ["initial", "new_seed", "stronger_guidance"]
    assert "best was attempt 1" in rejected.locator(".why").inner_text()
    assert "out of memory <2 GiB>" in page.texts("#failed .error")[0]

    pairs = [row.split("\t") for row in page.texts('section[data-kind="bilingual"] tbody tr')]
    by_pair = {cells[0]: [c.strip() for c in cells[-4:]] for cells in pairs}
    assert by_pair["pair0"] == ["0.310", "0.240", "0.070", "0.820"]
    assert by_pair["pair1"] == ["0.310", "0.250", "0.060", "n/a"]  # no pairs row: gap from the two text scores
    edits = page.page.locator('section[data-kind="edit"] tbody tr')
    assert edits.count() == 2 and "hero ref #1.png" in edits.first.locator("img").first.get_attribute("alt")
    assert page.errors == []


@pytest.mark.browser
def test_chromium_pages_long_lists(browser, tmp_path: Path) -> None:
    run = write_bulk_run(tmp_path / "run", n_jobs=130, sections=2)
    write_report(run)
    page = Page(browser, run / "report.html")
    gallery = page.page.locator('section[data-section="section0"]')
    with_image = manifest(run, "SELECT COUNT(*) FROM jobs WHERE section='section0' AND image IS NOT NULL")[0][0]
    assert with_image > 48 and gallery.locator(".card").count() == 48
    gallery.locator("button.more").click()
    assert gallery.locator(".card").count() == min(96, with_image)
    page.show_everything()
    assert gallery.locator(".card").count() == with_image
    assert page.broken_images() == [] and page.errors == []


RLO = "\u202e"  # RIGHT-TO-LEFT OVERRIDE: reverses what follows it, up to the end of the paragraph


def write_bidi_run(root: Path) -> Path:
    """Overrides in a recipe name, a section, a job name and a prompt; a Hebrew section and job."""
    with open_run(root, f"bidi {RLO}recipe") as store:
        kept(store, Job(f"evil{RLO}section", f"name{RLO}x", "t2i", f"{RLO}gnp.exe a cat", model="tiny",
                        scoring=Scoring(thresholds=TEXT_MIN)), {"text": 0.3})
        rejected(store, Job("ספר", "פרק", "t2i", "שלום עולם", model="tiny", scoring=Scoring(thresholds=TEXT_MIN)),
                 [0.1, 0.2], best=1)
    write_report(root)
    return root


def left_to_right(locator) -> bool:
    """Whether the characters of the element's text are laid out left to right, in order."""
    return locator.evaluate("""el => {
        const xs = [], walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT), range = document.createRange();
        for (let node; (node = walker.nextNode());) {
            for (let i = 0; i < node.length; i++) {
                range.setStart(node, i); range.setEnd(node, i + 1);
                const box = range.getBoundingClientRect();
                if (box.width > 0) xs.push(box.left);
            }
        }
        return xs.length > 1 && xs.every((x, i) => i === 0 || x > xs[i - 1]);
    }""")


@pytest.mark.browser
def test_chromium_user_text_cannot_reorder_the_page(browser, tmp_path: Path) -> None:
    run = write_bidi_run(tmp_path / "run")
    page = Page(browser, run / "report.html")
    assert RLO not in page.page.inner_text("body") and RLO not in page.page.title()
    assert "[U+202E]" in page.page.inner_text("body")  # shown for what it is, not obeyed
    section = page.page.locator(f'section[data-section="evil{RLO}section"]')
    assert left_to_right(section.locator("h2 small"))  # "gallery", the page's text after the name
    card = section.locator(".card figcaption")
    assert left_to_right(card.locator(".badge"))  # "kept", after the job name
    assert card.locator(".badge").bounding_box()["x"] > card.locator("b").bounding_box()["x"]
    # right-to-left text stays in its isolate: section, then " / ", then job name, left to right
    heading = page.page.locator("#rejected h3 bdi")
    assert heading.nth(0).inner_text() == "ספר"
    assert heading.nth(0).bounding_box()["x"] < heading.nth(1).bounding_box()["x"]
    check_against_manifest(page, run)  # the names still find their sections, counts still match
