"""Edits of toy scenes: (source scene, EN/ZH instruction, target scene) triples, and a parser.

Five kinds: recolour an object, change the background, move an object, add one, remove one.
An instruction names its object as briefly as the scene allows ("the circle" when it is the only
circle, else "the red circle"), the way a person would. `parse_instruction` + `apply_edit` turn
an instruction and a source scene into the target, so the judge can check an edit from the
source image and the instruction alone.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from .captions import (EN_POSITION_WORDS, EN_POSITIONS, ZH_COLOURS, ZH_POSITION_WORDS, ZH_POSITIONS,
                       ZH_SHAPES, ZH_SIZES, is_chinese)
from .scenes import COLOURS, POSITIONS, SHAPES, SIZES, Scene, ShapeObject, boxes_overlap, in_split

KINDS = ("recolour", "background", "move", "add", "remove")


class EditError(ValueError):
    """An instruction that cannot be read, or that does not fit the scene."""


@dataclass(frozen=True)
class EditSpec:
    """What an instruction asks. `colour`/`shape` pick the object (None = not named); `value`
    is the new colour, position, or (for add) the new object."""

    kind: str
    colour: str | None = None
    shape: str | None = None
    value: str | ShapeObject | None = None


@dataclass(frozen=True)
class Edit:
    source: Scene
    target: Scene
    spec: EditSpec
    instruction_en: str
    instruction_zh: str

    def instruction(self, lang: str) -> str:
        return self.instruction_zh if lang == "zh" else self.instruction_en


# -- applying ----------------------------------------------------------------------------------

def find_object(scene: Scene, colour: str | None, shape: str | None) -> int:
    """Index of the one object matching the named colour/shape; EditError when none or several."""
    matches = [i for i, o in enumerate(scene.objects)
               if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]
    if len(matches) != 1:
        what = " ".join(w for w in (colour, shape) if w) or "object"
        raise EditError(f"the scene has {len(matches)} objects matching {what!r}; an edit needs exactly one")
    return matches[0]


def apply_edit(scene: Scene, spec: EditSpec) -> Scene:
    """The scene after the edit. Raises EditError when the edit does not fit (unknown object, a
    colour equal to the background, a move onto another object)."""
    objects = list(scene.objects)
    try:
        if spec.kind == "background":
            return replace(scene, background=spec.value)
        if spec.kind == "add":
            objects.append(spec.value)
        else:
            index = find_object(scene, spec.colour, spec.shape)
            if spec.kind == "remove":
                del objects[index]
            elif spec.kind == "recolour":
                objects[index] = replace(objects[index], colour=spec.value)
            elif spec.kind == "move":
                objects[index] = replace(objects[index], position=spec.value)
            else:
                raise EditError(f"unknown edit kind {spec.kind!r}; expected one of {KINDS}")
        target = scene.with_objects(objects)
    except ValueError as exc:  # Scene's own checks (an invisible object)
        raise EditError(str(exc)) from exc
    if any(boxes_overlap(a, b, margin=0.0) for i, a in enumerate(objects) for b in objects[i + 1:]):
        raise EditError("after the edit two objects would overlap")
    return target


# -- writing instructions ------------------------------------------------------------------------

def _reference(scene: Scene, obj: ShapeObject) -> tuple[str | None, str]:
    """The colour to name (None when the shape alone is unique) and the shape."""
    same_shape = sum(o.shape == obj.shape for o in scene.objects)
    return (None if same_shape == 1 else obj.colour), obj.shape


def _en_ref(colour, shape) -> str:
    return f"the {colour} {shape}" if colour else f"the {shape}"


def _zh_ref(colour, shape) -> str:
    return f"{ZH_COLOURS[colour]}{ZH_SHAPES[shape]}" if colour else ZH_SHAPES[shape]


def _en_position(position: str) -> str:
    return "the centre" if position == "centre" else f"the {position}"


def instructions(spec: EditSpec, rng: random.Random) -> tuple[str, str]:
    """(English, Chinese) instruction for the spec, phrasings drawn from `rng`."""
    c, s, v = spec.colour, spec.shape, spec.value
    if spec.kind == "recolour":
        en = [f"make {_en_ref(c, s)} {v}", f"change the colour of {_en_ref(c, s)} to {v}",
              f"turn {_en_ref(c, s)} {v}"]
        zh = [f"把{_zh_ref(c, s)}变成{ZH_COLOURS[v]}", f"将{_zh_ref(c, s)}改成{ZH_COLOURS[v]}"]
    elif spec.kind == "background":
        en = [f"change the background to {v}", f"make the background {v}", f"use a {v} background"]
        zh = [f"把背景换成{ZH_COLOURS[v]}", f"将背景改为{ZH_COLOURS[v]}"]
    elif spec.kind == "move":
        en = [f"move {_en_ref(c, s)} to {_en_position(v)}", f"put {_en_ref(c, s)} {EN_POSITIONS[v]}"]
        zh = [f"把{_zh_ref(c, s)}移到{ZH_POSITIONS[v]}", f"将{_zh_ref(c, s)}移动到{ZH_POSITIONS[v]}"]
    elif spec.kind == "add":
        en = [f"add a {v.size} {v.colour} {v.shape} {EN_POSITIONS[v.position]}"]
        zh = [f"在{ZH_POSITIONS[v.position]}添加一个{ZH_SIZES[v.size]}的{ZH_COLOURS[v.colour]}{ZH_SHAPES[v.shape]}",
              f"在{ZH_POSITIONS[v.position]}加一个{ZH_SIZES[v.size]}{ZH_COLOURS[v.colour]}{ZH_SHAPES[v.shape]}"]
    else:
        en = [f"remove {_en_ref(c, s)}", f"delete {_en_ref(c, s)}", f"take away {_en_ref(c, s)}"]
        zh = [f"去掉{_zh_ref(c, s)}", f"删除{_zh_ref(c, s)}"]
    return rng.choice(en), rng.choice(zh)


# -- sampling ------------------------------------------------------------------------------------

def _candidate_spec(rng: random.Random, scene: Scene, kind: str) -> EditSpec:
    """A random spec of `kind` for the scene (it may still not fit: apply_edit decides)."""
    if kind == "background":
        used = {scene.background} | {o.colour for o in scene.objects}
        return EditSpec(kind, value=rng.choice([c for c in COLOURS if c not in used] or ["white"]))
    if kind == "add":
        return EditSpec(kind, value=ShapeObject(
            rng.choice([c for c in COLOURS if c != scene.background]), rng.choice(SHAPES),
            rng.choice(list(POSITIONS)), rng.choice(list(SIZES))))
    if not scene.objects:
        raise EditError(f"a {kind} edit needs an object in the scene")
    obj = rng.choice(scene.objects)
    colour, shape = _reference(scene, obj)
    if kind == "recolour":
        return EditSpec(kind, colour, shape, rng.choice([c for c in COLOURS if c not in (obj.colour, scene.background)]))
    if kind == "move":
        return EditSpec(kind, colour, shape, rng.choice([p for p in POSITIONS if p != obj.position]))
    return EditSpec(kind, colour, shape)


def make_edit(rng: random.Random, source: Scene, kind: str | None = None, split: str | None = None) -> Edit:
    """A random edit of `source` (of `kind`, or a random kind) whose target is a valid scene (in
    `split` when given). The kind is drawn first and then kept while its details are redrawn,
    so kinds that fit less often (a move onto a free spot) are not crowded out by easy ones."""
    order = [kind] if kind else rng.sample(KINDS, len(KINDS))
    for chosen in order:
        for _ in range(40):
            try:
                spec = _candidate_spec(rng, source, chosen)
                target = apply_edit(source, spec)
            except EditError:
                continue
            if split is None or in_split(target, split):
                return Edit(source, target, spec, *instructions(spec, rng))
    raise EditError(f"no valid {kind or 'random'} edit found for {source}")


# -- parsing -------------------------------------------------------------------------------------

_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_EN_REF = rf"the\s+(?:({_COLOUR})\s+)?({_SHAPE})"
_EN_PATTERNS = [
    ("background", re.compile(rf"background\s+(?:to\s+)?({_COLOUR})|({_COLOUR})\s+background")),
    ("add", re.compile(rf"\badd\s+an?\s+(small|large)\s+({_COLOUR})\s+({_SHAPE})\s+(?:on|at|in)\s+the\s+(\w+)")),
    ("remove", re.compile(rf"\b(?:remove|delete|take\s+away)\s+{_EN_REF}")),
    ("move", re.compile(rf"\b(?:move|put)\s+{_EN_REF}\s+(?:to|on|at|in)\s+the\s+(\w+)")),
    ("recolour", re.compile(rf"{_EN_REF}\s+(?:to\s+)?({_COLOUR})\b")),
]

_ZH_COLOUR_BACK = {zh: en for en, zh in ZH_COLOURS.items()}
_ZH_SHAPE_BACK = {zh: en for en, zh in ZH_SHAPES.items()}
_ZC, _ZS = "|".join(_ZH_COLOUR_BACK), "|".join(_ZH_SHAPE_BACK)
_ZH_REF = rf"({_ZC})?({_ZS})"
_ZH_POS = "|".join(sorted(ZH_POSITION_WORDS, key=len, reverse=True))
_ZH_PATTERNS = [
    ("background", re.compile(rf"背景(?:换成|改为|改成|变成)({_ZC})")),
    ("add", re.compile(rf"在({_ZH_POS})(?:添加|加)一个(小|大)的?({_ZC})({_ZS})")),
    ("remove", re.compile(rf"(?:去掉|删除|删掉){_ZH_REF}")),
    ("move", re.compile(rf"{_ZH_REF}(?:移到|移动到|放到)({_ZH_POS})")),
    ("recolour", re.compile(rf"{_ZH_REF}(?:变成|改成|换成)({_ZC})")),
]


def parse_instruction(text: str) -> EditSpec:
    """The EditSpec an EN or ZH instruction asks for. Raises EditError when none matches."""
    zh = is_chinese(text)
    for kind, pattern in (_ZH_PATTERNS if zh else _EN_PATTERNS):
        found = pattern.search(text if zh else text.lower())
        if found:
            return (_zh_spec if zh else _en_spec)(kind, found.groups())
    raise EditError(f"instruction {text!r}: not one of the toy edits (recolour, background, move, add, remove)")


def _en_spec(kind: str, g: tuple) -> EditSpec:
    if kind == "background":
        return EditSpec(kind, value=g[0] or g[1])
    if kind == "add":
        return EditSpec(kind, value=ShapeObject(g[1], g[2], _en_position_word(g[3]), g[0]))
    if kind == "move":
        return EditSpec(kind, g[0], g[1], _en_position_word(g[2]))
    return EditSpec(kind, g[0], g[1], g[2] if kind == "recolour" else None)


def _en_position_word(word: str) -> str:
    if word not in EN_POSITION_WORDS:
        raise EditError(f"unknown position {word!r}; expected one of {sorted(EN_POSITION_WORDS)}")
    return EN_POSITION_WORDS[word]


def _zh_spec(kind: str, g: tuple) -> EditSpec:
    if kind == "background":
        return EditSpec(kind, value=_ZH_COLOUR_BACK[g[0]])
    if kind == "add":
        size = "small" if g[1] == "小" else "large"
        return EditSpec(kind, value=ShapeObject(_ZH_COLOUR_BACK[g[2]], _ZH_SHAPE_BACK[g[3]],
                                                ZH_POSITION_WORDS[g[0]], size))
    colour, shape = (_ZH_COLOUR_BACK[g[0]] if g[0] else None), _ZH_SHAPE_BACK[g[1]]
    if kind == "move":
        return EditSpec(kind, colour, shape, ZH_POSITION_WORDS[g[2]])
    if kind == "recolour":
        return EditSpec(kind, colour, shape, _ZH_COLOUR_BACK[g[2]])
    return EditSpec(kind, colour, shape)
