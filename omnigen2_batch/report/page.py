"""The report page: one self-contained HTML file (inline CSS, JS and SVG plots).

Images are relative paths to the small thumbnails under RUN_DIR/thumbs/, and galleries are drawn
page by page from an inline JSON blob, so 10,000 jobs do not mean 10,000 DOM nodes. Everything
that came from a recipe is escaped and bidi-isolated (text.py here, textContent + <bdi> in the JS).
"""
from __future__ import annotations

import datetime
import html
from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path
from statistics import mean
from typing import Any
from urllib.parse import quote

from ..config import toy_file
from ..jobs import ImageRef
from .data import JobView, Run
from .grids import Grid
from .images import (attempt_thumb, job_thumb, ref_thumb, sheet_name, shown_refs,
                     variant_thumb)
from .plots import plots_html
from .text import esc, script_json, user

TINY_BANNER = ("Made by the tiny random-weight model: images are noise. They show that the "
               "pipeline ran, not what OmniGen2 can do.")
TOY_BANNER = ("Made by the toy-world model shipped with omnigen2-batch: a 1 M-parameter OmniGen2 "
              "trained here from nothing, on CPUs, to draw flat coloured shapes (circle, square, "
              "triangle; 6 colours) and sprite characters at 64 px, from English or Chinese "
              "prompts. It knows nothing else, and its scorer is a toy CLIP trained on the same "
              "world.")
STATUSES = ("kept", "rejected", "failed", "pending")  # the ones a page counts, in this order


def render_page(run: Run, made: set[str], grids: dict[str, Grid] | None = None) -> str:
    page = PageBuilder(run, made, grids or {})
    body = [_header_html(run), _nav_html(run), _summary_html(run), plots_html(run)]
    body += [page.section_html(i, name, views) for i, (name, views) in enumerate(run.sections().items())]
    body += [page.rejected_html(), page.failed_html()]
    assets = resources.files(__package__) / "assets"
    title = f"{run.meta.get('recipe_name') or run.root.name} · omnigen2-batch report"
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{(assets / 'report.css').read_text()}</style></head>"
        f"<body>{''.join(body)}"
        f'<noscript><p class="banner">The galleries need JavaScript; the images are under kept/ '
        f"and rejected/, and sheets/ holds contact sheets.</p></noscript>"
        f'<script type="application/json" id="report-data">{script_json({"lists": page.lists})}</script>'
        f"<script>{(assets / 'report.js').read_text()}</script></body></html>\n")


class PageBuilder:
    """Turns job views into server-side HTML (small parts) and paged JSON lists (large parts)."""

    def __init__(self, run: Run, made: set[str], grids: dict[str, Grid]):
        self.run, self.made, self.grids = run, made, grids
        self.lists: dict[str, dict[str, Any]] = {}

    def thumb(self, rel: str) -> str | None:
        return quote(rel) if rel in self.made else None

    def card(self, view: JobView) -> dict[str, Any]:
        image = view.row["image"]
        variants = [{"r": v["rank"], "t": self.thumb(variant_thumb(view.id, v["rank"])),
                     "f": quote(v["image"])} for v in view.variants[1:]]
        return {"id": view.id, "n": view.row["name"], "s": view.status, "t": self.thumb(job_thumb(view.id)),
                "f": quote(image) if image else None, "p": view.job.prompt, "sc": _rounded(view.scores),
                **({"v": variants} if variants else {})}

    def pager(self, list_id: str, kind: str, items: list[dict[str, Any]]) -> str:
        self.lists[list_id] = {"type": kind, "items": items}
        return f'<div class="pager" data-list="{list_id}" data-total="{len(items)}"></div>'

    def section_html(self, index: int, name: str, views: list[JobView]) -> str:
        kind = section_kind(views)
        counts = Counter(v.status for v in views)
        shown = [v for v in views if v.row["image"]]
        sheet = (f' · <a href="sheets/{quote(sheet_name(name, 0))}">contact sheet</a>'
                 if counts["kept"] else "")
        line = ", ".join(f'<span data-section-count="{s}">{counts[s]}</span> {s}' for s in STATUSES)
        body = self.grids_html(name) + getattr(self, f"_{kind}_html")(f"s{index}", views, shown)
        # data-section is never shown: it carries the name exactly, for scripts and tests
        return (f'<section class="run-section" id="s{index}" data-section="{html.escape(name)}" data-kind="{kind}">'
                f"<h2>{user(name)} <small>{kind}</small></h2>"
                f'<p class="section-counts">{len(views)} jobs: {line}{sheet}</p>{body}</section>')

    def grids_html(self, section: str) -> str:
        """The section's sweep grids as tables of thumbnails, each with its labelled PNG."""
        parts = []
        for rel, grid in self.grids.items():
            if grid.section != section:
                continue
            columns = range(max(grid.x_labels) + 1)
            head = "".join(f"<th>{user(grid.x_labels.get(x, ''))}</th>" for x in columns)
            rows = []
            for y in range(max(grid.y_labels) + 1):
                cells = "".join(self._grid_cell(grid.cells.get((x, y))) for x in columns)
                rows.append(f"<tr><th>{user(grid.y_labels.get(y, ''))}</th>{cells}</tr>")
            y_axis = grid.axes[1] if len(grid.axes) > 1 else ""
            parts.append(f'<figure class="sweep-grid" data-grid="{esc(rel)}"><figcaption>'
                         f'{user(grid.title())} · <a href="{quote(rel)}">grid image</a></figcaption>'
                         f"<table><tr><th>{user(y_axis)} \\ {user(grid.axes[0])}</th>{head}</tr>"
                         f'{"".join(rows)}</table></figure>')
        return "".join(parts)

    def _grid_cell(self, view: JobView | None) -> str:
        if view is None:
            return "<td></td>"
        src = self.thumb(job_thumb(view.id))
        image = (f'<img src="{src}" alt="{esc(view.row["name"])}" loading="lazy">' if src
                 else '<div class="missing">no image</div>')
        return f'<td data-job="{esc(view.id)}" class="{esc(view.status)}">{image}</td>'

    def _gallery_html(self, list_id: str, views: list[JobView], shown: list[JobView]) -> str:
        return self.pager(list_id, "cards", [self.card(v) for v in shown])

    def _series_html(self, list_id: str, views: list[JobView], shown: list[JobView]) -> str:
        """One strip per reference set, the references on the left."""
        groups: dict[tuple[str, ...], list[JobView]] = {}
        for view in shown:
            groups.setdefault(tuple(r.key for r in shown_refs(view.job)), []).append(view)
        parts = []
        for g, members in enumerate(groups.values()):
            refs = shown_refs(members[0].job)
            figures = "".join(self._ref_figure(ref) for ref in refs) or "<p>no references</p>"
            parts.append(f'<div class="series"><div class="refs"><h3>references</h3>{figures}</div>'
                         f'{self.pager(f"{list_id}g{g}", "cards", [self.card(v) for v in members])}</div>')
        return "".join(parts)

    def _edit_html(self, list_id: str, views: list[JobView], shown: list[JobView]) -> str:
        items = [{**self.card(v), "src": self._ref_item(v.job.edit_source)} for v in shown]
        return self.pager(list_id, "edits", items)

    def _bilingual_html(self, list_id: str, views: list[JobView], shown: list[JobView]) -> str:
        items = bilingual_pairs(views, self.run.pairs)
        for item in items:
            for side in ("en", "zh"):
                item[side] = self.card(item[side]) if item[side] else None
        gaps = [item["gap"] for item in items if item["gap"] is not None]
        average = f'<p>mean text-score gap (EN − ZH): <b>{mean(gaps):.3f}</b></p>' if gaps else ""
        return average + self.pager(list_id, "pairs", items)

    def rejected_html(self) -> str:
        items = []
        for view in (v for v in self.run.jobs if v.status == "rejected"):
            attempts = [{"n": a["n"], "st": a["strategy"], "seed": a["seed"], "r": a["reason"],
                         "sc": _rounded(a["scores"] or {}), "ok": bool(a["passed"]),
                         "fm": a["failed_metrics"] or [], "sec": round(a["seconds"] or 0, 2),
                         "t": self.thumb(attempt_thumb(view.id, a["n"]))} for a in view.attempts]
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
        image = (f'<img src="{item["t"]}" alt="{esc(item["l"])}" loading="lazy">' if item["t"]
                 else '<div class="missing">no image</div>')
        return f'<figure class="ref">{image}<figcaption>{user(item["l"])}</figcaption></figure>'


def section_kind(views: list[JobView]) -> str:
    """How a section is shown: by what its jobs carry, so any recipe section name works."""
    if any(v.job.scoring.pair for v in views):
        return "bilingual"
    if any(v.job.kind == "edit" for v in views):
        return "edit"
    if any(v.job.scoring.references or v.job.inputs for v in views):
        return "series"
    return "gallery"


def bilingual_pairs(views: list[JobView], pair_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """EN/ZH pairs of a section with both `text` scores, the gap and the similarity. The gap
    comes from the pairs table, or from the two jobs' scores when the table has no row."""
    sides: dict[str, dict[str, JobView]] = defaultdict(dict)
    for view in views:
        if view.job.pair_side:
            sides[view.job.scoring.pair][view.job.pair_side] = view
    table = {row["pair"]: row for row in pair_rows}
    items = []
    for key, pair in sides.items():
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
def _header_html(run: Run) -> str:
    banner = f'<p class="banner" id="tiny-banner">{esc(TINY_BANNER)}</p>' if run.tiny else ""
    if run.toy:
        banner += f'<p class="banner" id="toy-banner">{esc(toy_banner())}</p>'
    name = run.meta.get("recipe_name") or run.root.name
    return (f"<header><h1>{user(name)}</h1><p>omnigen2-batch run report · {user(run.root.name)}</p>"
            f"</header>{banner}")


def toy_banner() -> str:
    """TOY_BANNER and, once evaluation/toy_eval.py has measured them, its headline figures."""
    figures = toy_file("figures.json").get("headline")
    return f"{TOY_BANNER} Measured by a pixel judge on unseen combinations: {figures}." if figures else TOY_BANNER


def _nav_html(run: Run) -> str:
    links = [("summary", "Summary"), ("plots", "Plots")]
    links += [(f"s{i}", name) for i, name in enumerate(run.sections())]
    links += [("rejected", "Rejected"), ("failed", "Failed")]
    return "<nav>" + " ".join(f'<a href="#{anchor}">{user(label)}</a>' for anchor, label in links) + "</nav>"


def _summary_html(run: Run) -> str:
    counts = Counter(v.status for v in run.jobs)
    tiles = [("Jobs", "jobs", len(run.jobs))] + [(s.capitalize(), s, counts[s]) for s in STATUSES]
    tile_html = "".join(f'<div class="tile {key}"><dt>{label}</dt><dd data-count="{key}">{n}</dd></div>'
                        for label, key, n in tiles)
    facts = "".join(f"<tr><th>{esc(k)}</th><td>{user(v)}</td></tr>" for k, v in _facts(run))
    return f'<section id="summary"><h2>Summary</h2><dl class="tiles">{tile_html}</dl><table class="facts">{facts}</table></section>'


def _facts(run: Run) -> list[tuple[str, str]]:
    attempts = [a for v in run.jobs for a in v.attempts]
    per_job = [len(v.attempts) for v in run.jobs if v.attempts]
    finished = sorted(v.row["finished"] for v in run.jobs if v.row["finished"] and v.row["image"])
    facts = [("Model", run.model), ("Recipe", run.meta.get("recipe_name", "")),
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


# ------------------------------------------------------------------------------------ helpers
def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in sorted(scores.items())}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
