"""The run report: one offline HTML page, thumbnails and per-section contact sheets.

Reads the manifest through the store (read-only, no lock, so it also works while a run writes)
and the image files; never imports torch. The page is self-contained: CSS, JS and SVG plots are
inline, images are relative paths to small thumbnails under RUN_DIR/thumbs/, and galleries are
drawn page by page from an inline JSON blob, so 10,000 jobs do not mean 10,000 DOM nodes.
Everything that came from a recipe is escaped (html.escape here, textContent in the JS).
"""
from __future__ import annotations

import datetime
import hashlib
import html
import io
import json
import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from statistics import mean
from typing import Any
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin

from .errors import UserError
from .images import ImageError, load_rgb
from .jobs import ImageRef, Job
from .store import TEMP_PREFIX, RunStore, StoreError, is_tiny

log = logging.getLogger(__name__)

THUMB_PX = 256  # longest side of a thumbnail: sharp at card size on a HiDPI screen
SHEET_COLUMNS, SHEET_ROWS = 8, 25  # 200 images per contact sheet page
CELL_PX, CAPTION_PX = 128, 30  # a sheet is 8 x 128 = 1024 px wide
SHEET_KEY = "omnigen2_batch_sheet"  # PNG text chunk: a hash of what the sheet shows
TINY_BANNER = ("Made by the tiny random-weight model: images are noise. They show that the "
               "pipeline ran, not what OmniGen2 can do.")


class ReportError(UserError):
    """The report cannot be written; the message says why and what to do."""


@dataclass
class JobView:
    """A manifest row with its decoded job, its attempts and the attempt its image came from."""

    row: dict[str, Any]
    job: Job
    attempts: list[dict[str, Any]]
    best: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return self.row["id"]

    @property
    def status(self) -> str:
        return self.row["status"]

    @property
    def scores(self) -> dict[str, float]:
        return (self.best or {}).get("scores") or {}


@dataclass
class Run:
    root: Path
    meta: dict[str, str]
    jobs: list[JobView]
    pairs: list[dict[str, Any]]
    by_id: dict[str, JobView] = field(init=False)

    def __post_init__(self) -> None:
        self.by_id = {view.id: view for view in self.jobs}

    def sections(self) -> dict[str, list[JobView]]:
        """Section name -> its jobs, sections in plan order."""
        groups: dict[str, list[JobView]] = {}
        for view in self.jobs:
            groups.setdefault(view.row["section"], []).append(view)
        return groups


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write RUN_DIR/report.html (plus thumbs/ and sheets/) and return the page's path."""
    run = load_run(Path(run_dir))
    made = make_thumbnails(run.root, wanted_thumbnails(run))
    write_contact_sheets(run, made)
    return _write_atomic(run.root / "report.html", render_page(run, made).encode())


# ------------------------------------------------------------------------------------- loading
def load_run(run_dir: Path) -> Run:
    try:
        store = RunStore.open(run_dir, readonly=True)
    except StoreError as err:
        raise ReportError(str(err)) from err
    with store:
        views = [JobView(row, Job.from_dict(row["job"]), store.attempts(row["id"])) for row in store.jobs()]
        run = Run(store.run_dir, store.meta(), views, store.pairs())
    for view in views:
        view.best = next((a for a in view.attempts if a["n"] == view.row["best"]), None)
    return run


def _workers() -> int:
    return min(8, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------- thumbnails
def job_thumb(job_id: str) -> str:
    return f"thumbs/{job_id}.jpg"


def ref_thumb(ref: ImageRef) -> str:
    """A reference's thumbnail: its job's, or one named by the file's content key."""
    if ref.job_id:
        return job_thumb(ref.job_id)
    return f"thumbs/ref-{hashlib.sha256(ref.key.encode()).hexdigest()[:16]}.jpg"


def shown_refs(job: Job) -> tuple[ImageRef, ...]:
    """The images the report shows beside a job's output: references and the edit source."""
    return job.scoring.references + ((edit_source(job),) if job.kind == "edit" and edit_source(job) else ())


def edit_source(job: Job) -> ImageRef | None:
    return job.scoring.source or (job.inputs[0] if job.inputs else None)


def wanted_thumbnails(run: Run) -> dict[str, Path]:
    """Thumbnail path (relative to the run dir) -> the image it shrinks."""
    wanted: dict[str, Path] = {}
    for view in run.jobs:
        if view.row["image"]:
            wanted[job_thumb(view.id)] = run.root / view.row["image"]
        if view.status == "rejected":
            for attempt in view.attempts:
                if attempt["image"]:
                    wanted[f"thumbs/{view.id}-{attempt['n']}.jpg"] = run.root / attempt["image"]
        for ref in shown_refs(view.job):
            if not ref.job_id and ref.path:
                wanted[ref_thumb(ref)] = Path(ref.path)
    return wanted


def make_thumbnails(root: Path, wanted: dict[str, Path]) -> set[str]:
    """Write the missing or outdated thumbnails; return the ones that exist afterwards."""
    stale = {rel: src for rel, src in wanted.items() if not _fresh(root / rel, src)}
    (root / "thumbs").mkdir(exist_ok=True)
    with ThreadPoolExecutor(_workers()) as pool:
        failed = {rel for rel, ok in zip(stale, pool.map(lambda i: _thumbnail(root / i[0], i[1]), stale.items()))
                  if not ok}
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
    temp = dest.with_name(f"{TEMP_PREFIX}{os.getpid()}-{dest.name}")
    image.save(temp, "JPEG", quality=82)
    os.replace(temp, dest)
    return True


# ------------------------------------------------------------------------------ contact sheets
def sheet_name(section: str, page: int) -> str:
    base = section.replace("/", "_")
    return f"{base}.png" if page == 0 else f"{base}-{page + 1}.png"


def write_contact_sheets(run: Run, made: set[str]) -> list[Path]:
    """sheets/<section>.png (then -2, -3, ... per 200 images): kept thumbnails with captions.

    A sheet whose content did not change since the last report is left alone: PNG encoding is
    the slow part, and the report runs again at the end of every (resumed) run."""
    folder, per_sheet = run.root / "sheets", SHEET_COLUMNS * SHEET_ROWS
    sheets: list[tuple[Path, str, list[JobView]]] = []
    for section, views in run.sections().items():
        kept = [v for v in views if v.status == "kept" and job_thumb(v.id) in made]
        pages = range(0, len(kept), per_sheet)
        for page, start in enumerate(pages):
            title = f"{run.meta.get('recipe_name', '')} / {section} / sheet {page + 1} of {len(pages)}"
            sheets.append((folder / sheet_name(section, page), title, kept[start:start + per_sheet]))
    tiny = _is_tiny_run(run)
    with ThreadPoolExecutor(_workers()) as pool:  # zlib and resizing release the GIL
        written = list(pool.map(lambda sheet: _write_sheet(run.root, *sheet, tiny), sheets))
    for stale in set(folder.glob("*.png")) - set(written):  # sections or pages that shrank
        stale.unlink()
    return written


def _write_sheet(root: Path, path: Path, title: str, views: list[JobView], tiny: bool) -> Path:
    fits = CELL_PX // 6 - 1  # characters of the 6 px bitmap font that fit in a cell
    captions = [(_latin1(v.row["name"][:fits]), _sheet_scores(v)[:fits]) for v in views]
    stamps = [(root / job_thumb(v.id)).stat().st_mtime_ns for v in views]
    layout = [SHEET_COLUMNS, CELL_PX, CAPTION_PX, THUMB_PX]
    signature = hashlib.sha256(json.dumps([layout, title, tiny, captions, stamps]).encode()).hexdigest()
    try:
        with Image.open(path) as old:
            if old.info.get(SHEET_KEY) == signature:
                return path
    except OSError:
        pass  # no sheet yet, or an unreadable one: write it
    sheet = _draw_sheet(root, title, views, captions, tiny)
    info = PngImagePlugin.PngInfo()
    info.add_text(SHEET_KEY, signature)
    buffer = io.BytesIO()
    sheet.save(buffer, "PNG", compress_level=1, pnginfo=info)
    return _write_atomic(path, buffer.getvalue())


def _draw_sheet(root: Path, title: str, views: list[JobView], captions: list[tuple[str, str]],
                tiny: bool) -> Image.Image:
    header, cell = 24, CELL_PX - 8
    rows = -(-len(views) // SHEET_COLUMNS)
    sheet = Image.new("RGB", (SHEET_COLUMNS * CELL_PX, header + rows * (CELL_PX + CAPTION_PX)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default_imagefont()  # bitmap: 15x faster
    draw.text((6, 8), _latin1(title[:100]), fill="black", font=font)
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


# ------------------------------------------------------------------------------------ the page
def render_page(run: Run, made: set[str]) -> str:
    page = PageBuilder(run, made)
    body = [_header_html(run), _nav_html(run), _summary_html(run), _plots_html(run)]
    body += [page.section_html(i, name, views) for i, (name, views) in enumerate(run.sections().items())]
    body += [page.rejected_html(), page.failed_html()]
    assets = resources.files(__package__) / "report_assets"
    title = f"{run.meta.get('recipe_name') or run.root.name} · omnigen2-batch report"
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{(assets / 'report.css').read_text()}</style></head>"
        f"<body>{''.join(body)}"
        f'<noscript><p class="banner">The galleries need JavaScript; the images are under kept/ '
        f"and rejected/, and sheets/ holds contact sheets.</p></noscript>"
        f'<script type="application/json" id="report-data">{_script_json({"lists": page.lists})}</script>'
        f"<script>{(assets / 'report.js').read_text()}</script></body></html>\n")


class PageBuilder:
    """Turns job views into server-side HTML (small parts) and paged JSON lists (large parts)."""

    def __init__(self, run: Run, made: set[str]):
        self.run, self.made = run, made
        self.lists: dict[str, dict[str, Any]] = {}

    def thumb(self, rel: str) -> str | None:
        return quote(rel) if rel in self.made else None

    def card(self, view: JobView) -> dict[str, Any]:
        image = view.row["image"]
        return {"id": view.id, "n": view.row["name"], "s": view.status, "t": self.thumb(job_thumb(view.id)),
                "f": quote(image) if image else None, "p": view.job.prompt, "sc": _rounded(view.scores)}

    def pager(self, list_id: str, kind: str, items: list[dict[str, Any]]) -> str:
        self.lists[list_id] = {"type": kind, "items": items}
        return f'<div class="pager" data-list="{list_id}" data-total="{len(items)}"></div>'

    def section_html(self, index: int, name: str, views: list[JobView]) -> str:
        kind = section_kind(views)
        counts = Counter(v.status for v in views)
        shown = [v for v in views if v.row["image"]]
        sheet = (f' · <a href="sheets/{quote(sheet_name(name, 0))}">contact sheet</a>'
                 if counts["kept"] else "")
        line = ", ".join(f'<span data-section-count="{s}">{counts[s]}</span> {s}'
                         for s in ("kept", "rejected", "failed", "pending"))
        body = getattr(self, f"_{kind}_html")(f"s{index}", views, shown)
        return (f'<section class="run-section" id="s{index}" data-section="{_esc(name)}" data-kind="{kind}">'
                f"<h2>{_esc(name)} <small>{kind}</small></h2>"
                f'<p class="section-counts">{len(views)} jobs: {line}{sheet}</p>{body}</section>')

    def _gallery_html(self, list_id: str, views: list[JobView], shown: list[JobView]) -> str:
        return self.pager(list_id, "cards", [self.card(v) for v in shown])

    def _series_html(self, list_id: str, views: list[JobView], shown: list[JobView]) -> str:
        """One strip per reference set, the references on the left."""
        groups: dict[tuple[str, ...], list[JobView]] = {}
        for view in shown:
            groups.setdefault(tuple(r.key for r in view.job.scoring.references), []).append(view)
        parts = []
        for g, members in enumerate(groups.values()):
            refs = members[0].job.scoring.references
            figures = "".join(self._ref_figure(ref) for ref in refs) or "<p>no references</p>"
            parts.append(f'<div class="series"><div class="refs"><h3>references</h3>{figures}</div>'
                         f'{self.pager(f"{list_id}g{g}", "cards", [self.card(v) for v in members])}</div>')
        return "".join(parts)

    def _edit_html(self, list_id: str, views: list[JobView], shown: list[JobView]) -> str:
        items = [{**self.card(v), "src": self._ref_item(edit_source(v.job))} for v in shown]
        return self.pager(list_id, "edits", items)

    def _bilingual_html(self, list_id: str, views: list[JobView], shown: list[JobView]) -> str:
        items = bilingual_pairs(views, self.run.pairs)
        for item in items:
            for lang in ("en", "zh"):
                item[lang] = self.card(item[lang]) if item[lang] else None
        gaps = [item["gap"] for item in items if item["gap"] is not None]
        average = f'<p>mean text-score gap (EN − ZH): <b>{mean(gaps):.3f}</b></p>' if gaps else ""
        return average + self.pager(list_id, "pairs", items)

    def rejected_html(self) -> str:
        items = []
        for view in (v for v in self.run.jobs if v.status == "rejected"):
            attempts = [{"n": a["n"], "st": a["strategy"], "seed": a["seed"], "r": a["reason"],
                         "sc": _rounded(a["scores"] or {}), "ok": bool(a["passed"]),
                         "fm": a["failed_metrics"] or [], "sec": round(a["seconds"] or 0, 2),
                         "t": self.thumb(f"thumbs/{view.id}-{a['n']}.jpg")} for a in view.attempts]
            items.append({**self.card(view), "sec": view.row["section"], "why": rejection_reason(view),
                          "att": attempts})
        return (f'<section id="rejected"><h2>Rejected jobs <small>{len(items)}</small></h2>'
                f"<p>No attempt met every threshold; the best attempt is kept under rejected/ for review.</p>"
                f'{self.pager("rejected", "rejected", items)}</section>')

    def failed_html(self) -> str:
        items = [{"id": v.id, "n": v.row["name"], "sec": v.row["section"], "p": v.job.prompt,
                  "e": v.row["error"] or ""} for v in self.run.jobs if v.status == "failed"]
        return (f'<section id="failed"><h2>Failed jobs <small>{len(items)}</small></h2>'
                f"<p>An error stopped these jobs; <code>run</code> again retries them.</p>"
                f'{self.pager("failed", "failed", items)}</section>')

    def _ref_item(self, ref: ImageRef | None) -> dict[str, Any]:
        return {"t": self.thumb(ref_thumb(ref)), "l": self._ref_label(ref)} if ref else {"t": None, "l": "none"}

    def _ref_label(self, ref: ImageRef) -> str:
        if ref.job_id:
            view = self.run.by_id.get(ref.job_id)
            return f"{view.row['name']} ({view.status})" if view else f"job {ref.job_id} (not in this run)"
        return Path(ref.path).name if ref.path else ref.key[:20]

    def _ref_figure(self, ref: ImageRef) -> str:
        item = self._ref_item(ref)
        label = _esc(item["l"])
        image = (f'<img src="{item["t"]}" alt="{label}" loading="lazy">' if item["t"]
                 else '<div class="missing">no image</div>')
        return f'<figure class="ref">{image}<figcaption>{label}</figcaption></figure>'


def section_kind(views: list[JobView]) -> str:
    """How a section is shown: by what its jobs carry, so any recipe section name works."""
    if any(v.job.scoring.pair for v in views):
        return "bilingual"
    if any(v.job.kind == "edit" for v in views):
        return "edit"
    if any(v.job.scoring.references for v in views):
        return "series"
    return "gallery"


def bilingual_pairs(views: list[JobView], pair_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """EN/ZH pairs of a section with both `text` scores, the gap and the similarity. The gap
    comes from the pairs table, or from the two jobs' scores when the table has no row."""
    langs: dict[str, dict[str, JobView]] = defaultdict(dict)
    for view in views:
        if view.job.scoring.pair:
            langs[view.job.scoring.pair]["zh" if view.job.lang.lower().startswith("zh") else "en"] = view
    table = {row["pair"]: row for row in pair_rows}
    items = []
    for key, pair in langs.items():
        en, zh = pair.get("en"), pair.get("zh")
        en_text = en.scores.get("text") if en else None
        zh_text = zh.scores.get("text") if zh else None
        row = table.get(key) or {}
        gap = row.get("text_gap")
        if gap is None and en_text is not None and zh_text is not None:
            gap = en_text - zh_text
        items.append({"pair": key, "en": en, "zh": zh, "et": _round(en_text), "zt": _round(zh_text),
                      "gap": _round(gap), "sim": _round(row.get("similarity"))})
    return items


def rejection_reason(view: JobView) -> str:
    best = view.best or {}
    thresholds = view.job.scoring.thresholds
    misses = [f"{m} {_fmt(best.get('scores', {}).get(m))} < {thresholds.get(m, '?')}"
              for m in best.get("failed_metrics") or []]
    where = f"; best was attempt {best['n']}" if best else ""
    return f"{len(view.attempts)} attempts, none passed{where}" + (f": {', '.join(misses)}" if misses else "")


# ------------------------------------------------------------------------ header and summary
def _is_tiny_run(run: Run) -> bool:
    return is_tiny(_model(run)) or any(is_tiny(v.job.model) for v in run.jobs)


def _model(run: Run) -> str:
    return run.meta.get("model") or next((v.job.model for v in run.jobs), "")


def _header_html(run: Run) -> str:
    banner = f'<p class="banner" id="tiny-banner">{_esc(TINY_BANNER)}</p>' if _is_tiny_run(run) else ""
    name = run.meta.get("recipe_name") or run.root.name
    return f"<header><h1>{_esc(name)}</h1><p>omnigen2-batch run report · {_esc(run.root.name)}</p></header>{banner}"


def _nav_html(run: Run) -> str:
    links = [("summary", "Summary"), ("plots", "Plots")]
    links += [(f"s{i}", name) for i, name in enumerate(run.sections())]
    links += [("rejected", "Rejected"), ("failed", "Failed")]
    return "<nav>" + " ".join(f'<a href="#{anchor}">{_esc(label)}</a>' for anchor, label in links) + "</nav>"


def _summary_html(run: Run) -> str:
    counts = Counter(v.status for v in run.jobs)
    tiles = [("Jobs", "jobs", len(run.jobs))] + [(s.capitalize(), s, counts[s])
                                                  for s in ("kept", "rejected", "failed", "pending")]
    tile_html = "".join(f'<div class="tile {key}"><dt>{label}</dt><dd data-count="{key}">{n}</dd></div>'
                        for label, key, n in tiles)
    facts = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in _facts(run))
    return f'<section id="summary"><h2>Summary</h2><dl class="tiles">{tile_html}</dl><table class="facts">{facts}</table></section>'


def _facts(run: Run) -> list[tuple[str, str]]:
    attempts = [a for v in run.jobs for a in v.attempts]
    per_job = [len(v.attempts) for v in run.jobs if v.attempts]
    finished = sorted(v.row["finished"] for v in run.jobs if v.row["finished"] and v.row["image"])
    facts = [("Model", _model(run)), ("Recipe", run.meta.get("recipe_name", "")),
             ("Recipe sha256", (run.meta.get("recipe_sha256") or "")[:16])]
    if per_job:
        facts.append(("Attempts per job", f"{mean(per_job):.2f} on average, {max(per_job)} at most "
                                          f"({len(attempts)} attempts for {len(per_job)} jobs)"))
    if attempts:
        seconds = sum(a["seconds"] or 0 for a in attempts)
        facts.append(("Time per image", f"{seconds / len(attempts):.2f} s per generated image "
                                        f"({seconds:.1f} s of generation in all)"))
    if len(finished) > 1 and finished[-1] > finished[0]:
        span = finished[-1] - finished[0]
        facts.append(("Throughput", f"{60 * len(finished) / span:.1f} images/min "
                                    f"(first to last finished: {span / 60:.1f} min)"))
    facts += [("Created", _when(run.meta.get("created"))), ("Version", run.meta.get("version", ""))]
    return [(k, v) for k, v in facts if v]


def _when(stamp: str | None) -> str:
    try:
        return datetime.datetime.fromtimestamp(float(stamp)).isoformat(sep=" ", timespec="seconds")
    except (TypeError, ValueError):
        return stamp or ""


# ----------------------------------------------------------------------------------- plots (SVG)
W, H, LEFT, RIGHT, TOP, BOTTOM = 360, 200, 44, 12, 28, 30


def _plots_html(run: Run) -> str:
    values: dict[str, list[float]] = defaultdict(list)
    for view in run.jobs:
        for attempt in view.attempts:
            for metric, score in (attempt["scores"] or {}).items():
                values[metric].append(score)
    thresholds: dict[str, set[float]] = defaultdict(set)
    for view in run.jobs:
        for metric, minimum in view.job.scoring.thresholds.items():
            thresholds[metric].add(minimum)
    figures = [histogram_svg(f"{m}: every attempt", values[m], sorted(thresholds[m])) for m in sorted(values)]
    per_job = Counter(len(v.attempts) for v in run.jobs if v.attempts)
    if per_job:
        figures.append(bars_svg("attempts per job", per_job))
    finished = sorted(v.row["finished"] for v in run.jobs if v.row["finished"])
    if len(finished) > 1:
        figures.append(throughput_svg("jobs finished over time", finished))
    body = "".join(figures) or "<p>Nothing finished yet.</p>"
    return f'<section id="plots"><h2>Plots</h2><div class="plots">{body}</div></section>'


def histogram_svg(title: str, values: list[float], thresholds: list[float], bins: int = 20) -> str:
    """Score histogram with a dashed line at each threshold any section set for the metric."""
    lo, hi = min(values + thresholds), max(values + thresholds)
    hi = hi if hi > lo else lo + 1.0
    counts = Counter(min(int((v - lo) / (hi - lo) * bins), bins - 1) for v in values)
    top, width = max(counts.values()), (W - LEFT - RIGHT) / bins
    shapes = [f'<rect class="bar" x="{LEFT + b * width:.1f}" y="{_y(n, top):.1f}" width="{width - 1:.1f}" '
              f'height="{H - BOTTOM - _y(n, top):.1f}"><title>{n}</title></rect>' for b, n in counts.items()]
    for t in thresholds:
        x = LEFT + (t - lo) / (hi - lo) * (W - LEFT - RIGHT)
        shapes.append(f'<line class="threshold" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{H - BOTTOM}"/>'
                      f'<text class="threshold" x="{x + 3:.1f}" y="{TOP + 10}">min {t:g}</text>')
    return _svg(title, "".join(shapes), (f"{lo:.3g}", f"{hi:.3g}"), top)


def bars_svg(title: str, counts: Counter) -> str:
    keys = list(range(1, max(counts) + 1))
    top, width = max(counts.values()), (W - LEFT - RIGHT) / len(keys)
    shapes = [f'<rect class="bar" x="{LEFT + i * width + 2:.1f}" y="{_y(counts[k], top):.1f}" '
              f'width="{width - 4:.1f}" height="{H - BOTTOM - _y(counts[k], top):.1f}"><title>{counts[k]}</title></rect>'
              f'<text x="{LEFT + (i + 0.5) * width:.1f}" y="{H - BOTTOM + 12}" text-anchor="middle">{k}</text>'
              for i, k in enumerate(keys)]
    return _svg(title, "".join(shapes), ("", ""), top)


def throughput_svg(title: str, finished: list[float], max_points: int = 400) -> str:
    span = (finished[-1] - finished[0]) or 1.0
    step = max(1, len(finished) // max_points)
    picks = list(range(0, len(finished), step)) + [len(finished) - 1]
    points = " ".join(f"{LEFT + (finished[i] - finished[0]) / span * (W - LEFT - RIGHT):.1f},"
                      f"{_y(i + 1, len(finished)):.1f}" for i in picks)
    return _svg(title, f'<polyline class="line" points="{points}"/>', ("0", f"{span / 60:.1f} min"), len(finished))


def _y(value: float, top: float) -> float:
    return H - BOTTOM - value / top * (H - BOTTOM - TOP)


def _svg(title: str, shapes: str, x_labels: tuple[str, str], top: float) -> str:
    return (f'<figure class="plot"><svg viewBox="0 0 {W} {H}" role="img" aria-label="{_esc(title)}">'
            f'<text class="title" x="{LEFT}" y="16">{_esc(title)}</text>'
            f'<path class="axis" d="M{LEFT} {TOP} V{H - BOTTOM} H{W - RIGHT}"/>'
            f'<text x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end">{top:g}</text>'
            f'<text x="{LEFT - 4}" y="{H - BOTTOM}" text-anchor="end">0</text>'
            f'<text x="{LEFT}" y="{H - 8}">{_esc(x_labels[0])}</text>'
            f'<text x="{W - RIGHT}" y="{H - 8}" text-anchor="end">{_esc(x_labels[1])}</text>'
            f"{shapes}</svg></figure>")


# ------------------------------------------------------------------------------------ helpers
def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _script_json(data: Any) -> str:
    """JSON that cannot end its <script> element early, whatever the prompts contain."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in sorted(scores.items())}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _sheet_scores(view: JobView) -> str:
    """Scores for a caption, the metrics with a threshold first: they decided the outcome."""
    decisive = view.job.scoring.thresholds
    order = sorted(view.scores, key=lambda metric: (metric not in decisive, metric))
    return " ".join(f"{metric} {view.scores[metric]:.2f}" for metric in order)


def _latin1(text: str) -> str:
    """The bitmap font only has Latin-1 glyphs; other characters become '?'."""
    return text.encode("latin-1", "replace").decode("latin-1")


def _write_atomic(path: Path, data: bytes) -> Path:
    """Temp name in the same folder (the store's prefix, so a sweep removes leftovers), then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    temp.write_bytes(data)
    os.replace(temp, path)
    return path
