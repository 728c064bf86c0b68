"""Recipes: the YAML a person writes, its schema, and validation with file:line errors.

A recipe names a run and lists what to make. Every section is a list of named groups, and every
group (and every item inside one) may override any generation setting from `defaults`::

    name: spring-campaign            # required; names the run
    model: OmniGen2/OmniGen2         # hub id | "toy" (shipped toy-world model) | "tiny" (random,
                                     # for tests) | ./local/folder
    executor: local                  # local | ray
    batch_size: 4                    # images per pipeline call (same-shape jobs only)
    keep_attempts: false             # also keep every attempt's image, not only the kept one
    transformer: ./finetune.safetensors          # optional: replaces the model's transformer
    defaults: {size: [1024, 1024], steps: 50, seed: 0, scoring: {thresholds: {text: 0.25}},
               lora: [{path: ./style.safetensors, scale: 0.8}], cache: {teacache: 0.08},
               mode: fast}       # every generation setting (GenOptions below; README)
    prompts:                         # text-to-image; {var} placeholders
      - name: animals
        prompt: "a {animal} in {style} style"    # or a list of templates
        vars: {style: watercolor}                # fixed values
        matrix: {animal: [cat, fox]}             # every combination becomes a job
    characters:                      # who appears in a series
      mira: {references: [assets/mira.png]}      # 1-3 reference images, or ...
      robo: {portrait: "a round white robot"}    # ... a prompt generated once as the anchor
    series:                          # in-context shots of one character, or several
      - characters: [mira, robo]               # their references are images 1, 2, ...
        images: {ball: assets/ball.png}        # extra references after them
        seeds: [1, 7]                          # one job per literal seed
        sweep: {text_guidance: [4, 6]}         # X (Y, Z) axes: a labelled grid per shot
        shots: ["the girl from {mira} throws {ball} to the robot from {robo}"]
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

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from .config import DEFAULT_MODEL, DTYPES, OFFLOADS
from .recipe_types import (SCHEDULERS, CfgRange, InputFile, InputGlob, Name, RunScoring,
                           SectionScoring, SeedList, Size, Text, VarName, check_clashes,
                           check_template, check_unique, known_names)
from .recipe_weights import MODES, CacheSetting, LoraList, check_model, check_transformer
from .rules import LADDER_STEPS
from .sweep import Sweep, check_axes, placeholder_axes
from .typed_yaml import (INVALID, Context, DocumentError, Loc, Range, Source, convert_dataclass,
                         dataclass_schema, did_you_mean, json_kind, opt, req)
from .yaml_document import apply_overrides, parse_yaml

MAX_RECIPE_BYTES = 1 << 20
MAX_JOBS, MAX_JOBS_CEILING = 10_000, 100_000  # max_jobs: its default, and the most it may say


class RecipeError(DocumentError):
    """An invalid recipe (or plan); `errors` holds every "file:line: field: message"."""


# ---- the schema ---------------------------------------------------------------------------

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
    seeds: SeedList | None = opt("one job per seed, with exactly that seed (not derived)")
    variants: Annotated[int, Range(1, 16)] | None = opt(
        "keep up to this many passing images per job, ranked, each its own file")
    ladder: list[Literal[LADDER_STEPS]] | None = opt("retry strategies after a failed attempt")
    scoring: SectionScoring | None = opt("score thresholds for this level")
    lora: LoraList | None = opt("LoRA adapters [{path, scale}] acting together; [] turns off "
                                "the adapters of an outer level")
    cache: CacheSetting | None = opt("step cache: none (exact), teacache, taylorseer, or "
                                     "{teacache: THRESHOLD} (default 0.05; larger skips more)")
    mode: Literal[MODES] | None = opt("exact (default) or fast: fast fills the cfg_range, "
                                      "scheduler and cache this recipe leaves unset with "
                                      "[0, 0.6], dpmsolver++ and taylorseer")


@dataclass(kw_only=True)
class Defaults(GenOptions):
    scoring: RunScoring | None = opt("the CLIP scorer and default thresholds")


@dataclass(kw_only=True)
class Extras:
    """Named extra reference images (an object, a style, a background): input images after the
    characters' ones; a prompt names them as {name}."""

    images: dict[VarName, InputFile] | None = opt(
        "name -> an extra reference image; {name} in a prompt becomes 'image N'")


@dataclass(kw_only=True)
class Subjects(Extras):
    characters: list[Name] | None = opt(
        "characters (keys of characters) whose references are input images, in this order; "
        "{name} in a prompt becomes 'image N'")

    def ref_names(self) -> list[str]:
        return list(self.characters or ()) + list(self.images or ())


@dataclass(kw_only=True)
class PromptGroup(GenOptions, Subjects):
    name: Name = req("group name; jobs land in section prompts/<name>")
    prompt: Text | list[Text] = req("a prompt template, or a list; {var} placeholders")
    vars: dict[VarName, str] | None = opt("placeholder -> fixed value")
    matrix: dict[VarName, list[str]] | None = opt(
        "placeholder -> values; every combination becomes a job")
    sweep: Sweep | None = opt("up to 3 axes (X, Y, Z): parameter or placeholder -> values; "
                              "one job per cell, drawn as a labelled grid")

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
        names = {"vars": fixed, "matrix": matrix, "sweep": placeholder_axes(self.sweep),
                 "images/characters": self.ref_names()}
        check_clashes(names, at, ctx)
        sources = ("vars, matrix, sweep, images or characters"
                   if names["sweep"] or names["images/characters"] else "")
        used = set()
        for index, template in enumerate(self.templates()):
            if not isinstance(template, str):
                continue
            where = at + ("prompt",) + ((index,) if isinstance(self.prompt, list) else ())
            used |= check_template(template, known_names(names), where, ctx, sources)
        for var in sorted(set(matrix) - used):
            ctx.error(at + ("matrix", var), f"no prompt uses {{{var}}}")
        check_axes(self.sweep, used, bool(self.ref_names()), at, ctx)


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
class Shot(GenOptions, Extras):
    prompt: Text = req("what the characters do in this shot; {name} placeholders")
    name: Name | None = opt("shot name (default: from the prompt)")


@dataclass(kw_only=True)
class Series(GenOptions, Subjects):
    character: Name | None = opt("a key of characters (or list several in characters)")
    name: Name | None = opt("series name (default: the character); section series/<name>")
    shots: list[Text | Shot] = req("prompts, or mappings with a prompt and overrides")
    sweep: Sweep | None = opt("up to 3 axes (X, Y, Z): parameter or placeholder -> values")

    def cast(self) -> list[str]:
        return [self.character] if self.character else list(self.characters or ())

    def check(self, at: Loc, ctx: Context) -> None:
        if (self.character is None) == (self.characters is None):
            ctx.error(at, "give exactly one of character (a name) or characters (a list)")
        elif self.characters == []:
            ctx.error(at + ("characters",), "needs at least one character")
        if self.shots is not None and not self.shots:
            ctx.error(at + ("shots",), "needs at least one shot")
        used = set()
        for index, shot in enumerate(self.shots or ()):
            own = shot.images if isinstance(shot, Shot) else None
            names = {"characters": self.cast(), "images": self.images or {},
                     "shot images": own or {}, "sweep": placeholder_axes(self.sweep)}
            check_clashes(names, at + ("shots", index), ctx)
            prompt = shot.prompt if isinstance(shot, Shot) else shot
            if isinstance(prompt, str):
                where = at + ("shots", index) + (("prompt",) if isinstance(shot, Shot) else ())
                used |= check_template(prompt, known_names(names), where, ctx,
                                       "characters, images or sweep")
        check_axes(self.sweep, used, True, at, ctx)


EditSize = Size | Literal["input"]


@dataclass(kw_only=True)
class Instruction(GenOptions, Extras):
    size: EditSize | None = opt("[width, height], or input: the input's aspect ratio")
    instruction: Text = req("what to change")
    name: Name | None = opt("instruction name (default: from the text)")
    source_caption: str | None = opt("caption of the input, for directional scoring")
    target_caption: str | None = opt("caption of the wanted output, for directional scoring")


@dataclass(kw_only=True)
class EditCampaign(GenOptions, Extras):
    size: EditSize | None = opt("[width, height], or input (default): the input's aspect "
                                "ratio at most the pixel count of defaults.size")
    name: Name = req("campaign name; jobs land in section edits/<name>")
    inputs: list[InputGlob] = req("image paths or glob patterns")
    instructions: list[Text | Instruction] = req("edit instructions, applied to every input; "
                                                 "{name} placeholders for images and sweep")
    sweep: Sweep | None = opt("up to 3 axes (X, Y, Z): parameter or placeholder -> values")

    def check(self, at: Loc, ctx: Context) -> None:
        for key in ("inputs", "instructions"):
            if getattr(self, key) == []:
                ctx.error(at + (key,), "needs at least one entry")
        used = set()
        for index, item in enumerate(self.instructions or ()):
            own = item.images if isinstance(item, Instruction) else None
            names = {"images": self.images or {}, "instruction images": own or {},
                     "sweep": placeholder_axes(self.sweep)}
            check_clashes(names, at + ("instructions", index), ctx)
            text = item.instruction if isinstance(item, Instruction) else item
            if isinstance(text, str) and any(names.values()):
                where = at + ("instructions", index) + (
                    ("instruction",) if isinstance(item, Instruction) else ())
                used |= check_template(text, known_names(names), where, ctx, "images or sweep")
        check_axes(self.sweep, used, True, at, ctx)


@dataclass(kw_only=True)
class Pair(GenOptions):
    en: Text = req("the English prompt")
    zh: Text = req("the Chinese prompt")
    name: Name | None = opt("pair name (default: from the English prompt)")


@dataclass(kw_only=True)
class BilingualGroup(GenOptions):
    name: Name = req("group name; jobs land in section bilingual/<name>")
    pairs: list[Pair] = req("English/Chinese prompt pairs")
    sweep: Sweep | None = opt("up to 3 axes (X, Y, Z): parameter or placeholder -> values")

    def check(self, at: Loc, ctx: Context) -> None:
        if self.pairs == []:
            ctx.error(at + ("pairs",), "needs at least one pair")
        known = placeholder_axes(self.sweep)
        used = set()
        for index, pair in enumerate(self.pairs or ()):
            for side in ("en", "zh") if known and pair is not INVALID else ():
                if isinstance(getattr(pair, side), str):
                    used |= check_template(getattr(pair, side), known,
                                           at + ("pairs", index, side), ctx, "sweep")
        check_axes(self.sweep, used, False, at, ctx)


SECTIONS = ("prompts", "series", "edits", "bilingual")


@dataclass(kw_only=True)
class Recipe:
    """A whole recipe file. `source` (not part of the YAML) says where it came from."""

    HINTS = {"allow_paths": "pass --allow-path DIR on the command line; a recipe cannot "
                            "widen its own access"}
    FREE_PREFIX = "x-"  # top-level keys the engine ignores: a place for YAML anchors
    name: Name = req("the run's name")
    model: Text = opt("hub id, toy (the shipped toy-world model), tiny (random weights, for tests), "
                      "or a local folder (./, ../, / or ~)", default=DEFAULT_MODEL)
    executor: Literal["local", "ray"] = opt("where jobs run", default="local")
    batch_size: Annotated[int, Range(1, 64)] = opt("images per pipeline call", default=4)
    dtype: Literal[DTYPES] = opt("weights' precision; auto: float32 on a CPU, bfloat16 on a GPU",
                                 default="auto")
    offload: Literal[OFFLOADS] = opt(
        "keep models in CPU memory and move them to the GPU as they run: model (whole models), "
        "sequential (layer by layer, least memory, slowest) or group (groups of layers)",
        default="none")
    transformer: Text | None = opt(
        "replace the model's transformer: a transformer folder (config.json + safetensors), a "
        "model folder holding transformer/, or a .safetensors state dict (a fine-tune)")
    compile: bool = opt("torch.compile the transformer's blocks (slow first calls, then "
                        "faster; offload none or model only)", default=False)
    keep_attempts: bool = opt("keep every attempt's image too", default=False)
    max_jobs: Annotated[int, Range(1, MAX_JOBS_CEILING)] = opt(
        "refuse a recipe (a sweep, a matrix) that makes more jobs than this", default=MAX_JOBS)
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
            if series.character is not None:
                self.check_cast([series.character], ("series", index, "character"), ctx)
            self.check_cast(series.characters or (), ("series", index, "characters"), ctx)
            check_unique(series.shots or [], ("series", index, "shots"),
                         lambda s: getattr(s, "name", None), ctx)
        for index, group in enumerate(self.prompts):
            if group is not INVALID:
                self.check_cast(group.characters or (), ("prompts", index, "characters"), ctx)
        for index, group in enumerate(self.bilingual):
            if group is not INVALID:
                check_unique(group.pairs or [], ("bilingual", index, "pairs"),
                             lambda pair: pair.name, ctx)
        self.model = check_model(self.model, ctx)
        self.transformer = check_transformer(self.transformer, ctx)
        if self.compile and self.offload in ("sequential", "group"):
            ctx.error(("compile",), f"works with offload none or model, not {self.offload} "
                                    "(its hooks run inside the blocks a compiled block fuses)")

    def check_cast(self, names, at: Loc, ctx: Context) -> None:
        """Every name is a character, listed once."""
        for index, name in enumerate(names):
            where = at if at[-1] == "character" else at + (index,)
            if name not in self.characters:
                ctx.error(where, f"unknown character {name!r}"
                                 f"{did_you_mean(name, self.characters)}")
            elif name in list(names)[:index]:
                ctx.error(where, f"{name!r} is listed twice")


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
