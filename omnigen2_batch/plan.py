"""Recipe -> Plan: the jobs (ids, seeds, dependencies, in order), run settings and a cost estimate.

- Settings resolve nearest-level-wins: item (shot, instruction, pair) > group > defaults >
  built-ins; score thresholds merge across levels instead.
- Seeds: a job's seed is derived from the base seed and the job's identity without its seed, so
  the same recipe always gives the same seeds and ids, and adding a job changes no other job.
  An English/Chinese pair shares the seed of its English job.
- Every input image is inspected (images.inspect_input) before anything runs: unusable files are
  errors, poor ones warnings (errors under `strict`); every prompt must fit the model's text
  positions (prompt_budget.py). Jobs are counted before any is built (expand.py, max_jobs).
No torch here: `plan` and `validate` answer in well under a second.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .config import (BUILTIN_DEFAULTS, IMAGE_GUIDANCE, TOY_DEFAULTS, TOY_MODEL, RunConfig,
                     toy_thresholds)
from .images import MAX_INPUTS, ImageError, content_hash, image_size, inspect_input
from .cost import Estimate, estimate
from .expand import (Subjects, Variation, check_job_count, placeholders, seed_setting,
                     variations)
from .jobs import ImageRef, Job, Scoring, job_id
from .plan_options import (LoraRefs, resolve_model, resolve_transformer, run_config,
                           speed_settings, toy_scored, transformer_key)
from .prompt_budget import image_positions, text_budget
from .recipe import Instruction, Loc, Recipe, RecipeError, Shot
from .recipe_types import MAX_SIDE, MIN_SIDE, SIZE_STEP

MAX_REF_IMAGES = 5  # model/transformer.py's MAX_REF_IMAGES: input images one job can have
SEED_MASK = 2**31 - 1  # seeds fit every generator API (numpy needs < 2**32, some want int32)


@dataclass
class Plan:
    name: str  # the recipe's name: the run directory's default name and its owner
    jobs: list[Job]  # topological order: a job comes after every job it depends on
    config: RunConfig  # how the recipe asks to be run (the command line may change it)
    estimate: Estimate
    recipe_sha256: str = ""
    origins: dict[str, str] = field(default_factory=dict)  # job id -> "recipe.yaml:9: prompts[0]"
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        jobs = [{"id": job.id, "depends_on": list(job.depends_on),
                 "origin": self.origins.get(job.id), **job.to_dict()} for job in self.jobs]
        return {"name": self.name, "recipe_sha256": self.recipe_sha256, "config": self.config.to_dict(),
                "estimate": self.estimate.to_dict(), "warnings": self.warnings, "jobs": jobs}


def build_plan(recipe: Recipe, model_override: str | None = None, strict: bool = False,
               transformer_override: str | None = None) -> Plan:
    """Expand a loaded recipe into jobs; raises RecipeError listing every plan-time problem.
    The overrides (--model, --transformer) change job ids, so they come before any job."""
    check_job_count(recipe)
    model = resolve_model(model_override) if model_override else recipe.model
    transformer = (resolve_transformer(transformer_override) if transformer_override
                   else recipe.transformer)
    builder = JobBuilder(recipe, model, transformer_key(transformer))
    builder.build()
    warnings = builder.check_inputs()
    builder.check_prompt_lengths()
    errors = builder.errors
    if strict:
        errors += [f"{warning} (an error under --strict)" for warning in warnings]
    if not errors:
        try:
            jobs = order_jobs([job for job, _ in builder.jobs])
        except RecipeError as err:
            errors += err.errors
    if errors:
        raise RecipeError(list(dict.fromkeys(errors)))
    origins = {job.id: recipe.where(at) for job, at in builder.jobs}
    return Plan(recipe.name, jobs, run_config(recipe, model, transformer), estimate(jobs),
                recipe.source.sha256, origins, warnings)


# ---- expanding sections into jobs -------------------------------------------------------------

def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe label from free text ("A cat, in oil!" -> "a-cat-in-oil")."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:limit].rstrip("-") or "job"


class JobBuilder:
    """Turns the sections of a recipe into (Job, location) pairs, collecting errors."""

    def __init__(self, recipe: Recipe, model: str, transformer: str = ""):
        self.recipe, self.model, self.transformer = recipe, model, transformer  # its content key
        self.builtins = BUILTIN_DEFAULTS | (TOY_DEFAULTS if model == TOY_MODEL else {})
        # Thresholds calibrated for the toy CLIP on the toy world: only when that CLIP scores.
        self.base_thresholds = toy_thresholds() if toy_scored(recipe, model) else {}
        self.jobs: list[tuple[Job, Loc]] = []
        self.errors: list[str] = []
        self.loras = LoraRefs(self.errors)
        self.anchors: dict[str, Job] = {}  # character name -> its portrait job
        self._names: dict[str, set[str]] = {}
        self._next_suffix: dict[tuple[str, str], int] = {}  # keeps unique_name linear
        self._sizes: dict[str, tuple[int, int]] = {}  # input file -> (width, height)
        self._refs: dict[Path, ImageRef] = {}
        self._files: dict[Path, str] = {}  # every input file -> where the recipe names it

    def build(self) -> None:
        recipe = self.recipe
        for name, character in recipe.characters.items():
            if character.portrait:
                base, seeds = seed_setting(recipe, [character])
                self.anchors[name] = self.add(
                    ("characters", name, "portrait"), [character], "t2i", character.portrait,
                    f"characters/{name}", "portrait", seed=seeds[0] if seeds else None)
        for index, group in enumerate(recipe.prompts):
            self.add_prompts(("prompts", index), group)
        for index, series in enumerate(recipe.series):
            self.add_series(("series", index), series)
        for index, campaign in enumerate(recipe.edits):
            self.add_edits(("edits", index), campaign)
        for index, group in enumerate(recipe.bilingual):
            self.add_bilingual(("bilingual", index), group)
        self.check_duplicates()

    def add_prompts(self, at: Loc, group) -> None:
        fixed, matrix = group.vars or {}, group.matrix or {}
        subjects = self.subjects(at, group.characters or (), group.images or {})
        if subjects is None:
            return
        kind = "incontext" if subjects.inputs else "t2i"
        for index, template in enumerate(group.templates()):
            where = at + ("prompt",) + ((index,) if isinstance(group.prompt, list) else ())
            for values in itertools.product(*matrix.values()):
                values = {**fixed, **dict(zip(matrix, values))}
                name = slug(template.format_map(
                    {**values, **placeholders(group.sweep), **placeholders(subjects.words)}))
                for var in variations(self.recipe, [group], group.sweep):
                    prompt = template.format_map({**values, **subjects.words, **var.cell.text})
                    self.add(where, [group], kind, prompt, f"prompts/{group.name}", name,
                             var=var, inputs=subjects.inputs, scoring=subjects.scoring(prompt))

    def add_series(self, at: Loc, series) -> None:
        section = f"series/{series.name or series.character}"
        for index, shot in enumerate(series.shots):
            shot = shot if isinstance(shot, Shot) else Shot(prompt=shot)
            where = at + ("shots", index)
            images = {**(series.images or {}), **(shot.images or {})}
            subjects = self.subjects(where, series.cast(), images)
            if subjects is None:
                continue
            name = shot.name or slug(shot.prompt.format_map(
                {**placeholders(subjects.words), **placeholders(series.sweep)}))
            for var in variations(self.recipe, [series, shot], series.sweep):
                prompt = shot.prompt.format_map({**subjects.words, **var.cell.text})
                self.add(where, [series, shot], "incontext", prompt, section, name, var=var,
                         inputs=subjects.inputs, scoring=subjects.scoring(prompt))

    def add_edits(self, at: Loc, campaign) -> None:
        files = [file for matched in campaign.inputs for file in matched]
        for index, item in enumerate(campaign.instructions):
            item = item if isinstance(item, Instruction) else Instruction(instruction=item)
            where = at + ("instructions", index)
            images = {**(campaign.images or {}), **(item.images or {})}
            extras = self.subjects(where, (), images, first=2)
            is_template = bool(images or campaign.sweep and placeholders(campaign.sweep))
            if extras is None:
                continue
            for file in files:
                ref = self.file_ref(file)
                label = f"{slug(file.path.stem, 24)}-{item.name or slug(item.instruction, 24)}"
                size = item.size or campaign.size or "input"
                size = self.input_size(file.path) if size == "input" else size
                for var in variations(self.recipe, [campaign, item], campaign.sweep):
                    text = (item.instruction.format_map({**extras.words, **var.cell.text})
                            if is_template else item.instruction)
                    scoring = Scoring(text=item.target_caption or text, source=ref,
                                      source_caption=item.source_caption or "",
                                      target_caption=item.target_caption or "")
                    self.add(where, [campaign, item], "edit", text, f"edits/{campaign.name}",
                             label, var=var, inputs=(ref, *extras.inputs), scoring=scoring,
                             size=size)

    def add_bilingual(self, at: Loc, group) -> None:
        is_template = bool(placeholders(group.sweep))
        for index, pair in enumerate(group.pairs):
            name = pair.name or slug(pair.en)
            section, layers = f"bilingual/{group.name}", [group, pair]
            for var in variations(self.recipe, layers, group.sweep):
                en, zh = ((side.format_map(var.cell.text) if is_template else side)
                          for side in (pair.en, pair.zh))
                key = f"{group.name}/{name}{var.suffix}"
                en_job = self.add(at + ("pairs", index, "en"), layers, "t2i", en, section,
                                  f"{name}-en", var=var, scoring=Scoring(text=en, pair=key))
                self.add(at + ("pairs", index, "zh"), layers, "t2i", zh, section, f"{name}-zh",
                         var=replace(var, seed=en_job.seed), lang="zh",
                         scoring=Scoring(text=en, pair=key))

    def subjects(self, at: Loc, cast, images: dict, first: int = 1) -> "Subjects | None":
        """The input images a job names, in order (each character's references, then the
        extra images), numbered from `first`; None (an error recorded) beyond the model's limit."""
        refs: dict[str, tuple[ImageRef, ...]] = {}
        for name in cast:
            character = self.recipe.characters[name]
            refs[name] = ((ImageRef(f"job:{self.anchors[name].id}"),) if character.portrait
                          else tuple(self.file_ref(file) for file in character.references))
        refs.update((name, (self.file_ref(file),)) for name, file in images.items())
        total = first - 1 + sum(map(len, refs.values()))
        if total > MAX_REF_IMAGES:
            parts = ", ".join(f"{name} {len(group)}" for name, group in refs.items())
            edit = " (the edit's input is image 1)" if first > 1 else ""
            self.errors.append(f"{self.recipe.where(at)}: {total} input images ({parts}){edit}; "
                               f"the model takes at most {MAX_REF_IMAGES} per job: drop a "
                               "reference image, an extra image or a character")
            return None
        return Subjects.number(refs, set(cast), first)

    def add(self, at: Loc, layers: list, kind: str, prompt: str, section: str, name: str, *,
            var: Variation | None = None, inputs: tuple = (), scoring: Scoring | None = None,
            lang: str = "en", size: tuple | None = None, seed: int | None = None) -> Job:
        """Make one job from the settings of `layers` (nearest last; a sweep cell's values
        over them all) and record it."""
        if var is not None:
            cell = {k: v for k, v in var.cell.settings.items() if k != "seed"}
            layers = [*layers, SimpleNamespace(scoring=None, **cell)]
            seed, name = var.seed, name + var.suffix
        get = lambda key: self.setting(layers, key)  # noqa: E731
        candidates, max_attempts = get("candidates"), get("max_attempts")
        for key in ("candidates", "variants"):
            if get(key) > max_attempts:
                self.errors.append(f"{self.recipe.where(at)}: {key} ({get(key)}) exceeds "
                                   f"max_attempts ({max_attempts}), which counts them too")
        width, height = size or get("size")
        scoring = scoring or Scoring(text=prompt)
        speed = speed_settings(lambda key: self.explicit(layers, key))
        job = Job(section=section, name=self.unique_name(section, name), kind=kind,
                  prompt=prompt, negative_prompt=get("negative_prompt"), inputs=inputs,
                  width=width, height=height, steps=get("steps"),
                  text_guidance=get("text_guidance"),
                  image_guidance=IMAGE_GUIDANCE["t2i"] if kind == "t2i"
                  else self.setting(layers, "image_guidance", IMAGE_GUIDANCE[kind]),
                  model=self.model, max_input_side=get("max_input_side"), **speed,
                  lora=self.loras.refs(self.explicit(layers, "lora")),
                  transformer=self.transformer,
                  lang=lang, candidates=candidates, max_attempts=max_attempts,
                  variants=get("variants"), ladder=tuple(get("ladder")),
                  sweep={**var.cell.labels, "base": name[:len(name) - len(var.suffix)]}
                  if var is not None and var.cell.labels else {},
                  scoring=replace(scoring, thresholds=self.thresholds(layers, kind, scoring)))
        base_seed = seed_setting(self.recipe, layers)[0] or 0
        job = job.with_(seed=derive_seed(base_seed, job) if seed is None else seed)
        self.jobs.append((job, at))
        return job

    def input_size(self, path: Path) -> tuple[int, int]:
        """An edit's output size after its input; defaults.size is the pixel budget."""
        budget = self.setting([], "size")
        size = self.file_size(str(path))
        return budget if size == (1, 1) else fit_size(size, budget)  # (1, 1): unreadable

    def setting(self, layers: list, key: str, default: Any = None) -> Any:
        """The nearest level's value of `key`: layers, then defaults, then `default` or the
        built-in."""
        value = self.explicit(layers, key)
        if value is not None:
            return value
        return self.builtins[key] if default is None else default

    def explicit(self, layers: list, key: str) -> Any:
        """The nearest level's value of `key`, or None when no level sets it."""
        for layer in reversed([self.recipe.defaults, *layers]):
            value = getattr(layer, key, None)
            if value is not None:
                return value
        return None

    def thresholds(self, layers: list, kind: str, scoring: Scoring) -> dict[str, float]:
        """The recipe's thresholds over the built-in ones of the kind that the job is scored on."""
        merged = {m: v for m, v in self.base_thresholds.get(kind, {}).items() if scoring.measures(m)}
        for layer in [self.recipe.defaults, *layers]:
            merged.update((layer.scoring.thresholds or {}) if layer.scoring else {})
        return merged

    def unique_name(self, section: str, name: str) -> str:
        """`name`, or name-2, name-3, ... when taken. The next suffix to try is remembered per
        name: counting up from 2 each time made 10,000 alike names quadratic (16 s)."""
        taken = self._names.setdefault(section, set())
        n = self._next_suffix.get((section, name), 1)
        unique = name if n == 1 else f"{name}-{n}"
        while unique in taken:
            n += 1
            unique = f"{name}-{n}"
        self._next_suffix[(section, name)] = n + 1
        taken.add(unique)
        return unique

    def file_ref(self, file) -> ImageRef:
        self._files.setdefault(file.path, file.where)
        if file.path not in self._refs:
            try:
                key = content_hash(file.path)
            except OSError as err:  # check_inputs names the file; keep planning meanwhile
                key = f"unreadable:{file.path}"
                self.errors.append(f"{file.where}: cannot read {file.path} ({err.strerror})")
            self._refs[file.path] = ImageRef(key, str(file.path))
        return self._refs[file.path]

    def check_duplicates(self) -> None:
        first: dict[str, Loc] = {}
        for job, at in self.jobs:
            if job.id in first:
                self.errors.append(
                    f"{self.recipe.where(at)}: makes the same job as "
                    f"{self.recipe.where(first[job.id])} (same prompt, inputs and settings); "
                    "change one of them or give one its own seed")
            first.setdefault(job.id, at)

    def check_inputs(self) -> list[str]:
        """Inspect every input file once; errors go to self.errors, warnings are returned."""
        warnings, folder = [], self.recipe.source.path.parent
        smallest_side: dict[str, int] = {}  # the strictest max_input_side a file is read with
        for job, _ in self.jobs:
            for ref in job.inputs:
                smallest_side[ref.path] = min(job.max_input_side,
                                              smallest_side.get(ref.path, job.max_input_side))
        for path, where in self._files.items():
            shown = path.relative_to(folder) if path.is_relative_to(folder) else path
            for issue in inspect_input(path, smallest_side.get(str(path), 1024)):
                text = f"{where}: {shown}: {issue.message}"
                (self.errors if issue.level == "error" else warnings).append(text)
        by_inputs: dict[tuple, list[Loc]] = {}
        for job, at in self.jobs:
            if len(job.inputs) > MAX_INPUTS:
                by_inputs.setdefault(job.inputs, []).append(at)
        for inputs, places in by_inputs.items():
            others = f" (and {len(places) - 1} more jobs)" if len(places) > 1 else ""
            # (over MAX_REF_IMAGES never gets here: `subjects` refuses it while building)
            warnings.append(f"{self.recipe.where(places[0])}: {len(inputs)} input images for one "
                            f"job{others}; OmniGen2 handles at most {MAX_INPUTS} well: keep the "
                            "best ones")
        return warnings

    def check_prompt_lengths(self) -> None:
        """Every prompt and negative prompt, with the job's input images, fits the model's
        text positions (prompt_budget.py); one error per place and text."""
        budget = text_budget(self.model)
        tokens = budget.count([text for job, _ in self.jobs
                               for text in (job.prompt, job.negative_prompt)])
        sizes = {job.id: (job.width, job.height) for job, _ in self.jobs}
        reported = set()
        for job, at in self.jobs:
            room = budget.room(sum(
                image_positions(sizes[ref.job_id] if ref.job_id else self.file_size(ref.path),
                                job.max_input_side) for ref in job.inputs))
            for key, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
                if tokens[text] > room and (at if key == "prompt" else text) not in reported:
                    reported.add(at if key == "prompt" else text)
                    self.errors.append(
                        f"{self.recipe.where(at)}: the {key} of this job is too long for the model: "
                        f"{tokens[text]:,} {budget.unit()} with the chat template "
                        f"({len(text):,} characters), and {self.model} has room for "
                        f"{max(room, 0):,} here (a job with {len(job.inputs)} input images); "
                        "shorten it")

    def file_size(self, path: str) -> tuple[int, int]:
        """An input file's size from its header, read once per file; (1, 1) if unreadable
        (check_inputs reports it)."""
        if path not in self._sizes:
            try:
                self._sizes[path] = image_size(path)
            except ImageError:
                self._sizes[path] = (1, 1)
        return self._sizes[path]


def derive_seed(base: int, job: Job) -> int:
    identity = {key: value for key, value in job.identity().items() if key != "seed"}
    return int(job_id({"base_seed": base, **identity})[:8], 16) & SEED_MASK


def fit_size(input_size: tuple[int, int], budget: tuple[int, int]) -> tuple[int, int]:
    """The input's aspect ratio at no more pixels than `budget`, multiples of 16 (as OmniGen2
    sizes an edit's output after its input)."""
    width, height = input_size
    scale = min(1.0, math.sqrt(budget[0] * budget[1] / (width * height)))
    return tuple(min(MAX_SIDE, max(MIN_SIDE, int(side * scale) // SIZE_STEP * SIZE_STEP))
                 for side in (width, height))


# ---- ordering -------------------------------------------------------------------------------

def order_jobs(jobs: list[Job]) -> list[Job]:
    """Jobs in dependency order, otherwise as given; RecipeError on a missing job or a cycle."""
    by_id = {job.id: job for job in jobs}
    errors = [f"{job.section}/{job.name} ({job.id}) needs job {dep}, which is not in the plan"
              for job in jobs for dep in job.depends_on if dep not in by_id]
    if errors:
        raise RecipeError(errors)
    done: dict[str, Job] = {}
    waiting = list(jobs)
    while waiting:  # each pass takes, in order, every job whose dependencies are done
        before = len(done)
        for job in waiting:
            if all(dep in done for dep in job.depends_on):
                done[job.id] = job
        if len(done) == before:
            cycle = ", ".join(f"{job.section}/{job.name}" for job in waiting)
            raise RecipeError([f"these jobs depend on each other in a cycle: {cycle}"])
        waiting = [job for job in waiting if job.id not in done]
    return list(done.values())


def describe_plan(plan: Plan) -> str:
    """The plan as a table a person reads: run order, section, name, kind, id, dependencies."""
    rows = [("section", "name", "kind", "id", "depends on")]
    rows += [(job.section, job.name, job.kind, job.id, ", ".join(job.depends_on) or "-")
             for job in plan.jobs]
    widths = [max(len(row[col]) for row in rows) for col in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4]
             for row in rows]
    cost = plan.estimate
    lines += sweep_lines(plan.jobs)
    lines += ["", f"model {plan.config.model}, executor {plan.config.executor}",
              f"{cost.jobs} jobs, {cost.images} images (worst case {cost.images_worst}), "
              f"{cost.forwards} transformer forwards (worst {cost.forwards_worst})",
              f"~{cost.gpu_seconds:g} GPU-seconds (worst {cost.gpu_seconds_worst:g}): "
              f"{cost.basis}"]
    return "\n".join(line.rstrip() for line in lines)


def sweep_lines(jobs: list[Job]) -> list[str]:
    """One line per swept section: its axes, job count and cost, before anything runs."""
    sections: dict[str, list[Job]] = {}
    for job in jobs:
        if job.sweep:
            sections.setdefault(job.section, []).append(job)
    lines = []
    for section, cells in sections.items():
        axes = cells[0].sweep["axes"]
        sizes = [len({tuple(job.sweep["values"])[i] for job in cells}) for i in range(len(axes))]
        shape = " x ".join(f"{axis} {size}" for axis, size in zip(axes, sizes))
        cost = estimate(cells)
        lines.append(f"sweep {section}: {shape}: {cost.jobs} jobs, ~{cost.gpu_seconds:g} "
                     f"GPU-seconds (worst {cost.gpu_seconds_worst:g})")
    return [""] + lines if lines else []
