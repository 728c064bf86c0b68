"""The toy judge: does an image show its caption, did an edit do what it asked, is the character
the one in the references? Decided from pixels alone (see perceive.py for how they are read).

Every verdict carries one boolean per attribute, so evaluations can report where a model fails
(e.g. "colour right, shape wrong") and not just a pass rate. An attribute the caption leaves
open is not checked.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import permutations

from PIL import Image

from .captions import (EN_POSITION_WORDS, ZH_COLOURS, ZH_POSITION_WORDS, ObjectSpec, SceneSpec,
                       is_chinese, parse, spec_of)
from .characters import CHARACTER_POSITIONS, Character, read_identity
from .edits import EditError, apply_edit, parse_instruction
from .perceive import Blob, Perception, perceive
from .scenes import COLOURS, Scene, ShapeObject

ATTRIBUTES = ("background", "count", "colour", "shape", "position", "size")
IDENTITY_PARTS = ("body", "pattern", "pattern_colour", "accessory", "accessory_colour")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checks: dict[str, bool]  # attribute -> right (only the attributes that were checked)
    notes: tuple[str, ...] = ()  # what was wrong, for people

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(name for name, right in self.checks.items() if not right)


def _verdict(checks: dict[str, bool], notes=()) -> Verdict:
    return Verdict(all(checks.values()), checks, tuple(notes))


# -- captions ----------------------------------------------------------------------------------

def _agreement(spec: ObjectSpec, blob: Blob) -> dict[str, bool]:
    stated = {"colour": spec.colour, "shape": spec.shape, "position": spec.position, "size": spec.size}
    seen = {"colour": blob.colour, "shape": blob.shape, "position": blob.position, "size": blob.size}
    return {name: value == seen[name] for name, value in stated.items() if value is not None}


def _best_assignment(objects: tuple[ObjectSpec, ...], blobs: tuple[Blob, ...]) -> list[dict[str, bool]]:
    """Per stated object, its agreement with the blob that suits it best overall (objects are
    matched one-to-one; at most a handful, so every permutation is tried)."""
    slots = list(blobs) + [None] * max(0, len(objects) - len(blobs))
    best, best_score = None, -1
    for chosen in permutations(slots, len(objects)):
        rows = [_agreement(o, b) if b is not None else {k: False for k in _agreement(o, _NOWHERE)}
                for o, b in zip(objects, chosen)]
        score = sum(sum(row.values()) for row in rows)
        if score > best_score:
            best, best_score = rows, score
    return best or []


_NOWHERE = Blob("", 0, (0, 0, 0, 0), 0.0, 0.0, 1.0, 1)  # stands in for a missing object


def judge_spec(image: Image.Image | Perception, spec: SceneSpec) -> Verdict:
    """Whether the image shows everything `spec` states, and nothing more (object count)."""
    seen = image if isinstance(image, Perception) else perceive(image)
    checks = {"background": seen.background == spec.background,
              "count": len(seen.blobs) == len(spec.objects)}
    notes = [] if checks["background"] else [f"background is {seen.background}, not {spec.background}"]
    if not checks["count"]:
        notes.append(f"{len(seen.blobs)} objects seen, {len(spec.objects)} stated")
    for row in _best_assignment(spec.objects, seen.blobs):
        for name, right in row.items():
            checks[name] = checks.get(name, True) and right
    notes += [f"{name} wrong" for name in ATTRIBUTES[2:] if checks.get(name) is False]
    return _verdict(checks, notes)


def judge_caption(image: Image.Image, caption: str) -> Verdict:
    """Whether the image shows the caption (EN or ZH): every attribute it states."""
    return judge_spec(image, parse(caption))


def judge_scene(image: Image.Image, scene: Scene) -> Verdict:
    """Whether the image shows exactly this scene (every attribute of every object)."""
    return judge_spec(image, spec_of(scene, "full"))


def scene_from_pixels(image: Image.Image | Perception) -> Scene:
    """The scene an image shows, as read from its pixels."""
    seen = image if isinstance(image, Perception) else perceive(image)
    objects = [ShapeObject(b.colour, b.shape, b.position, b.size) for b in seen.blobs]
    return Scene(seen.background, tuple(o for o in objects if o.colour != seen.background))


# -- edits -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EditVerdict(Verdict):
    did_edit: bool = False  # the asked change is visible
    kept_rest: bool = False  # everything else is as in the source
    expected: Scene | None = field(default=None, compare=False)


def judge_edit(source: Image.Image | Scene, instruction: str, output: Image.Image) -> EditVerdict:
    """Whether `output` is `source` with the instruction carried out and nothing else changed.

    The source may be given as an image (read from its pixels) or as its known scene.
    """
    before = source if isinstance(source, Scene) else scene_from_pixels(source)
    try:
        spec = parse_instruction(instruction)
        expected = apply_edit(before, spec)
    except EditError as exc:
        return EditVerdict(False, {"instruction": False}, (str(exc),))
    full = judge_scene(output, expected)
    asked = _asked_attributes(spec.kind)
    did = all(right for name, right in full.checks.items() if name in asked)
    kept = all(right for name, right in full.checks.items() if name not in asked)
    return EditVerdict(full.ok, full.checks, full.notes, did_edit=did, kept_rest=kept, expected=expected)


def _asked_attributes(kind: str) -> set[str]:
    """The attributes an edit of `kind` changes; with one verdict per attribute over all
    objects, an edited attribute is shared by the untouched objects (a limitation we accept:
    `ok` still checks every object)."""
    return {"recolour": {"colour"}, "background": {"background"}, "move": {"position"},
            "add": {"count"}, "remove": {"count"}}[kind]


# -- characters --------------------------------------------------------------------------------

def identity_agreement(a: Character | None, b: Character | None) -> float:
    """Share of the five identity parts two readings agree on (0 when either is missing)."""
    if a is None or b is None:
        return 0.0
    return sum(getattr(a, part) == getattr(b, part) for part in IDENTITY_PARTS) / len(IDENTITY_PARTS)


def reference_identity(references: list[Image.Image]) -> Character | None:
    """The identity most references agree on (references show the character in the centre)."""
    readings = [read_identity(image) for image in references]
    readings = [r for r in readings if r is not None]
    return max(readings, key=readings.count) if readings else None


def judge_character(references: list[Image.Image], image: Image.Image, position: str = "centre") -> Verdict:
    """Whether the character at `position` in `image` is the one the references show."""
    wanted = reference_identity(references)
    seen = read_identity(image, CHARACTER_POSITIONS[position])
    if wanted is None or seen is None:
        return Verdict(False, {"found": False}, ("no character found" if seen is None else "no reference character",))
    checks = {part: getattr(seen, part) == getattr(wanted, part) for part in IDENTITY_PARTS}
    return _verdict(checks, [f"{p}: {getattr(seen, p)} instead of {getattr(wanted, p)}" for p, ok in checks.items() if not ok])


def judge_incontext(references: list[Image.Image], image: Image.Image, background: str,
                    positions: list[str]) -> Verdict:
    """An in-context output: the background, and the character of reference i at positions[i]."""
    checks = {"background": perceive(image).background == background}
    notes = [] if checks["background"] else ["background wrong"]
    for index, (reference, position) in enumerate(zip(references, positions), start=1):
        verdict = judge_character([reference], image, position)
        checks[f"character {index}"] = verdict.ok
        notes += [f"character {index}: {note}" for note in verdict.notes]
    return _verdict(checks, notes)


# -- any job ------------------------------------------------------------------------------------

_EN_PLACEMENT = re.compile(r"image\s+(\d+)\s+(?:on|in|at)\s+the\s+(\w+)")
_ZH_PLACEMENT = re.compile(r"图(\d+)中的角色放在(" + "|".join(ZH_POSITION_WORDS) + ")")
_EN_BACKDROP = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+background")
_ZH_BACKDROP = re.compile(r"背景是(" + "|".join(ZH_COLOURS.values()) + ")")


def parse_placement(instruction: str) -> tuple[str | None, list[str]]:
    """(background, position of image 1's character, of image 2's, ...) an in-context
    instruction asks for, as characters.py writes them in English or Chinese."""
    if is_chinese(instruction):
        background = _ZH_BACKDROP.search(instruction)
        colour = {zh: en for en, zh in ZH_COLOURS.items()}.get(background.group(1)) if background else None
        placed = {int(i): ZH_POSITION_WORDS[word] for i, word in _ZH_PLACEMENT.findall(instruction)}
    else:
        background = _EN_BACKDROP.search(instruction.lower())
        colour = background.group(1) if background else None
        placed = {int(i): EN_POSITION_WORDS.get(word, word) for i, word in _EN_PLACEMENT.findall(instruction.lower())}
    return colour, [placed[i] for i in sorted(placed)]


def judge_job(kind: str, prompt: str, inputs: list[Image.Image], image: Image.Image) -> Verdict:
    """Judge an output of the engine from what its job asked: a caption (t2i), an edit of
    inputs[0], or the characters of the inputs placed as the instruction says (incontext)."""
    if kind == "t2i":
        return judge_caption(image, prompt)
    if kind == "edit":
        return judge_edit(inputs[0], prompt, image)
    background, positions = parse_placement(prompt)
    if background is None or len(positions) != len(inputs) or not set(positions) <= set(CHARACTER_POSITIONS):
        return Verdict(False, {"instruction": False}, (f"not a toy in-context instruction: {prompt!r}",))
    return judge_incontext(inputs, image, background, positions)
