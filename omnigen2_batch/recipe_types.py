"""The recipe's own schema types: names, sizes, guidance ranges, input files and globs, seed
lists. Each is a typed_yaml custom type (KINDS, DESCRIPTION, convert, schema) or an Annotated
constraint; recipe.py builds the recipe's dataclasses from them. No torch here.
"""
from __future__ import annotations

import glob
import math
import os
import re
import stat
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from .images import ImageError, find_inputs
from .rules import METRICS
from .typed_yaml import (INVALID, Context, Loc, Pattern, Range, did_you_mean, field_name, opt,
                         show)

MIN_SIDE, MAX_SIDE, SIZE_STEP = 64, 2048, 16
SCHEDULERS = ("euler", "dpmsolver++")
# Patterns are matched whole (typed_yaml.Pattern uses fullmatch, as must every check here: a
# "$" lets a trailing newline through); the ^...$ also make them right as JSON Schema patterns.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$"  # part of file names: short, plain ASCII
MAX_SEED = 2**32 - 1
MAX_SEEDS = 1000  # literal seeds per level: more is a sweep, and a sweep is counted as jobs

Name = Annotated[str, Pattern(NAME_PATTERN, "a name of letters, digits, '_', '-' or '.' (at "
                                             "most 80, starting with a letter or digit)")]
Text = Annotated[str, Pattern(r"\s*\S[\s\S]*", "non-empty text")]
VarName = Annotated[str, Pattern(r"^[A-Za-z_]\w*$", "a placeholder name like subject")]


def number_pair(value) -> bool:
    """Two finite numbers (YAML's .nan and .inf are floats no size or range can use)."""
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) for v in value))


class Size:
    """[width, height] in pixels: multiples of 16, each side from 64 to 2048."""

    KINDS, DESCRIPTION = {"array"}, "[width, height]"

    @staticmethod
    def convert(value, at, ctx):
        ok = number_pair(value) and all(v == int(v) for v in value)
        if not ok or any(int(v) % SIZE_STEP for v in value):
            ctx.error(at, f"expected [width, height] multiples of {SIZE_STEP}, got {show(value)}")
            return INVALID
        if not all(MIN_SIDE <= v <= MAX_SIDE for v in value):
            ctx.error(at, f"expected [width, height] with each side from {MIN_SIDE} to "
                          f"{MAX_SIDE}, got {show(value)}")
            return INVALID
        return (int(value[0]), int(value[1]))

    @staticmethod
    def schema() -> dict:
        side = {"type": "integer", "multipleOf": SIZE_STEP, "minimum": MIN_SIDE,
                "maximum": MAX_SIDE}
        return {"type": "array", "items": side, "minItems": 2, "maxItems": 2}


class CfgRange:
    """[start, end]: the fraction of the denoising steps where guidance applies."""

    KINDS, DESCRIPTION = {"array"}, "[start, end]"

    @staticmethod
    def convert(value, at, ctx):
        if not (number_pair(value) and 0 <= value[0] <= value[1] <= 1):
            ctx.error(at, f"expected [start, end] with 0 <= start <= end <= 1, got {show(value)}")
            return INVALID
        return (float(value[0]), float(value[1]))

    @staticmethod
    def schema() -> dict:
        unit = {"type": "number", "minimum": 0, "maximum": 1}
        return {"type": "array", "items": unit, "minItems": 2, "maxItems": 2}


@dataclass(frozen=True)
class InputFile:
    """An image file the recipe names: a path relative to the recipe file."""

    KINDS, DESCRIPTION = {"string"}, "a file path"
    path: Path  # absolute, symlinks resolved
    where: str  # "recipe.yaml:12: edits[0].inputs[1]", for messages about this file

    @classmethod
    def convert(cls, value, at, ctx):
        if not isinstance(value, str) or not value.strip():
            ctx.error(at, f"expected a file path, got {show(value)}")
            return INVALID
        path = resolve_inside(value, at, ctx)
        if path is None:
            return INVALID
        if not is_regular_file(path):
            ctx.error(at, f"no such file: {value} (looked for {path})")
            return INVALID
        return cls(path, ctx.source.where(at))

    @staticmethod
    def schema() -> dict:
        return {"type": "string", "minLength": 1}


class InputGlob:
    """A file path or a glob pattern ("assets/*.png", "shots/**/*.jpg"): the files it matches."""

    KINDS, DESCRIPTION = {"string"}, "a file path or glob pattern"

    @staticmethod
    def convert(value, at, ctx):
        if not (isinstance(value, str) and glob.has_magic(value)):
            single = InputFile.convert(value, at, ctx)
            return INVALID if single is INVALID else (single,)
        try:
            matches = find_inputs(value, ctx.source.path.parent, ctx.source.roots)
        except ImageError as err:
            ctx.error(at, str(err))
            return INVALID
        if not matches:
            ctx.error(at, f"the pattern {value!r} matches no files "
                          f"(relative to {ctx.source.path.parent})")
            return INVALID
        files = [resolve_inside(match, at, ctx, report=False) for match in matches]
        if None in files:
            outside = matches[files.index(None)]
            ctx.error(at, f"the pattern {value!r} matches files outside the recipe's folder "
                          f"{ctx.source.path.parent} (such as {outside}); move them there or "
                          "pass --allow-path DIR")
            return INVALID
        where = f"{ctx.source.where(at)} (matched by {value!r})"
        return tuple(InputFile(path, where) for path in files)

    @staticmethod
    def schema() -> dict:
        return {"type": "string", "minLength": 1}


def resolve_inside(value: str, at: Loc, ctx: Context, report: bool = True) -> Path | None:
    """The absolute path `value` names, or None (error recorded if `report`) when it leaves
    every allowed root. Symlinks are resolved first, so a link cannot smuggle a file in."""
    path = Path(os.path.expanduser(value))
    try:
        path = (path if path.is_absolute() else ctx.source.path.parent / path).resolve()
    except (OSError, RuntimeError) as err:  # a name too long, a symlink loop
        ctx.error(at, f"cannot use the path {value!r}: {getattr(err, 'strerror', None) or err}")
        return None
    if any(path.is_relative_to(root) for root in ctx.source.roots):
        return path
    if report:
        ctx.error(at, f"{value!r} resolves to {path}, outside the recipe's folder "
                      f"{ctx.source.path.parent}; move it there or pass --allow-path DIR")
    return None


def is_regular_file(path: Path) -> bool:
    """A regular file (not a folder, FIFO or device: reading those hangs or never ends)."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


class SeedList:
    """`seeds: [1, 7, 42]`: one job per seed, with exactly that seed (not derived)."""

    KINDS, DESCRIPTION = {"array"}, "a list of seeds"

    @staticmethod
    def convert(value, at, ctx):
        def is_seed(v):
            return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED
        if not value or len(value) > MAX_SEEDS or not all(map(is_seed, value)):
            ctx.error(at, f"expected 1 to {MAX_SEEDS} whole numbers from 0 to {MAX_SEED}, "
                          f"got {show(value)}")
            return INVALID
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            ctx.error(at, f"seed {repeated[0]} is listed twice; each seed makes one job")
            return INVALID
        return tuple(value)

    @staticmethod
    def schema() -> dict:
        seed = {"type": "integer", "minimum": 0, "maximum": MAX_SEED}
        return {"type": "array", "items": seed, "minItems": 1, "maxItems": MAX_SEEDS,
                "uniqueItems": True}


# ---- scoring settings ------------------------------------------------------------------

Metric = Literal[METRICS]


@dataclass(kw_only=True)
class SectionScoring:
    HINTS = {key: "the CLIP scorer is run-wide: set it under defaults.scoring"
             for key in ("model", "pretrained", "enabled", "multilingual")}
    thresholds: dict[Metric, float] | None = opt(
        "metric -> minimum to keep an output (cosines in [-1, 1], clipscore in [0, 100]); "
        "merged over the level above")

    def check(self, at: Loc, ctx: Context) -> None:
        for metric, value in (self.thresholds or {}).items():
            bounds = Range(0, 100) if metric == "clipscore" else Range(-1, 1)
            bounds.check(value, at + ("thresholds", metric), ctx)


@dataclass(kw_only=True)
class RunScoring(SectionScoring):
    HINTS = {}
    enabled: bool | None = opt("score outputs and retry weak ones (default true)")
    model: Text | None = opt("open_clip model name, or toy-clip (default ViT-B-32; toy-clip with "
                             "model: toy)")
    pretrained: Text | None = opt("open_clip pretrained tag or weights file (default openai); "
                                  "random: seeded random weights, scores meaningless")
    multilingual: bool | None = opt("the CLIP text tower reads Chinese (default false)")


# ---- checks the recipe's classes share ----------------------------------------------------

def known_names(groups: dict) -> dict:
    """Every placeholder a template may use, from each group of names."""
    return {name: None for names in groups.values() for name in names}


def check_clashes(groups: dict, at: Loc, ctx: Context) -> None:
    """A placeholder name belongs to one group (vars, matrix, sweep or the image names)."""
    seen: dict[str, str] = {}
    for group, names in groups.items():
        for name in names:
            if name in seen:
                ctx.error(at, f"{{{name}}} is named both in {seen[name]} and in {group}; give "
                              "each placeholder one place")
            seen.setdefault(name, group)


def check_template(template: str, known: dict, at: Loc, ctx: Context,
                   sources: str = "") -> set[str]:
    """The placeholders `template` uses; errors for bad syntax and unknown names (`sources`
    says where names come from)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        ctx.error(at, f"bad placeholder syntax ({err}); write literal braces as {{{{ }}}}")
        return set()
    used = set()
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not re.fullmatch(r"[A-Za-z_]\w*", name) or spec or conversion:
            ctx.error(at, f"placeholders are plain names like {{subject}}, got {{{name}}}")
        elif name not in known:
            ctx.error(at, f"{{{name}}} is not defined in {sources or 'vars or matrix'}"
                          f"{did_you_mean(name, known)}")
        used.add(name)
    return used

def check_unique(items, at, name_of, ctx: Context, hint: str = "") -> None:
    at = at if isinstance(at, tuple) else (at,)
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        name = None if item is INVALID else name_of(item)
        if name is None:
            continue
        if name in seen:
            first = at + (seen[name],)
            ctx.error(at + (index,), f"duplicate name {name!r} (also {field_name(first)}, "
                                     f"line {ctx.source.line(first)}){hint}")
        seen.setdefault(name, index)
