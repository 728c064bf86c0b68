"""What one recipe entry multiplies into, before any job is built: its variations (sweep cells x
literal seeds) and their count, its named input images and the "image N" words that stand for
them in a prompt, and the job count of a whole recipe (checked against max_jobs before a single job exists).
No torch here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .jobs import ImageRef, Scoring
from .recipe import Instruction, Loc, Recipe, RecipeError, Shot
from .sweep import Cell, cell_count, cells, placeholder_axes


@dataclass(frozen=True)
class Variation:
    cell: Cell  # sweep cell (an empty Cell without a sweep)
    seed: int | None  # a literal seed (seeds: or a seed axis), or None: derive it
    suffix: str  # added to the job's name so variations tell apart ("-3-ink-s7")


def seed_setting(recipe: Recipe, layers: list) -> tuple[int | None, tuple | None]:
    """(base seed, literal seeds) of the nearest level that sets either `seed` or `seeds`."""
    for layer in reversed([recipe.defaults, *layers]):
        if getattr(layer, "seeds", None) is not None:
            return None, layer.seeds
        if getattr(layer, "seed", None) is not None:
            return layer.seed, None
    return None, None


def variations(recipe: Recipe, layers: list, sweep) -> list[Variation]:
    """Every (cell, seed) of an entry: a sweep's seed axis replaces `seeds`."""
    _, seeds = seed_setting(recipe, layers)
    found = []
    for cell in cells(sweep):
        literal = cell.settings.get("seed")
        for seed in (literal,) if literal is not None else (seeds or (None,)):
            parts = ([cell.suffix()] if cell.labels else []) + (
                [f"s{seed}"] if seeds and literal is None else [])
            found.append(Variation(cell, seed, "".join(f"-{part}" for part in parts)))
    return found


def variation_count(recipe: Recipe, layers: list, sweep) -> int:
    _, seeds = seed_setting(recipe, layers)
    seed_axis = any(axis.name == "seed" for axis in sweep or ())
    return cell_count(sweep) * (len(seeds) if seeds and not seed_axis else 1)


def image_words(numbers: list[int]) -> str:
    """How a prompt names input images, as OmniGen2 was trained: "image 2", "images 1 and 2"."""
    if len(numbers) == 1:
        return f"image {numbers[0]}"
    return "images " + ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"


@dataclass(frozen=True)
class Subjects:
    """The named input images of a job, in order, and what a prompt calls them."""

    refs: dict[str, tuple[ImageRef, ...]]  # name -> its images (characters first, then extras)
    words: dict[str, str]  # name -> "image 2" / "images 1 and 2", for {name} in a prompt
    cast: tuple[str, ...]  # the names that are characters (scored for consistency)

    @classmethod
    def number(cls, refs: dict, cast: set, first: int) -> "Subjects":
        words, n = {}, first
        for name, group in refs.items():
            words[name] = image_words(list(range(n, n + len(group))))
            n += len(group)
        return cls(refs, words, tuple(name for name in refs if name in cast))

    @property
    def inputs(self) -> tuple[ImageRef, ...]:
        return tuple(ref for group in self.refs.values() for ref in group)

    def scoring(self, prompt: str) -> Scoring:
        """Consistency with every character's references, and with each one's on its own."""
        return Scoring(text=prompt, references=tuple(r for n in self.cast for r in self.refs[n]),
                       characters={n: [r.key for r in self.refs[n]] for n in self.cast})


def placeholders(names) -> dict[str, str]:
    """Placeholders (a sweep's, or image names) standing for themselves: a job is named after
    its template, not after one cell's values."""
    names = names if isinstance(names, dict) else placeholder_axes(names)
    return {name: name for name in names}


def job_counts(recipe: Recipe) -> list[tuple[Loc, int]]:
    """How many jobs each entry of the recipe makes, counted without building any."""
    counts = [(("characters", name), 1) for name, c in recipe.characters.items() if c.portrait]
    for i, g in enumerate(recipe.prompts):
        combos = len(g.templates()) * math.prod(map(len, (g.matrix or {}).values()))
        counts.append((("prompts", i), combos * variation_count(recipe, [g], g.sweep)))
    for i, s in enumerate(recipe.series):
        counts.append((("series", i), sum(
            variation_count(recipe, [s] + ([shot] if isinstance(shot, Shot) else []), s.sweep)
            for shot in s.shots)))
    for i, c in enumerate(recipe.edits):
        inputs = sum(map(len, c.inputs))
        counts.append((("edits", i), inputs * sum(
            variation_count(recipe, [c] + ([item] if isinstance(item, Instruction) else []), c.sweep)
            for item in c.instructions)))
    for i, g in enumerate(recipe.bilingual):
        counts.append((("bilingual", i),
                       2 * sum(variation_count(recipe, [g, pair], g.sweep) for pair in g.pairs)))
    return counts


def check_job_count(recipe: Recipe) -> None:
    """Refuse a recipe over max_jobs before building a single job: built first, 1,700 groups
    just under the limit each would fill the memory before the total could be checked."""
    counts = job_counts(recipe)
    total = sum(count for _, count in counts)
    if total > recipe.max_jobs:
        at, most = max(counts, key=lambda entry: entry[1])
        raise RecipeError([f"{recipe.where(at)}: the recipe makes {total:,} jobs (this entry "
                           f"{most:,}); the limit is {recipe.max_jobs:,} (max_jobs): shrink the "
                           "sweep or matrix, split the recipe, or raise max_jobs"])
