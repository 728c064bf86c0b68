"""Reading a toy image from pixels: palette labels, connected components, shape descriptors.

A tiny generative model draws blurred, noisy, slightly off colours, so nothing here compares
pixels exactly. Pixels snap to the nearest palette colour (or to "unknown" when far from all),
a 3x3 majority vote removes speckle, objects are connected components with a solid core (thin
rings of blended colour at edges have none), and shapes are told apart by how they fill their
bounding box, which blur barely changes: a square fills its corners, a circle does not, and an
apex-up triangle is far heavier at the bottom than at the top.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scenes import COLOURS, POSITIONS, SIZES

NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[name] for name in NAMES], dtype=np.float32)
UNKNOWN = -1
# A pixel further than this (RGB distance) from every palette colour is a blend, not a colour.
# Palette colours are >= 150 apart, so even strong noise keeps true pixels well inside.
MAX_COLOUR_DISTANCE = 110.0
MIN_AREA_FRACTION = 0.012  # smallest object, of the image area (a small triangle is ~0.04)


def labels_of(image: Image.Image) -> np.ndarray:
    """[H, W] palette index per pixel (UNKNOWN for blends), cleaned by a 3x3 majority vote."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    distances = np.linalg.norm(pixels[:, :, None, :] - PALETTE[None, None], axis=-1)
    labels = distances.argmin(axis=-1)
    labels[distances.min(axis=-1) > MAX_COLOUR_DISTANCE] = UNKNOWN
    return majority_filter(labels)


def majority_filter(labels: np.ndarray) -> np.ndarray:
    """Each pixel takes the most common label of its 3x3 neighbourhood (its own on ties)."""
    padded = np.pad(labels, 1, mode="edge")
    h, w = labels.shape
    shifts = [padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]
    counts = np.stack([sum((s == k).astype(np.int8) for s in shifts) for k in range(len(NAMES))])
    best = counts.argmax(axis=0)
    own = np.where(labels >= 0, np.take_along_axis(counts, np.maximum(labels, 0)[None], 0)[0], 0)
    keep_own = (labels >= 0) & (own >= counts.max(axis=0))
    return np.where(keep_own, labels, np.where(counts.max(axis=0) >= 5, best, labels))


def background_of(labels: np.ndarray) -> int:
    """The most common known label on the image border (objects rarely touch it)."""
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    known = border[border >= 0]
    if known.size == 0:
        known = labels[labels >= 0]
    return int(np.bincount(known, minlength=len(NAMES)).argmax()) if known.size else 0


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as boolean masks. Labels spread by repeated
    min-of-neighbours in numpy, which for blob-sized shapes converges in a few dozen passes."""
    h, w = mask.shape
    big = h * w + 1
    ids = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        padded = np.pad(ids, 1, constant_values=big)
        spread = np.minimum.reduce([ids, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        spread = np.where(mask, spread, big)
        if np.array_equal(spread, ids):
            break
        ids = spread
    return [ids == value for value in np.unique(ids[mask])]


def eroded(mask: np.ndarray) -> np.ndarray:
    """Pixels whose whole 3x3 neighbourhood is in the mask."""
    padded = np.pad(mask, 1, constant_values=False)
    h, w = mask.shape
    return np.logical_and.reduce([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])


@dataclass(frozen=True)
class Blob:
    """One perceived object: its colour and the measurements its attributes come from."""

    colour: str
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)
    fill: float  # area / box area: square 1, circle 0.79, triangle 0.5
    corners: float  # fill of the four corner cells of the box: square ~1, circle ~0.2
    top_heaviness: float  # fill of the top half / fill of the bottom half: triangle ~0.33
    image_size: int

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1 + 1) / 2 / self.image_size, (y0 + y1 + 1) / 2 / self.image_size

    @property
    def half_extent(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(x1 - x0 + 1, y1 - y0 + 1) / 2 / self.image_size

    @property
    def shape(self) -> str:
        # Thresholds sit midway between the ranges measured on rendered shapes under blur,
        # noise and a 4x down-up resize (tests/test_toy_world.py): triangle top/bottom <= 0.66,
        # circle and square >= 0.82; circle corners <= 0.28, square corners >= 0.44.
        if self.top_heaviness < 0.74:
            return "triangle"
        return "square" if self.corners > 0.36 else "circle"

    @property
    def position(self) -> str:
        cx, cy = self.centre
        return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)

    @property
    def size(self) -> str:
        return min(SIZES, key=lambda s: abs(SIZES[s] - self.half_extent))


def measure(mask: np.ndarray, colour: str) -> Blob:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    box = mask[y0:y1 + 1, x0:x1 + 1].astype(np.float32)
    h, w = box.shape
    ch, cw = max(1, round(h * 0.2)), max(1, round(w * 0.2))
    corner_cells = [box[:ch, :cw], box[:ch, -cw:], box[-ch:, :cw], box[-ch:, -cw:]]
    top, bottom = box[: h // 2].mean() if h > 1 else 1.0, box[(h + 1) // 2:].mean() if h > 1 else 1.0
    return Blob(colour=colour, area=int(mask.sum()), box=(int(x0), int(y0), int(x1), int(y1)),
                fill=float(box.mean()), corners=float(np.mean([c.mean() for c in corner_cells])),
                top_heaviness=float(top / max(bottom, 1e-6)), image_size=mask.shape[0])


@dataclass(frozen=True)
class Perception:
    background: str
    blobs: tuple[Blob, ...]  # largest first
    labels: np.ndarray  # the cleaned palette-label map, for callers that read more


def perceive(image: Image.Image) -> Perception:
    """Background colour and the objects on it."""
    labels = labels_of(image)
    background = background_of(labels)
    min_area = MIN_AREA_FRACTION * labels.size
    blobs = []
    for index, name in enumerate(NAMES):
        if index == background:
            continue
        for part in components(labels == index):
            if part.sum() >= min_area and eroded(part).sum() >= 4:
                blobs.append(measure(part, name))
    blobs.sort(key=lambda b: -b.area)
    return Perception(NAMES[background], tuple(blobs), labels)
