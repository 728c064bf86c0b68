"""Thumbnails (thumbs/) and per-section contact sheets (sheets/).

Both are caches of the run's images: a thumbnail is remade when its image is newer, a sheet when
what it shows changed, because the report runs again at the end of every (resumed) run.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin

from ..images import ImageError, load_rgb
from ..jobs import ImageRef, Job
from .data import JobView, Run
from .files import is_temp, write_atomic
from .text import neutralise

log = logging.getLogger(__name__)

THUMB_PX = 256  # longest side of a thumbnail: sharp at card size on a HiDPI screen
SHEET_COLUMNS, SHEET_ROWS = 8, 25  # 200 images per contact sheet page
CELL_PX, CAPTION_PX = 128, 30  # a sheet is 8 x 128 = 1024 px wide
SHEET_KEY = "omnigen2_batch_sheet"  # PNG text chunk: a hash of what the sheet shows


def _workers() -> int:
    return min(8, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------- thumbnails
def job_thumb(job_id: str) -> str:
    return f"thumbs/{job_id}.jpg"


def attempt_thumb(job_id: str, n: int) -> str:
    return f"thumbs/{job_id}-{n}.jpg"


def variant_thumb(job_id: str, rank: int) -> str:
    return f"thumbs/{job_id}-v{rank}.jpg"


def ref_thumb(ref: ImageRef) -> str:
    """A reference's thumbnail: its job's, or one named by the file's content key."""
    if ref.job_id:
        return job_thumb(ref.job_id)
    return f"thumbs/ref-{hashlib.sha256(ref.key.encode()).hexdigest()[:16]}.jpg"


def shown_refs(job: Job) -> tuple[ImageRef, ...]:
    """The images the report shows beside a job's output: its references, the edit source and
    every other input image (a multi-subject shot's extra images too), each once."""
    source = (job.edit_source,) if job.edit_source else ()
    return tuple(dict.fromkeys(job.scoring.references + source + job.inputs))


def wanted_thumbnails(run: Run) -> dict[str, Path]:
    """Thumbnail path (relative to the run dir) -> the image it shrinks."""
    wanted: dict[str, Path] = {}
    for view in run.jobs:
        if view.row["image"]:
            wanted[job_thumb(view.id)] = run.root / view.row["image"]
        for variant in view.variants[1:]:
            wanted[variant_thumb(view.id, variant["rank"])] = run.root / variant["image"]
        if view.status == "rejected":
            for attempt in view.attempts:
                if attempt["image"]:
                    wanted[attempt_thumb(view.id, attempt["n"])] = run.root / attempt["image"]
        for ref in shown_refs(view.job):
            if not ref.job_id and ref.path:
                wanted[ref_thumb(ref)] = Path(ref.path)
    return wanted


def make_thumbnails(root: Path, wanted: dict[str, Path]) -> set[str]:
    """Write the missing or outdated thumbnails; return the ones that exist afterwards."""
    stale = {rel: src for rel, src in wanted.items() if not _fresh(root / rel, src)}
    with ThreadPoolExecutor(_workers()) as pool:
        made = pool.map(lambda item: _thumbnail(root / item[0], item[1]), stale.items())
        failed = {rel for rel, ok in zip(stale, made) if not ok}
    return set(wanted) - failed


def _fresh(thumb: Path, source: Path) -> bool:
    """Reruns of the report only shrink what is new or changed."""
    try:
        return thumb.stat().st_mtime >= source.stat().st_mtime
    except OSError:
        return False


def _thumbnail(dest: Path, source: Path) -> bool:
    try:
        image = load_rgb(source)
    except ImageError as err:
        dest.unlink(missing_ok=True)  # an old thumbnail must not stand in for a missing image
        log.warning("report: no thumbnail for %s", err)
        return False
    image.thumbnail((THUMB_PX, THUMB_PX))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=82)
    write_atomic(dest, buffer.getvalue())
    return True


# ------------------------------------------------------------------------------ contact sheets
def sheet_name(section: str, page: int) -> str:
    base = section.replace("/", "_")
    return f"{base}.png" if page == 0 else f"{base}-{page + 1}.png"


def write_contact_sheets(run: Run, made: set[str]) -> list[Path]:
    """sheets/<section>.png (then -2, -3, ... per 200 images): kept thumbnails with captions.

    A sheet whose content did not change since the last report is left alone: PNG encoding is
    the slow part."""
    folder, per_sheet = run.root / "sheets", SHEET_COLUMNS * SHEET_ROWS
    sheets: list[tuple[Path, str, list[JobView]]] = []
    for section, views in run.sections().items():
        kept = [v for v in views if v.status == "kept" and job_thumb(v.id) in made]
        pages = range(0, len(kept), per_sheet)
        for page, start in enumerate(pages):
            title = f"{run.meta.get('recipe_name', '')} / {section} / sheet {page + 1} of {len(pages)}"
            sheets.append((folder / sheet_name(section, page), title, kept[start:start + per_sheet]))
    with ThreadPoolExecutor(_workers()) as pool:  # zlib and resizing release the GIL
        written = list(pool.map(lambda sheet: _write_sheet(run.root, *sheet, run.tiny), sheets))
    # sections or pages that shrank; another writer's temp files are not ours to remove
    for stale in set(folder.glob("*.png")) - set(written):
        if not is_temp(stale):
            stale.unlink(missing_ok=True)
    return written


def _write_sheet(root: Path, path: Path, title: str, views: list[JobView], tiny: bool) -> Path:
    fits = CELL_PX // 6 - 1  # characters of the 6 px bitmap font that fit in a cell
    captions = [(_caption(v.row["name"])[:fits], _sheet_scores(v)[:fits]) for v in views]
    stamps = [(root / job_thumb(v.id)).stat().st_mtime_ns for v in views]
    layout = [SHEET_COLUMNS, CELL_PX, CAPTION_PX, THUMB_PX]
    signature = hashlib.sha256(json.dumps([layout, title, tiny, captions, stamps]).encode()).hexdigest()
    try:
        with Image.open(path) as old:
            if old.info.get(SHEET_KEY) == signature:
                return path
    except OSError:
        pass  # no sheet yet, or an unreadable one: write it
    sheet = _draw_sheet(root, _caption(title)[:100], views, captions, tiny)
    info = PngImagePlugin.PngInfo()
    info.add_text(SHEET_KEY, signature)
    buffer = io.BytesIO()
    sheet.save(buffer, "PNG", compress_level=1, pnginfo=info)
    return write_atomic(path, buffer.getvalue())


def _draw_sheet(root: Path, title: str, views: list[JobView], captions: list[tuple[str, str]],
                tiny: bool) -> Image.Image:
    header, cell = 24, CELL_PX - 8
    rows = -(-len(views) // SHEET_COLUMNS)
    sheet = Image.new("RGB", (SHEET_COLUMNS * CELL_PX, header + rows * (CELL_PX + CAPTION_PX)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default_imagefont()  # bitmap: 15x faster
    draw.text((6, 8), title, fill="black", font=font)
    if tiny:
        note = "tiny random-weight model: images are noise"
        draw.text((sheet.width - 6 - draw.textlength(note, font=font), 8), note, fill="red", font=font)
    for i, (view, (name, scores)) in enumerate(zip(views, captions)):
        x, y = (i % SHEET_COLUMNS) * CELL_PX, header + (i // SHEET_COLUMNS) * (CELL_PX + CAPTION_PX)
        with Image.open(root / job_thumb(view.id)) as image:
            thumb = ImageOps.contain(image, (cell, cell), Image.Resampling.BILINEAR)  # small ones grow
        sheet.paste(thumb, (x + (CELL_PX - thumb.width) // 2, y + (CELL_PX - thumb.height) // 2))
        draw.text((x + 4, y + CELL_PX), name, fill="black", font=font)
        draw.text((x + 4, y + CELL_PX + 13), scores, fill="dimgray", font=font)
    return sheet


def _sheet_scores(view: JobView) -> str:
    """Scores for a caption, the metrics with a threshold first: they decided the outcome."""
    decisive = view.job.scoring.thresholds
    order = sorted(view.scores, key=lambda metric: (metric not in decisive, metric))
    return _caption(" ".join(f"{metric} {view.scores[metric]:.2f}" for metric in order))


def _caption(text: str) -> str:
    """User text for the bitmap font: bidi controls shown as markers (the font draws left to
    right and knows no bidi, but the marker says the recipe had one); it only has Latin-1
    glyphs, so other characters become '?'."""
    return neutralise(text).encode("latin-1", "replace").decode("latin-1")
