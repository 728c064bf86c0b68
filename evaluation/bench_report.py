"""How long the report takes for a big run, how big the page is, and how fast Chromium opens it.

Builds a synthetic run dir of N jobs (tiny images, written through the real RunStore), then times
`write_report` twice: cold (every thumbnail and contact sheet made) and warm (all reused). Prints
the times, the size of report.html, thumbs/ and sheets/, and, when Chromium and Playwright are
installed, how long the page takes to load and how many DOM elements it starts with.

    python evaluation/bench_report.py [--jobs 10000] [--run DIR]   (DIR is reused if it exists)
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from omnigen2_batch.report import write_report
from synthetic_run import write_bulk_run  # beside this file: python puts evaluation/ on the path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def time_report(run: Path) -> Path:
    for generated in ("thumbs", "sheets"):
        shutil.rmtree(run / generated, ignore_errors=True)
    for label in ("cold", "warm"):
        start = time.perf_counter()
        page = write_report(run)
        print(f"write_report ({label}): {time.perf_counter() - start:.2f} s")
    return page


def time_in_chromium(page: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("chromium: not installed, page load not measured")
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        tab = browser.new_page()
        start = time.perf_counter()
        tab.goto(page.as_uri(), wait_until="load")
        seconds = time.perf_counter() - start
        elements = tab.evaluate("document.getElementsByTagName('*').length")
        images = tab.evaluate("document.images.length")
        print(f"chromium: page loaded in {seconds:.2f} s with {elements} elements, {images} images")
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--run", type=Path, help="run dir to build (or reuse); default: a temp dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        run = args.run or Path(temp) / "run"
        if (run / "manifest.sqlite").exists():
            print(f"reusing the synthetic run in {run}")
        else:
            start = time.perf_counter()
            write_bulk_run(run, args.jobs)
            print(f"synthetic run of {args.jobs} jobs written in {time.perf_counter() - start:.1f} s")
        page = time_report(run)
        print(f"report.html: {page.stat().st_size / 2**20:.2f} MiB")
        for name in ("thumbs", "sheets"):
            count, size = folder_size(run / name)
            print(f"{name}/: {count} files, {size / 2**20:.1f} MiB")
        time_in_chromium(page)


if __name__ == "__main__":
    main()
