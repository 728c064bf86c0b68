"""Sweeps: `sweep:` on a section names up to three axes, each a generation parameter or a prompt
placeholder with a list of values; the section makes one job per cell of their cross product
(per item of the section), and the report draws each item's cells as a labelled grid (X
columns, Y rows, one grid per Z value), like A1111's X/Y/Z plot.

    sweep:
      text_guidance: [3, 5, 7]        # X: a parameter (its values are checked like the setting)
      style: [watercolor, ink]        # Y: a {style} placeholder the section's prompts use

A cell is an ordinary job: its parameters override every level of the recipe, and its labels
(Job.sweep) travel with it into the manifest. No torch here.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from .recipe_types import MAX_SEED, SCHEDULERS, CfgRange
from .typed_yaml import INVALID, Context, Loc, Range, convert, did_you_mean, show, type_schema

MAX_AXES = 3
AXIS_NAMES = ("x", "y", "z")
PLACEHOLDER = r"[A-Za-z_]\w*"
# Parameters an axis may sweep, with the type their values are checked as (as in GenOptions).
PARAMETERS: dict[str, Any] = {
    "text_guidance": Annotated[float, Range(1, 20)],
    "image_guidance": Annotated[float, Range(1, 10)],
    "steps": Annotated[int, Range(1, 200)],
    "scheduler": Literal[SCHEDULERS],
    "cfg_range": CfgRange,
    "seed": Annotated[int, Range(0, MAX_SEED)],  # literal seeds, as `seeds:` gives them
}


@dataclass(frozen=True)
class Axis:
    name: str  # a parameter of PARAMETERS, or a placeholder name
    values: tuple

    @property
    def is_parameter(self) -> bool:
        return self.name in PARAMETERS


@dataclass(frozen=True)
class Cell:
    """One combination of axis values: parameter overrides, placeholder values, and where it
    sits in the grid (`labels` is JSON-able: it goes into the manifest as Job.sweep)."""

    settings: dict = field(default_factory=dict)  # parameter -> value
    text: dict = field(default_factory=dict)  # placeholder -> value
    labels: dict = field(default_factory=dict)  # {"axes": [...], "at": [...], "values": [...]}

    def suffix(self) -> str:
        """A job-name suffix that tells cells apart ("tg3-watercolor")."""
        return "-".join(short_label(v) for v in self.labels.get("values", ()))


class Sweep:
    """The `sweep:` mapping: axis name -> list of values, at most MAX_AXES axes, in order X, Y, Z."""

    KINDS, DESCRIPTION = {"object"}, "a mapping of up to 3 axes (parameter or placeholder -> values)"

    @staticmethod
    def convert(value: dict, at: Loc, ctx: Context):
        if not 1 <= len(value) <= MAX_AXES:
            ctx.error(at, f"expected 1 to {MAX_AXES} axes (X, Y, Z), got {len(value)}")
            return INVALID
        axes = [_axis(name, values, at + (name,), ctx) for name, values in value.items()]
        return INVALID if INVALID in axes else tuple(axes)

    @staticmethod
    def schema() -> dict:
        defs: dict = {}
        params = {name: {"type": "array", "minItems": 1, "items": type_schema(tp, defs)}
                  for name, tp in PARAMETERS.items()}
        words = {"type": "array", "minItems": 1, "items": {"type": "string"}}
        # a placeholder is any other name: JSON Schema applies both to a key that matches both
        other = f"^(?!({'|'.join(PARAMETERS)})$){PLACEHOLDER}$"
        return {"type": "object", "minProperties": 1, "maxProperties": MAX_AXES,
                "properties": params, "patternProperties": {other: words},
                "additionalProperties": False}


def _axis(name, values, at: Loc, ctx: Context):
    if not isinstance(name, str) or not re.fullmatch(PLACEHOLDER, name):
        ctx.error(at, f"expected a parameter ({', '.join(PARAMETERS)}) or a placeholder name "
                      f"like style, got {show(name)}")
        return INVALID
    if not isinstance(values, list) or not values:
        ctx.error(at, f"expected a non-empty list of values, got {show(values)}")
        return INVALID
    item_type = PARAMETERS.get(name, str)
    converted = [convert(v, item_type, at + (i,), ctx) for i, v in enumerate(values)]
    if INVALID in converted:
        return INVALID
    repeated = [v for i, v in enumerate(converted) if v in converted[:i]]
    if repeated:
        ctx.error(at, f"the value {show(label(repeated[0]))} is listed twice")
        return INVALID
    return Axis(name, tuple(converted))


def check_axes(axes: tuple[Axis, ...] | None, placeholders: set[str], has_images: bool,
               at: Loc, ctx: Context) -> None:
    """A placeholder axis must be used by the section's prompts; image guidance needs inputs."""
    for axis in axes or ():
        where = at + ("sweep", axis.name)
        if not axis.is_parameter and axis.name not in placeholders:
            ctx.error(where, f"no prompt of this section uses {{{axis.name}}}; an axis is a "
                             f"parameter ({', '.join(PARAMETERS)}) or a placeholder the prompts "
                             f"use{did_you_mean(axis.name, PARAMETERS)}")
        if axis.name == "image_guidance" and not has_images:
            ctx.error(where, "text-to-image jobs have no input image, so image guidance changes "
                             "nothing here")


def placeholder_axes(axes: tuple[Axis, ...] | None) -> dict[str, tuple]:
    return {axis.name: axis.values for axis in axes or () if not axis.is_parameter}


def cells(axes: tuple[Axis, ...] | None) -> list[Cell]:
    """Every combination, X fastest (a grid is filled row by row); [Cell()] without a sweep."""
    if not axes:
        return [Cell()]
    names = [axis.name for axis in axes]
    found = []
    for at in itertools.product(*(range(len(axis.values)) for axis in reversed(axes))):
        at = tuple(reversed(at))
        values = [axis.values[i] for axis, i in zip(axes, at)]
        settings = {n: v for n, v, axis in zip(names, values, axes) if axis.is_parameter}
        text = {n: v for n, v, axis in zip(names, values, axes) if not axis.is_parameter}
        found.append(Cell(settings, text, {"axes": names, "at": list(at),
                                           "values": [label(v) for v in values]}))
    return found


def cell_count(axes: tuple[Axis, ...] | None) -> int:
    return math.prod(len(axis.values) for axis in axes or ())


def label(value: Any) -> str:
    """How a value is written on a grid: 5.0 -> "5", (0.0, 0.6) -> "0-0.6"."""
    if isinstance(value, tuple):
        return "-".join(label(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def short_label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:16] or "v"
