"""The report's plots as inline SVG: score histograms, attempts per job, throughput."""
from __future__ import annotations

from collections import Counter, defaultdict

from .data import Run
from .text import esc

W, H, LEFT, RIGHT, TOP, BOTTOM = 360, 200, 44, 12, 28, 30


def plots_html(run: Run) -> str:
    values: dict[str, list[float]] = defaultdict(list)
    for view in run.jobs:
        for attempt in view.attempts:
            for metric, score in (attempt["scores"] or {}).items():
                values[metric].append(score)
    thresholds: dict[str, set[float]] = defaultdict(set)
    for view in run.jobs:
        for metric, minimum in view.job.scoring.thresholds.items():
            thresholds[metric].add(minimum)
    figures = [histogram_svg(m, values[m], sorted(thresholds[m])) for m in sorted(values)]
    per_job = Counter(len(v.attempts) for v in run.jobs if v.attempts)
    if per_job:
        figures.append(bars_svg("attempts per job", per_job))
    finished = sorted(v.row["finished"] for v in run.jobs if v.row["finished"])
    if len(finished) > 1:
        figures.append(throughput_svg("jobs finished over time", finished))
    body = "".join(figures) or "<p>Nothing finished yet.</p>"
    return f'<section id="plots"><h2>Plots</h2><div class="plots">{body}</div></section>'


def histogram_svg(metric: str, values: list[float], thresholds: list[float], bins: int = 20) -> str:
    """Score histogram with a dashed line at each threshold any section set for the metric.
    The metric name came from outside: it is isolated, so it cannot reorder the title."""
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
    heading = f'<tspan class="user">{esc(metric)}</tspan>: every attempt'
    return _svg(f"{metric}: every attempt", "".join(shapes), (f"{lo:.3g}", f"{hi:.3g}"), top, heading)


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


def _svg(title: str, shapes: str, x_labels: tuple[str, str], top: float, heading: str = "") -> str:
    return (f'<figure class="plot"><svg viewBox="0 0 {W} {H}" role="img" aria-label="{esc(title)}">'
            f'<text class="title" x="{LEFT}" y="16">{heading or esc(title)}</text>'
            f'<path class="axis" d="M{LEFT} {TOP} V{H - BOTTOM} H{W - RIGHT}"/>'
            f'<text x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end">{top:g}</text>'
            f'<text x="{LEFT - 4}" y="{H - BOTTOM}" text-anchor="end">0</text>'
            f'<text x="{LEFT}" y="{H - 8}">{esc(x_labels[0])}</text>'
            f'<text x="{W - RIGHT}" y="{H - 8}" text-anchor="end">{esc(x_labels[1])}</text>'
            f"{shapes}</svg></figure>")
