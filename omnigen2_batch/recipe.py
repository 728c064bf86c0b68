"""Recipes: the YAML a person writes, its schema, and validation with file:line errors.

A recipe names a run and lists what to make. Every section is a list of named groups, and every
group (and every item inside one) may override any generation setting from `defaults`::

    name: spring-campaign            # required; names the run
    model: OmniGen2/OmniGen2         # hub id | "tiny" (embedded test model) | ./local/folder
    executor: local                  # local | ray
    batch_size: 4                    # images per pipeline call (same-shape jobs only)
    keep_attempts: false             # also keep every attempt's image, not only the kept one
    defaults:                        # generation settings for every job (built-ins below)
      size: [1024, 1024]             # [width, height], multiples of 16, sides 64..2048
      steps: 50
      text_guidance: 5.0             # 1.0 = no text guidance
      image_guidance: 2.0            # unset: 2.0 for edits, 2.5 in-context; t2i has none
      cfg_range: [0.0, 1.0]          # fraction of the steps where guidance applies
      scheduler: euler               # euler | dpmsolver++
      negative_prompt: "blurry, ..."
      candidates: 1                  # best-of-N first attempts
      max_attempts: 3                # attempt budget, candidates included
      seed: 0                        # base of every job's derived seed
      ladder: [new_seed, stronger_guidance, refine, ask_mllm]   # retries, in order
      scoring:
        enabled: true
        model: ViT-B-32              # open_clip model (run-wide)
        pretrained: openai
        thresholds: {text: 0.25}     # metric -> minimum cosine to pass (see METRICS)
    prompts:                         # text-to-image; {var} placeholders
      - name: animals
        prompt: "a {animal} in {style} style"    # or a list of templates
        vars: {style: watercolor}                # fixed values
        matrix: {animal: [cat, fox]}             # every combination becomes a job
    characters:                      # who appears in a series
      mira: {references: [assets/mira.png]}      # 1-3 reference images, or ...
      robo: {portrait: "a round white robot"}    # ... a prompt generated once as the anchor
    series:                          # in-context shots of one character
      - character: mira
        shots: ["mira reading in a library", {prompt: "mira at sea", size: [1024, 768]}]
    edits:                           # every input x every instruction
      - name: night
        inputs: [assets/street_*.png]            # paths or globs
        instructions: ["make it night", {instruction: "paint it red",
                       source_caption: "a street", target_caption: "a red street"}]
        size: input                  # the default for edits: the input's aspect ratio,
                                     # at most the pixel count of defaults.size
    bilingual:                       # English/Chinese twins, same seed, compared
      - name: festival
        pairs: [{en: "a lantern festival", zh: "灯笼节"}]

Rules: unknown keys, wrong types and duplicate keys are errors (top-level keys starting with
"x-" are ignored: a place for YAML anchors); every path resolves relative to
the recipe file and must stay inside its folder unless `--allow-path DIR` allows another root
(a recipe cannot widen its own access); a local model folder starts with "/", "./", "../" or
"~". Errors read "recipe.yaml:14: series[0].shots[2].size: expected [width, height] multiples
of 16, got [1000, 7]", all of them at once.

The schema is the dataclasses below: their annotations give the YAML shape (Size, CfgRange,
InputFile and InputGlob are schema types whose converted values are plain tuples/paths),
their `doc` metadata the descriptions. typed_yaml.py converts YAML into them (and reports
errors with file:line); `json_schema()` derives recipe_schema.json from them.
No torch here: `validate` and `plan` must answer in well under a second.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import stat
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from .config import DTYPES, OFFLOADS
from .images import ImageError, find_inputs
from .rules import LADDER_STEPS, METRICS
from .typed_yaml import (INVALID, Context, DocumentError, Loc, Pattern, Range, Source,
                         apply_overrides, convert_dataclass, dataclass_schema, did_you_mean, field_name, json_kind,
                         opt, parse_yaml, req, show)

DEFAULT_MODEL = "OmniGen2/OmniGen2"
SCHEDULERS = ("euler", "dpmsolver++")
MIN_SIDE, MAX_SIDE, SIZE_STEP = 64, 2048, 16
MAX_RECIPE_BYTES = 1 << 20
# Patterns are matched whole (typed_yaml.Pattern uses fullmatch, as must every check here: a
# "$" lets a trailing newline through); the ^...$ also make them right as JSON Schema patterns.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$"  # part of file names: short, plain ASCII
HUB_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+"

# What a setting is when no level of the recipe sets it (image_guidance: see plan.py).
BUILTIN_DEFAULTS: dict[str, Any] = {
    "size": (1024, 1024), "steps": 50, "text_guidance": 5.0, "cfg_range": (0.0, 1.0),
    "scheduler": "euler", "candidates": 1, "max_attempts": 3, "seed": 0, "ladder": (),
    "max_input_side": 1024,
    "negative_prompt": "blurry, low quality, distorted, deformed, bad anatomy, extra limbs, "
                       "watermark, text artifacts",
}
BUILTIN_SCORING = {"enabled": True, "model": "ViT-B-32", "pretrained": "openai",
                   "multilingual": False}
RANDOM_WEIGHTS = "random"  # scoring.pretrained value for seeded random CLIP weights (tests)


class RecipeError(DocumentError):
    """An invalid recipe (or plan); `errors` holds every "file:line: field: message"."""


# ---- recipe-specific schema types ---------------------------------------------------------

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


# ---- the schema ---------------------------------------------------------------------------

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
    model: Text | None = opt("open_clip model name (default ViT-B-32)")
    pretrained: Text | None = opt("open_clip pretrained tag or weights file (default openai); "
                                  "random: seeded random weights, scores meaningless")
    multilingual: bool | None = opt("the CLIP text tower reads Chinese (default false)")


@dataclass(kw_only=True)
class GenOptions:
    """Generation settings; every level of a recipe may set them, the nearest level wins."""

    size: Size | None = opt("[width, height] of the output, multiples of 16")
    steps: Annotated[int, Range(1, 200)] | None = opt("denoising steps")
    text_guidance: Annotated[float, Range(1, 20)] | None = opt(
        "text guidance scale; 1.0 turns it off")
    image_guidance: Annotated[float, Range(1, 10)] | None = opt(
        "image guidance scale for jobs with input images; 1.0 turns it off")
    cfg_range: CfgRange | None = opt("[start, end] fraction of the steps that use guidance")
    scheduler: Literal[SCHEDULERS] | None = opt("euler or dpmsolver++")
    negative_prompt: str | None = opt("what the image should not show")
    max_input_side: Annotated[int, Range(64, 2048)] | None = opt(
        "input images are shrunk to fit this longest side before encoding (default 1024)")
    candidates: Annotated[int, Range(1, 16)] | None = opt("first attempts per job (best of N)")
    max_attempts: Annotated[int, Range(1, 32)] | None = opt(
        "attempt budget per job, candidates included")
    seed: Annotated[int, Range(0, 2**32 - 1)] | None = opt("base seed; jobs derive theirs")
    ladder: list[Literal[LADDER_STEPS]] | None = opt("retry strategies after a failed attempt")
    scoring: SectionScoring | None = opt("score thresholds for this level")


@dataclass(kw_only=True)
class Defaults(GenOptions):
    scoring: RunScoring | None = opt("the CLIP scorer and default thresholds")


@dataclass(kw_only=True)
class PromptGroup(GenOptions):
    name: Name = req("group name; jobs land in section prompts/<name>")
    prompt: Text | list[Text] = req("a prompt template, or a list; {var} placeholders")
    vars: dict[VarName, str] | None = opt("placeholder -> fixed value")
    matrix: dict[VarName, list[str]] | None = opt(
        "placeholder -> values; every combination becomes a job")

    def templates(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt or ())

    def check(self, at: Loc, ctx: Context) -> None:
        fixed, matrix = self.vars or {}, self.matrix or {}
        if self.prompt == []:
            ctx.error(at + ("prompt",), "needs at least one prompt")
        for var in sorted(set(fixed) & set(matrix)):
            ctx.error(at + ("vars", var), "is also in matrix; give each placeholder one place")
        for var, values in matrix.items():
            if not values:
                ctx.error(at + ("matrix", var), "needs at least one value")
        used = set()
        for index, template in enumerate(self.templates()):
            if not isinstance(template, str):
                continue
            where = at + ("prompt",) + ((index,) if isinstance(self.prompt, list) else ())
            used |= check_template(template, {**fixed, **matrix}, where, ctx)
        for var in sorted(set(matrix) - used):
            ctx.error(at + ("matrix", var), f"no prompt uses {{{var}}}")


def check_template(template: str, known: dict, at: Loc, ctx: Context) -> set[str]:
    """The placeholders `template` uses; errors for bad syntax and unknown names."""
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
            ctx.error(at, f"{{{name}}} is not defined in vars or matrix{did_you_mean(name, known)}")
        used.add(name)
    return used


@dataclass(kw_only=True)
class Character(GenOptions):
    """Settings here apply to the portrait anchor job; shots take theirs from the series."""

    references: list[InputFile] | None = opt("reference images of the character (1-3)")
    portrait: Text | None = opt("a prompt generated once; its kept image becomes the reference")

    def check(self, at: Loc, ctx: Context) -> None:
        if (self.references is None) == (self.portrait is None):
            ctx.error(at, "give exactly one of references (image paths) or portrait (a prompt)")
        elif self.references is not None and not self.references:
            ctx.error(at + ("references",), "needs at least one image")


@dataclass(kw_only=True)
class Shot(GenOptions):
    prompt: Text = req("what the character does in this shot")
    name: Name | None = opt("shot name (default: from the prompt)")


@dataclass(kw_only=True)
class Series(GenOptions):
    character: Name = req("a key of characters")
    name: Name | None = opt("series name (default: the character); section series/<name>")
    shots: list[Text | Shot] = req("prompts, or mappings with a prompt and overrides")

    def check(self, at: Loc, ctx: Context) -> None:
        if self.shots is not None and not self.shots:
            ctx.error(at + ("shots",), "needs at least one shot")


EditSize = Size | Literal["input"]


@dataclass(kw_only=True)
class Instruction(GenOptions):
    size: EditSize | None = opt("[width, height], or input: the input's aspect ratio")
    instruction: Text = req("what to change")
    name: Name | None = opt("instruction name (default: from the text)")
    source_caption: str | None = opt("caption of the input, for directional scoring")
    target_caption: str | None = opt("caption of the wanted output, for directional scoring")


@dataclass(kw_only=True)
class EditCampaign(GenOptions):
    size: EditSize | None = opt("[width, height], or input (default): the input's aspect "
                                "ratio at most the pixel count of defaults.size")
    name: Name = req("campaign name; jobs land in section edits/<name>")
    inputs: list[InputGlob] = req("image paths or glob patterns")
    instructions: list[Text | Instruction] = req("edit instructions, applied to every input")

    def check(self, at: Loc, ctx: Context) -> None:
        for key in ("inputs", "instructions"):
            if getattr(self, key) == []:
                ctx.error(at + (key,), "needs at least one entry")


@dataclass(kw_only=True)
class Pair(GenOptions):
    en: Text = req("the English prompt")
    zh: Text = req("the Chinese prompt")
    name: Name | None = opt("pair name (default: from the English prompt)")


@dataclass(kw_only=True)
class BilingualGroup(GenOptions):
    name: Name = req("group name; jobs land in section bilingual/<name>")
    pairs: list[Pair] = req("English/Chinese prompt pairs")

    def check(self, at: Loc, ctx: Context) -> None:
        if self.pairs == []:
            ctx.error(at + ("pairs",), "needs at least one pair")


SECTIONS = ("prompts", "series", "edits", "bilingual")


@dataclass(kw_only=True)
class Recipe:
    """A whole recipe file. `source` (not part of the YAML) says where it came from."""

    HINTS = {"allow_paths": "pass --allow-path DIR on the command line; a recipe cannot "
                            "widen its own access"}
    FREE_PREFIX = "x-"  # top-level keys the engine ignores: a place for YAML anchors
    name: Name = req("the run's name")
    model: Text = opt("hub id, tiny, or a local folder (./, ../, / or ~)", default=DEFAULT_MODEL)
    executor: Literal["local", "ray"] = opt("where jobs run", default="local")
    batch_size: Annotated[int, Range(1, 64)] = opt("images per pipeline call", default=4)
    dtype: Literal[DTYPES] = opt("weights' precision; auto: float32 on a CPU, bfloat16 on a GPU",
                                 default="auto")
    offload: Literal[OFFLOADS] = opt(
        "keep models in CPU memory and move them to the GPU as they run: model (whole models), "
        "sequential (layer by layer, least memory, slowest) or group (groups of layers)",
        default="none")
    keep_attempts: bool = opt("keep every attempt's image too", default=False)
    defaults: Defaults = opt("settings for every job", factory=Defaults)
    prompts: list[PromptGroup] = opt("text-to-image groups", factory=list)
    characters: dict[Name, Character] = opt(
        "characters by name", factory=dict)
    series: list[Series] = opt("in-context shots of a character", factory=list)
    edits: list[EditCampaign] = opt("edit campaigns", factory=list)
    bilingual: list[BilingualGroup] = opt("English/Chinese pairs", factory=list)
    source: Source | None = field(default=None, metadata={"internal": True})

    def where(self, at: Loc) -> str:
        return self.source.where(at)

    def check(self, at: Loc, ctx: Context) -> None:
        if not any(getattr(self, key) for key in SECTIONS + ("characters",)):
            ctx.error(at, f"nothing to make: add at least one of {', '.join(SECTIONS)}")
        for key in ("prompts", "edits", "bilingual"):
            check_unique(getattr(self, key), key, lambda g: g.name, ctx)
        check_unique(self.series, "series", lambda s: s.name or s.character, ctx,
                     "; give each series its own name")
        for index, series in enumerate(self.series):
            if series is INVALID:
                continue
            if series.character is not None and series.character not in self.characters:
                ctx.error(("series", index, "character"), f"unknown character "
                          f"{series.character!r}{did_you_mean(series.character, self.characters)}")
            check_unique(series.shots or [], ("series", index, "shots"),
                         lambda s: getattr(s, "name", None), ctx)
        for index, group in enumerate(self.bilingual):
            if group is not INVALID:
                check_unique(group.pairs or [], ("bilingual", index, "pairs"),
                             lambda pair: pair.name, ctx)
        self.model = check_model(self.model, ctx)


def is_regular_file(path: Path) -> bool:
    """A regular file (not a folder, FIFO or device: reading those hangs or never ends)."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


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


def check_model(model: str | None, ctx: Context) -> str | None:
    """"tiny", a hub id, or a local folder (made absolute)."""
    if model is None or model == "tiny":
        return model
    if model.startswith(("/", "./", "../", "~")):
        path = resolve_inside(model, ("model",), ctx)
        if path is not None and not path.is_dir():
            ctx.error(("model",), f"no such model folder: {model} (looked for {path})")
        return str(path) if path else model
    if not re.fullmatch(HUB_ID_PATTERN, model):
        ctx.error(("model",), f"expected a hub id like {DEFAULT_MODEL}, tiny, or a local "
                              f"folder starting with ./ or /, got {model!r}")
    return model


# ---- loading ------------------------------------------------------------------------------

def load_recipe(path: str | os.PathLike, allow_paths=(), overrides=()) -> Recipe:
    """Read, parse and validate a recipe; raises RecipeError listing every problem.
    `overrides`: "dotted.key=value" strings (the CLI's --set), applied before validation."""
    label = str(path)
    path = Path(path).resolve()
    raw = read_recipe_bytes(path, label)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError([f"{label}: not UTF-8 text ({err.reason} at byte {err.start})"]) from err
    roots = (path.parent,) + tuple(Path(p).expanduser().resolve() for p in allow_paths)
    source = Source(path, label, hashlib.sha256(raw).hexdigest(), {}, roots)
    data = parse_yaml(text, source, RecipeError)
    if overrides and isinstance(data, dict):
        apply_overrides(data, overrides, source, RecipeError)
    ctx = Context(source, RecipeError)
    if not isinstance(data, dict):
        ctx.error((), f"expected a mapping with at least a name, got {json_kind(data)}")
        ctx.raise_if_any()
    recipe = convert_dataclass(data, Recipe, (), ctx)
    ctx.raise_if_any()
    recipe.source = source
    return recipe


def read_recipe_bytes(path: Path, label: str | None = None) -> bytes:
    """The bytes of a recipe file: a regular file of at most MAX_RECIPE_BYTES, read in bounded
    chunks (a FIFO would hang, /dev/zero never ends); RecipeError otherwise."""
    label = label or str(path)
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer before we can refuse it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (OSError, ValueError) as err:
        raise RecipeError([f"{label}: cannot read the recipe "
                           f"({getattr(err, 'strerror', None) or err})"]) from err
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RecipeError([f"{label}: not a regular file (a folder, FIFO or device); give "
                               "the path of a recipe .yaml file"])
        raw = stream.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError([f"{label}: the recipe is over {MAX_RECIPE_BYTES:,} bytes; split it"])
    return raw


# ---- JSON Schema --------------------------------------------------------------------------

def schema_text() -> str:
    """recipe_schema.json as shipped; regenerate with `omnigen2-batch schema > ...`."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def json_schema() -> dict:
    """The JSON Schema of a recipe, derived from the dataclasses (recipe_schema.json)."""
    defs: dict[str, dict] = {}
    root = dataclass_schema(Recipe, defs)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "omnigen2-batch recipe", **root, "$defs": dict(sorted(defs.items()))}
