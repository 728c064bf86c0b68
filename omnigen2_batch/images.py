"""Reading input images: one loader for the whole engine, a content hash, and input checks.

Every image the engine reads (recipe inputs, character references, edit sources, anchors on
disk) goes through `load_rgb`, so orientation, palettes, 16-bit and alpha are handled the same
way everywhere. Only Pillow is imported here: the CLI's `validate` and `plan` use this module.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

# OmniGen2's guidance: inputs "preferably with a resolution greater than 512x512" (its README).
MIN_SHORT_SIDE = 512
MAX_ASPECT = 4.0  # beyond 1:4 the pipeline's resize leaves one side with very few tokens
MAX_INPUTS = 3  # more reference images per job than this degrade in-context generation
EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class Issue:
    level: str  # "error" | "warning"
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.path}: {self.message}"


def load_rgb(path: str | Path) -> Image.Image:
    """The image at `path` as 8-bit RGB, upright (EXIF), transparency composited on white."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty (0 bytes)")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later mid-run
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path}: too many pixels to be a sensible input ({err})") from err
    except FileNotFoundError as err:
        raise ImageError(f"{path}: no such file") from err
    except Image.UnidentifiedImageError as err:
        raise ImageError(f"{path}: not an image Pillow can read") from err
    except (OSError, SyntaxError, ValueError) as err:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated") or
        # SyntaxError (broken PNG chunks).
        raise ImageError(f"{path}: unreadable or truncated image ({err})") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB without the usual surprises (clipped 16-bit, black alpha)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's direct convert clips 16-bit values at 255; scale to 8 bits instead.
        image = image.convert("I").point(lambda value: value * (1 / 257)).convert("L")
    elif image.mode == "F":
        image = image.point(lambda value: value * 255).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as load_rgb will return it, from the header only (EXIF rotation applied)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):  # rotated by 90 degrees
                width, height = height, width
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: unreadable image ({err})") from err
    return width, height


def content_hash(path: str | Path) -> str:
    """"sha256:<hex>" of the file's bytes: the identity of an input image."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def inspect_input(path: str | Path) -> list[Issue]:
    """Problems with one input image: errors make it unusable, warnings make it a poor input."""
    try:
        image = load_rgb(path)
    except ImageError as err:
        return [Issue("error", str(path), str(err).removeprefix(f"{path}: "))]
    issues = []
    width, height = image.size
    if min(width, height) < MIN_SHORT_SIDE:
        issues.append(Issue("warning", str(path), (
            f"short side is {min(width, height)} px (image is {width}x{height}); OmniGen2 works "
            f"best with inputs of at least {MIN_SHORT_SIDE} px: use a larger image")))
    if max(width, height) > MAX_ASPECT * min(width, height):
        issues.append(Issue("warning", str(path), (
            f"aspect ratio {width}x{height} is beyond 1:{MAX_ASPECT:g}; crop it closer to "
            "the subject")))
    return issues
