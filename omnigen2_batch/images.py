"""Reading input images: one loader for the whole engine, a content hash, and input checks.

Every image the engine reads (recipe inputs, character references, edit sources, anchors on
disk) goes through `load_rgb`, so orientation, palettes, 16-bit and alpha are handled the same
way everywhere; an input the model will encode goes through `load_for_model`, which shrinks it
as it is read so no full-size decode is kept. Only Pillow is imported here: the CLI's
`validate` and `plan` use this module.
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

# OmniGen2's guidance: inputs "preferably with a resolution greater than 512x512" (its README).
MIN_SHORT_SIDE = 512
MAX_ASPECT = 4.0  # beyond 1:4 the pipeline's resize leaves one side with very few tokens
MAX_INPUTS = 3  # more reference images per job than this degrade in-context generation
EXIF_ORIENTATION = 0x0112
# How the pipeline sizes an input (model/pipeline.py fit_size, max_pixels default): at most
# 1024*1024 pixels and the job's max_input_side, floored to multiples of 16 (VAE x patch). A side
# that floors to 0 has no tokens: the job would fail, so such an input is refused up front.
MODEL_MAX_PIXELS = 1024 * 1024
MODEL_MULTIPLE = 16
# Pillow warns above MAX_IMAGE_PIXELS (~89 MP) and refuses above twice that; we accept up to
# its refusal (large scans are real inputs, load_for_model shrinks them) without the warning.
MAX_INPUT_PIXELS = 2 * Image.MAX_IMAGE_PIXELS


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class Issue:
    level: str  # "error" | "warning"
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.path}: {self.message}"


@contextmanager
def open_image(path: str | Path):
    """Image.open with every failure an ImageError naming the file (decoding included, so
    use it around load() too) and a pixel limit checked from the header, before decoding."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_INPUT_PIXELS:
                    raise Image.DecompressionBombError(f"{image.width}x{image.height}")
                yield image
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path}: too many pixels to be a sensible input ({err}; the limit is "
                         f"{MAX_INPUT_PIXELS:,} pixels): use a smaller image") from err
    except FileNotFoundError as err:
        raise ImageError(f"{path}: no such file") from err
    except Image.UnidentifiedImageError as err:
        raise ImageError(f"{path}: not an image Pillow can read") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated") or
        # SyntaxError (broken PNG chunks).
        raise ImageError(f"{path}: unreadable or truncated image ({err})") from err


def load_rgb(path: str | Path) -> Image.Image:
    """The image at `path` as 8-bit RGB, upright (EXIF), transparency composited on white."""
    with open_image(path) as image:
        image.load()  # decode now: a truncated file fails here, not later mid-run
        return to_rgb(ImageOps.exif_transpose(image))


def model_input_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(width, height) the pipeline resizes an input of `size` to (its fit_size, repeated here
    without torch): never enlarged, at most MODEL_MAX_PIXELS and `max_side`, multiples of 16."""
    width, height = size
    ratio = min((MODEL_MAX_PIXELS / (width * height)) ** 0.5, max_side / max(width, height), 1.0)
    return (int(width * ratio) // MODEL_MULTIPLE * MODEL_MULTIPLE,
            int(height * ratio) // MODEL_MULTIPLE * MODEL_MULTIPLE)


def load_for_model(path: str | Path, max_side: int) -> Image.Image:
    """The image at `path` as load_rgb gives it, already resized (LANCZOS) to what the model
    encodes for a job with this max_input_side, so the pipeline's own resize is a no-op.

    The full-size pixels are never kept: a JPEG is decoded at a reduced scale (Image.draft, never
    below the target), other formats are decoded once and shrunk at once."""
    with open_image(path) as image:
        target = model_input_size(upright_size(image), max_side)
        if 0 in target:
            raise ImageError(f"{path}: {too_small(upright_size(image), max_side)}")
        rotated = upright_size(image) != image.size
        image.draft("RGB", target[::-1] if rotated else target)  # only JPEG acts on this
        image.load()
        return to_rgb(ImageOps.exif_transpose(image)).resize(target, Image.LANCZOS)


def too_small(size: tuple[int, int], max_side: int) -> str:
    width, height = size
    fitted = model_input_size(size, max_side)
    return (f"too small for the model: the image is {width}x{height}, which the model resizes to "
            f"{fitted[0]}x{fitted[1]} (max_input_side {max_side}), and each side needs at least "
            f"{MODEL_MULTIPLE} px; use a larger image or one closer to square")


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
    with open_image(path) as image:
        return upright_size(image)


def upright_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    if image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):  # rotated by 90 degrees
        return height, width
    return width, height


def content_hash(path: str | Path) -> str:
    """"sha256:<hex>" of the file's bytes: the identity of an input image."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def inspect_input(path: str | Path, max_side: int = 1024) -> list[Issue]:
    """Problems with one input image for jobs with this max_input_side: errors make it unusable
    (unreadable, truncated, a bomb, too small for the model), warnings make it a poor input.
    Decodes it as a run will (load_for_model), so what passes here loads there."""
    try:
        load_for_model(path, max_side)  # decodes the whole file: truncation shows here
        width, height = image_size(path)
    except ImageError as err:
        return [Issue("error", str(path), str(err).removeprefix(f"{path}: "))]
    issues = []
    wanted = min(MIN_SHORT_SIDE, max_side)  # a job that shrinks its inputs wants no more
    if min(width, height) < wanted:
        issues.append(Issue("warning", str(path), (
            f"short side is {min(width, height)} px (image is {width}x{height}); OmniGen2 works "
            f"best with inputs of at least {wanted} px: use a larger image")))
    if max(width, height) > MAX_ASPECT * min(width, height):
        issues.append(Issue("warning", str(path), (
            f"aspect ratio {width}x{height} is beyond 1:{MAX_ASPECT:g}; crop it closer to "
            "the subject")))
    return issues


# ---- finding inputs: bounded globs ----------------------------------------------------------

MAX_GLOB_DIRS = 2_000  # folders one pattern may search
MAX_GLOB_ENTRIES = 200_000  # directory entries one pattern may look at
MAX_GLOB_MATCHES = 10_000  # as many files as a plan may have jobs


def find_inputs(pattern: str, folder: Path, roots: tuple[Path, ...]) -> list[Path]:
    """The files a glob pattern ("*.png", "shots/**/*.jpg") matches, relative to `folder`,
    sorted; ImageError when it cannot be answered safely.

    Unlike glob.glob it never searches outside `roots` (a folder a symlink leads out to is
    skipped; one that loops is searched once), and it stops with an error past MAX_GLOB_DIRS
    folders, MAX_GLOB_ENTRIES entries or MAX_GLOB_MATCHES files instead of hanging on "/**" or
    a symlink loop. Hidden names match only a pattern part starting with "." (as in glob)."""
    whole = Path(os.path.expanduser(pattern))
    parts = (whole if whole.is_absolute() else folder / whole).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base, rest = Path(*parts[:fixed]), parts[fixed:] + (("*",) if parts[-1] == "**" else ())
    if not inside(base.resolve(), roots):
        raise ImageError(f"the pattern {pattern!r} matches files outside the recipe's folder "
                         f"{folder} (it would search {base.resolve()}); move them there or pass "
                         "--allow-path DIR")
    return sorted(GlobWalk(pattern, roots).run(base, rest), key=str)


def inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


class GlobWalk:
    def __init__(self, pattern: str, roots: tuple[Path, ...]):
        self.pattern, self.roots = pattern, roots
        self.found: set[Path] = set()
        self.seen: set[tuple[Path, int]] = set()  # (real folder, parts left): loops end here
        self.entries = 0

    def run(self, base: Path, parts: tuple[str, ...]) -> set[Path]:
        todo = [(base, parts)]
        while todo:
            folder, parts = todo.pop()
            real = folder.resolve()
            if not inside(real, self.roots) or (real, len(parts)) in self.seen:
                continue
            self.seen.add((real, len(parts)))
            self.limit(len(self.seen), MAX_GLOB_DIRS, "folders")
            todo += self.step(folder, parts)
        return self.found

    def step(self, folder: Path, parts: tuple[str, ...]) -> list:
        """Match one pattern part in `folder`: files found are kept, folders to search returned."""
        part, rest = parts[0], parts[1:]
        if part == "**":  # zero folders deep, or one more
            return [(folder, rest)] + [(Path(e.path), parts) for e in self.scan(folder, "*")
                                       if is_dir(e)]
        if not glob.has_magic(part):
            entries = [Path(folder, part)]
        else:
            entries = [Path(e.path) for e in self.scan(folder, part)]
        if rest:
            return [(path, rest) for path in entries if path.is_dir()]
        self.found.update(path for path in entries if path.is_file())
        self.limit(len(self.found), MAX_GLOB_MATCHES, "files")
        return []

    def scan(self, folder: Path, part: str) -> list[os.DirEntry]:
        try:
            with os.scandir(folder) as listing:
                entries = []
                for entry in listing:
                    self.entries += 1
                    self.limit(self.entries, MAX_GLOB_ENTRIES, "folder entries")
                    hidden = entry.name.startswith(".") and not part.startswith(".")
                    if not hidden and fnmatch.fnmatchcase(entry.name, part):
                        entries.append(entry)
                return entries
        except OSError:  # unreadable folder: glob skips it too
            return []

    def limit(self, count: int, most: int, what: str) -> None:
        if count > most:
            raise ImageError(f"the pattern {self.pattern!r} reaches more than {most:,} {what}; "
                             "narrow it (name the subfolder instead of using **)")


def is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
