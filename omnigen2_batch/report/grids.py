"""Sweep grids: grids/<section>.png, one labelled image per swept item (X columns, Y rows; with
a Z axis one grid per Z value, -z1, -z2, ...), like A1111's X/Y/Z plot.

Cells are the jobs' own images pasted at their size (shrunk only beyond CELL_MAX), so a cell is
the job's picture; the PNG's text chunk GRID_KEY records where each job's cell lies.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin

from ..images import ImageError, load_rgb
from .data import JobView, Run
from .files import refuse_links, write_atomic
from .text import neutralise

GRID_DIR = "grids"
GRID_KEY = "omnigen2_batch_grid"
CELL_MAX = 512  # larger outputs are shrunk to fit a cell of this side
PAD, CHAR_W, LINE_H = 6, 6, 14  # the bitmap font: ~6 px per character, 11 px high


@dataclass
class Grid:
    section: str
    axes: list[str]
    base: str
    z: str = ""  # the Z value's label ("" with fewer than 3 axes)
    cells: dict[tuple[int, int], JobView] = field(default_factory=dict)  # (x, y) -> job
    x_labels: dict[int, str] = field(default_factory=dict)
    y_labels: dict[int, str] = field(default_factory=dict)

    def title(self) -> str:
        z = f" · {self.axes[2]} = {self.z}" if self.z else ""
        return f"{self.section} / {self.base}{z}"


def sweep_grids(run: Run) -> dict[str, Grid]:
    """Grid file (relative to the run dir) -> the grid, for every swept item of the run."""
    grids: dict[tuple, Grid] = {}
    for view in run.jobs:
        cell = view.job.sweep
        if not cell:
            continue
        at, values = cell["at"] + [0, 0], cell["values"] + ["", ""]
        key = (view.row["section"], cell.get("base", ""), at[2])
        grid = grids.setdefault(key, Grid(view.row["section"], cell["axes"], cell.get("base", ""),
                                          values[2] if len(cell["axes"]) > 2 else ""))
        grid.cells[(at[0], at[1])] = view
        grid.x_labels[at[0]], grid.y_labels[at[1]] = values[0], values[1]
    bases = {(s, b) for s, b, _ in grids}
    named = {}
    for (section, base, z), grid in grids.items():
        several = sum(1 for s, _ in bases if s == section) > 1
        stem = section + (f"-{_safe(base)}" if several else "") + (f"-z{z + 1}" if grid.z else "")
        named[f"{GRID_DIR}/{stem}.png"] = grid
    return named


def write_grids(run: Run) -> dict[str, Grid]:
    """Draw every sweep grid that has at least one image; returns the grids written."""
    written = {}
    for rel, grid in sweep_grids(run).items():
        image, boxes = draw_grid(run.root, grid)
        if image is None:
            continue
        info = PngImagePlugin.PngInfo()
        info.add_text(GRID_KEY, json.dumps({"axes": grid.axes, "cells": boxes}))
        buffer = io.BytesIO()
        image.save(buffer, "PNG", pnginfo=info)
        path = run.root / rel
        refuse_links(path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buffer.getvalue())
        written[rel] = grid
    return written


def draw_grid(root: Path, grid: Grid) -> tuple[Image.Image | None, dict[str, list[int]]]:
    """The labelled grid, and job id -> [x, y, width, height] of its cell."""
    pictures = {}
    for at, view in grid.cells.items():
        try:
            pictures[at] = _fitted(load_rgb(root / view.row["image"])) if view.row["image"] else None
        except ImageError:
            pictures[at] = None
    if not any(pictures.values()):
        return None, {}
    cell_w = max(p.width for p in pictures.values() if p)
    cell_h = max(p.height for p in pictures.values() if p)
    columns, rows = max(grid.x_labels) + 1, max(grid.y_labels) + 1
    y_axis = grid.axes[1] if len(grid.axes) > 1 else ""
    left = PAD * 2 + CHAR_W * max([len(y_axis)] + [len(v) for v in grid.y_labels.values()])
    top = PAD * 2 + LINE_H * 3
    width = max(left + columns * (cell_w + PAD) + PAD, PAD * 2 + CHAR_W * len(grid.title()))
    image = Image.new("RGB", (width, top + rows * (cell_h + PAD) + PAD), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default_imagefont()
    draw.text((PAD, PAD), _text(grid.title()), fill="black", font=font)
    draw.text((left, PAD + LINE_H), _text(f"X: {grid.axes[0]}"), fill="dimgray", font=font)
    if y_axis:
        draw.text((PAD, top - LINE_H), _text(f"Y: {y_axis}"), fill="dimgray", font=font)
    for x, label in grid.x_labels.items():
        draw.text((left + x * (cell_w + PAD), PAD + LINE_H * 2), _text(label), fill="black", font=font)
    for y, label in grid.y_labels.items():
        draw.text((PAD, top + y * (cell_h + PAD) + cell_h // 2), _text(label), fill="black", font=font)
    boxes = {}
    for (x, y), picture in pictures.items():
        corner = (left + x * (cell_w + PAD), top + y * (cell_h + PAD))
        if picture is None:
            draw.rectangle((*corner, corner[0] + cell_w - 1, corner[1] + cell_h - 1), outline="red")
            continue
        image.paste(picture, corner)
        boxes[grid.cells[(x, y)].id] = [*corner, picture.width, picture.height]
    return image, boxes


def _fitted(picture: Image.Image) -> Image.Image:
    """Shrunk to CELL_MAX when larger; never enlarged (a cell shows the job's own pixels)."""
    if max(picture.size) <= CELL_MAX:
        return picture
    return ImageOps.contain(picture, (CELL_MAX, CELL_MAX))


def _text(text: str) -> str:
    """Latin-1 only (the bitmap font), bidi controls shown as markers."""
    return neutralise(text).encode("latin-1", "replace").decode("latin-1")


def _safe(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("._") or "_"
