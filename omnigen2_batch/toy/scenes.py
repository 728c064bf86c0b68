"""Toy scenes: a flat background with flat shapes, a deterministic renderer and a seeded sampler.

A scene is a small frozen description (background colour + objects); `render` turns it into
pixels the same way every time, so every image in the toy world has an exact ground truth. The
vocabulary is deliberately small (6 colours, 3 shapes, 5 positions, 2 sizes): a tiny model can
learn it on a CPU, and a judge can read every attribute back from pixels.

Sizes and positions are fractions of the image side, so the same scene renders at any size.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

# Saturated, far-apart RGB values: the judge snaps pixels to the nearest of these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Centre of an object as (x, y) fractions of the side.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72),
    "centre": (0.5, 0.5),
}
# Half-extent (circle radius, square half-side, triangle half-base) as a fraction of the side:
# 9 and 15 px at 64 px, far enough apart that a blurred "large" never reads as "small".
SIZES: dict[str, float] = {"small": 0.14, "large": 0.24}
DEFAULT_SIZE = 64

# colour x shape x background combinations never sampled for training: the evaluation split.
# Every colour, shape and background still appears in training, only these pairings do not.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset({
    ("red", "triangle", "blue"), ("green", "circle", "white"), ("blue", "square", "yellow"),
    ("yellow", "circle", "black"), ("white", "triangle", "green"), ("black", "square", "red"),
    ("red", "square", "white"), ("green", "triangle", "black"), ("blue", "circle", "green"),
})
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    position: str = "centre"
    size: str = "large"

    def __post_init__(self):
        _check("colour", self.colour, COLOURS)
        _check("shape", self.shape, SHAPES)
        _check("position", self.position, POSITIONS)
        _check("size", self.size, SIZES)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...] = field(default_factory=tuple)

    def __post_init__(self):
        _check("background", self.background, COLOURS)
        object.__setattr__(self, "objects", tuple(self.objects))
        for obj in self.objects:
            if obj.colour == self.background:
                raise ValueError(f"object colour {obj.colour!r} equals the background: it would be invisible")

    def with_objects(self, objects) -> "Scene":
        return replace(self, objects=tuple(objects))

    @property
    def combos(self) -> set[tuple[str, str, str]]:
        """(colour, shape, background) of every object: what the held-out split is made of."""
        return {(obj.colour, obj.shape, self.background) for obj in self.objects}

    @property
    def is_held_out(self) -> bool:
        return bool(self.combos & HELD_OUT)


def _check(kind: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {list(allowed)}")


# -- rendering ---------------------------------------------------------------------------------

def object_box(obj: ShapeObject, size: int) -> tuple[float, float, float]:
    """(centre x, centre y, half extent) in pixels."""
    fx, fy = POSITIONS[obj.position]
    return fx * size, fy * size, SIZES[obj.size] * size


def shape_mask(shape: str, cx: float, cy: float, half: float, size: int) -> np.ndarray:
    """Boolean [size, size] mask of one shape, sampled at pixel centres (no anti-aliasing: the
    colours stay exactly on the palette, so ground truth is exact)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Apex-up isosceles triangle filling the square box: the half-width grows from 0 at the top
    # edge to `half` at the bottom edge.
    depth = (dy + half) / (2 * half)
    return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= half * depth)


def render(scene: Scene, size: int = DEFAULT_SIZE) -> Image.Image:
    """The scene as an RGB image; later objects are drawn over earlier ones."""
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = COLOURS[scene.background]
    for obj in scene.objects:
        canvas[shape_mask(obj.shape, *object_box(obj, size), size)] = COLOURS[obj.colour]
    return Image.fromarray(canvas)


def boxes_overlap(a: ShapeObject, b: ShapeObject, margin: float = 0.03) -> bool:
    """Whether two objects' boxes come closer than `margin` (a fraction of the side)."""
    ax, ay, ah = object_box(a, 1)
    bx, by, bh = object_box(b, 1)
    reach = ah + bh + margin
    return abs(ax - bx) < reach and abs(ay - by) < reach


# Where objects go when a caption does not say: one object large in the centre, two small side by
# side in the order named. A short caption ("a red circle on a blue background") then names one
# image instead of ten, as a person would expect, and a small model learns it far sooner.
DEFAULT_LAYOUTS: dict[int, tuple[tuple[str, str], ...]] = {
    1: (("centre", "large"),),
    2: (("left", "small"), ("right", "small")),
}


def default_layout(scene: Scene) -> Scene:
    """`scene` with its objects at the default places and sizes (unchanged beyond two objects)."""
    layout = DEFAULT_LAYOUTS.get(len(scene.objects))
    if layout is None:
        return scene
    return scene.with_objects(replace(obj, position=position, size=size)
                              for obj, (position, size) in zip(scene.objects, layout))


# -- sampling ----------------------------------------------------------------------------------

def in_split(scene: Scene, split: str) -> bool:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    return scene.is_held_out == (split == "eval")


def sample_object(rng: random.Random, background: str, taken: list[ShapeObject] = ()) -> ShapeObject | None:
    """A random object on `background` not overlapping `taken`, or None after a few tries."""
    for _ in range(30):
        obj = ShapeObject(
            colour=rng.choice([c for c in COLOURS if c != background]),
            shape=rng.choice(SHAPES),
            position=rng.choice(list(POSITIONS)),
            size=rng.choice(list(SIZES)),
        )
        if not any(boxes_overlap(obj, other) for other in taken):
            return obj
    return None


def sample_scene(rng: random.Random, split: str = "train", n_objects: int = 1) -> Scene:
    """A random scene of the split with `n_objects` non-overlapping objects (rejection sampling:
    the held-out combos are ~10 % of all, so a few draws suffice)."""
    for _ in range(1000):
        background = rng.choice(list(COLOURS))
        objects: list[ShapeObject] = []
        while len(objects) < n_objects:
            obj = sample_object(rng, background, objects)
            if obj is None:
                break
            objects.append(obj)
        scene = Scene(background, tuple(objects))
        if len(objects) == n_objects and in_split(scene, split):
            return scene
    raise RuntimeError(f"could not sample a {split} scene with {n_objects} objects")


def sample_scenes(seed: int, count: int, split: str = "train", max_objects: int = 1) -> list[Scene]:
    """`count` scenes from a private RNG seeded with `seed` (so callers' RNGs are untouched);
    the object count is uniform in 1..max_objects."""
    rng = random.Random(seed)
    return [sample_scene(rng, split, rng.randint(1, max_objects)) for _ in range(count)]
