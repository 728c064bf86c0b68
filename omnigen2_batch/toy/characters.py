"""Characters for in-context generation: sprites whose identity is composed at random.

An identity is body colour x pattern (+ its colour) x accessory (+ its colour): about two
thousand combinations, drawn fresh per example, so a model cannot memorise characters and has
to copy them from the reference images. A sprite fills a square box: the accessory in the top
30 %, the body (full width) below it, the pattern inside the body. Every part is a large block,
so it survives the blur of a 64 px generator, and `read_identity` can recover each part by
comparing the pixels with each candidate part (analysis by synthesis).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .captions import ZH_COLOURS
from .perceive import NAMES, UNKNOWN, background_of, labels_of
from .scenes import COLOURS

PATTERNS = ("plain", "half", "band", "stripes")
ACCESSORIES = ("none", "hat", "ears")
PATTERN_ZH = {"plain": "纯色", "half": "半边", "band": "腰带", "stripes": "条纹"}
ACCESSORY_ZH = {"none": "无", "hat": "帽子", "ears": "耳朵"}
HEAD = 0.3  # share of the box height above the body, where the accessory sits
SPRITE_HALF = 0.2  # half the box side, as a fraction of the image side
CHARACTER_POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "centre": (0.5, 0.5)}
GRID = 20  # cells per box side when reading a sprite


@dataclass(frozen=True)
class Character:
    body: str
    pattern: str = "plain"
    pattern_colour: str | None = None  # None for "plain"
    accessory: str = "none"
    accessory_colour: str | None = None  # None for "none"

    @property
    def colours(self) -> set[str]:
        return {c for c in (self.body, self.pattern_colour, self.accessory_colour) if c}

    def describe(self) -> str:
        parts = [f"{self.body} body"]
        if self.pattern != "plain":
            parts.append(f"{self.pattern_colour} {self.pattern}")
        if self.accessory != "none":
            parts.append(f"{self.accessory_colour} {self.accessory}")
        return ", ".join(parts)


def random_character(rng: random.Random) -> Character:
    body = rng.choice(NAMES)
    pattern = rng.choice(PATTERNS)
    accessory = rng.choice(ACCESSORIES)
    return Character(
        body=body, pattern=pattern,
        pattern_colour=None if pattern == "plain" else rng.choice([c for c in NAMES if c != body]),
        accessory=accessory,
        accessory_colour=None if accessory == "none" else rng.choice(NAMES))


# -- geometry ----------------------------------------------------------------------------------

def part_masks(u: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """Masks of every part at box coordinates (u, v) in [0, 1) (u right, v down)."""
    in_box = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    body = in_box & (v >= HEAD)
    w = (v - HEAD) / (1 - HEAD)  # depth within the body
    return {
        "body": body,
        "plain": np.zeros_like(body),
        "half": body & (u >= 0.5),
        "band": body & (w >= 0.35) & (w < 0.7),
        "stripes": body & ((np.floor(u * 5) % 2) == 1),
        "none": np.zeros_like(body),
        "hat": in_box & (v < HEAD) & (u >= 0.25) & (u < 0.75),
        "ears": in_box & (v < HEAD) & (v >= 0.05) & ((u < 0.3) | (u >= 0.7)),
    }


def _paint(canvas: np.ndarray, character: Character, centre: tuple[float, float], half: float) -> None:
    size = canvas.shape[0]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = (xs - (centre[0] - half) * size) / (2 * half * size)
    v = (ys - (centre[1] - half) * size) / (2 * half * size)
    masks = part_masks(u, v)
    canvas[masks["body"]] = COLOURS[character.body]
    if character.pattern != "plain":
        canvas[masks[character.pattern]] = COLOURS[character.pattern_colour]
    if character.accessory != "none":
        canvas[masks[character.accessory]] = COLOURS[character.accessory_colour]


@dataclass(frozen=True)
class CharacterScene:
    """Characters at named positions on a flat background."""

    background: str
    placed: tuple[tuple[Character, str], ...]  # (character, position)

    def __post_init__(self):
        for character, position in self.placed:
            if character.colours & {self.background}:
                raise ValueError(f"background {self.background!r} is one of the character's colours")
            if position not in CHARACTER_POSITIONS:
                raise ValueError(f"position {position!r}: expected one of {list(CHARACTER_POSITIONS)}")


def render_characters(scene: CharacterScene, size: int = 64) -> Image.Image:
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = COLOURS[scene.background]
    for character, position in scene.placed:
        _paint(canvas, character, CHARACTER_POSITIONS[position], SPRITE_HALF)
    return Image.fromarray(canvas)


def reference_image(character: Character, rng: random.Random, size: int = 64) -> Image.Image:
    """The character alone in the centre, on a random background that none of its parts use."""
    background = rng.choice([c for c in NAMES if c not in character.colours])
    return render_characters(CharacterScene(background, ((character, "centre"),)), size)


# -- in-context tasks --------------------------------------------------------------------------

@dataclass(frozen=True)
class InContextTask:
    references: tuple[Image.Image, ...]  # image 1 (and image 2)
    target: CharacterScene
    instruction_en: str
    instruction_zh: str

    def instruction(self, lang: str) -> str:
        return self.instruction_zh if lang == "zh" else self.instruction_en


def _instructions(scene: CharacterScene) -> tuple[str, str]:
    bg, bg_zh = scene.background, ZH_COLOURS[scene.background]
    where = {"left": ("on the left", "左边"), "right": ("on the right", "右边"), "centre": ("in the centre", "中间")}
    en_parts = [f"the character from image {i + 1} {where[pos][0]}" for i, (_, pos) in enumerate(scene.placed)]
    zh_parts = [f"图{i + 1}中的角色放在{where[pos][1]}" for i, (_, pos) in enumerate(scene.placed)]
    return (f"place {' and '.join(en_parts)} of a {bg} background",
            f"把{'，'.join(zh_parts)}，背景是{bg_zh}")


def make_incontext_task(rng: random.Random, subjects: int = 1, size: int = 64) -> InContextTask:
    """One or two fresh characters, their reference images and a new scene holding them."""
    characters = [random_character(rng) for _ in range(subjects)]
    used = set().union(*(c.colours for c in characters))
    free = [c for c in NAMES if c not in used]
    if not free:  # every colour taken: redraw (rare with two characters)
        return make_incontext_task(rng, subjects, size)
    positions = [rng.choice(list(CHARACTER_POSITIONS))] if subjects == 1 else rng.sample(["left", "right"], 2)
    scene = CharacterScene(rng.choice(free), tuple(zip(characters, positions)))
    references = tuple(reference_image(c, rng, size) for c in characters)
    return InContextTask(references, scene, *_instructions(scene))


# -- reading from pixels -----------------------------------------------------------------------

def sprite_grid(labels: np.ndarray, background: int, near: tuple[float, float]) -> np.ndarray | None:
    """GRID x GRID palette labels of the sprite nearest `near` (fractions), re-framed on its
    own box: left/right/bottom from its pixels, top = bottom - width (the accessory may be
    absent, so its top edge is not the box's). None when nothing is there."""
    size = labels.shape[0]
    reach = (SPRITE_HALF + 0.02) * size  # a neighbour's box starts 0.04 away: stay clear of it
    cx, cy = near[0] * size, near[1] * size
    ys, xs = np.mgrid[0:size, 0:size]
    window = (np.abs(xs + 0.5 - cx) <= reach) & (np.abs(ys + 0.5 - cy) <= reach)
    foreground = window & (labels != background) & (labels != UNKNOWN)
    if foreground.sum() < 0.02 * labels.size:
        return None
    fy, fx = np.nonzero(foreground)
    x0, x1, y1 = np.percentile(fx, 1), np.percentile(fx, 99) + 1, np.percentile(fy, 99) + 1
    side = max(x1 - x0, 4.0)
    steps = (np.arange(GRID) + 0.5) / GRID
    rows = np.clip((y1 - side + steps * side).astype(int), 0, size - 1)
    cols = np.clip((x0 + steps * side).astype(int), 0, size - 1)
    return labels[np.ix_(rows, cols)]


def read_identity(image: Image.Image, near: tuple[float, float] = (0.5, 0.5)) -> Character | None:
    """The identity of the sprite nearest `near`, each part the candidate that agrees with the
    most cells; None when no sprite is found."""
    labels = labels_of(image)
    background = background_of(labels)
    grid = sprite_grid(labels, background, near)
    if grid is None:
        return None
    steps = (np.arange(GRID) + 0.5) / GRID
    masks = part_masks(*np.meshgrid(steps, steps))
    # Body and pattern are read together: a "half" body is 50/50 in colour, and only the pair
    # (body colour, pattern) says which half is the body.
    candidates = []
    for body in range(len(NAMES)):
        if body != background:
            (pattern, pattern_colour), score = _best_part(grid, masks, PATTERNS, masks["body"], body, exclude=body)
            candidates.append((score, -body, NAMES[body], pattern, pattern_colour))
    _, _, body, pattern, pattern_colour = max(candidates)
    (accessory, accessory_colour), _ = _best_part(grid, masks, ACCESSORIES, ~masks["body"], background,
                                                  exclude=background)
    return Character(body, pattern, pattern_colour, accessory, accessory_colour)


def _best_part(grid, masks, options, region, base: int, exclude: int) -> tuple[tuple[str, str | None], int]:
    """((option, colour name), cells explained) for the option that best explains `region` of
    the grid, where cells outside the option's mask must show `base`. Ties go to the simpler
    option (listed first)."""
    best, best_score = (options[0], None), np.sum(grid[region] == base)
    for option in options[1:]:
        inside = masks[option] & region
        for colour in range(len(NAMES)):
            if colour == exclude:
                continue
            score = np.sum(grid[inside] == colour) + np.sum(grid[region & ~inside] == base)
            if score > best_score:
                best, best_score = (option, NAMES[colour]), score
    return best, int(best_score)


def same_identity(a: Character | None, b: Character | None) -> bool:
    return a is not None and a == b
