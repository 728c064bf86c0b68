"""The run report: one offline HTML page, thumbnails and per-section contact sheets.

data (the run read from the store) -> images (thumbs/, sheets/), grids (grids/) -> page (+ plots) -> report.html.
Never imports torch. text.py makes user text safe to show; files.py writes everything atomically.
"""
from __future__ import annotations

import os
from pathlib import Path

from .data import load_run
from .files import ReportError, report_errors, write_atomic
from .grids import write_grids
from .images import make_thumbnails, wanted_thumbnails, write_contact_sheets
from .page import render_page

__all__ = ["ReportError", "write_report"]


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write RUN_DIR/report.html (plus thumbs/ and sheets/) and return the page's path.

    The page is rebuilt from the manifest on every call, never skipped as "unchanged": a kill
    between a run's last commit and its report would otherwise leave a stale page for good. Only
    thumbnails and sheets are reused while their images are unchanged. Any number of calls may
    run at once on one run dir; each writes a complete page, or raises ReportError and leaves the
    previous page as it was.
    """
    run = load_run(Path(run_dir))
    with report_errors(run.root):
        made = make_thumbnails(run.root, wanted_thumbnails(run))
        write_contact_sheets(run, made)
        grids = write_grids(run)
        page = render_page(run, made, grids)
        return write_atomic(run.root / "report.html", page.encode(), durable=True)
