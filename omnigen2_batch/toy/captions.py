"""Captions of toy scenes in English and Chinese, and a parser from a caption back to attributes.

A caption states a SceneSpec: the background and, per object, some of its attributes (a short
caption leaves position and size open). `caption()` writes one of several phrasings; `parse()`
reads any of them (and close paraphrases) back, in either language, so the judge can check an
image against a caption it has never seen written down.

The parser works clause by clause: the background phrase is found and cut out first, the rest
is split at "and"/commas (和/，), and each clause holding a colour + shape is one object whose
size and position words are the ones in the same clause.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .scenes import COLOURS, SHAPES, Scene

LANGS = ("en", "zh")
DETAILS = ("short", "full")  # short: colour + shape + background; full: + position + size

ZH_COLOURS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "white": "白色", "black": "黑色"}
ZH_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
ZH_POSITIONS = {"left": "左边", "right": "右边", "top": "上方", "bottom": "下方", "centre": "中间"}
ZH_SIZES = {"small": "小", "large": "大"}
EN_POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top",
                "bottom": "at the bottom", "centre": "in the centre"}

# Words the parser accepts beyond the ones it writes (paraphrases a person might type).
EN_POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom",
                     "lower": "bottom", "centre": "centre", "center": "centre", "middle": "centre"}
EN_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
ZH_POSITION_WORDS = {"左边": "left", "左侧": "left", "右边": "right", "右侧": "right", "上方": "top",
                     "上面": "top", "顶部": "top", "下方": "bottom", "下面": "bottom", "底部": "bottom",
                     "中间": "centre", "中央": "centre", "正中": "centre"}


class CaptionError(ValueError):
    """A caption the parser cannot read (no background or no object)."""


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object; None = not stated (anything goes)."""

    colour: str | None = None
    shape: str | None = None
    position: str | None = None
    size: str | None = None


@dataclass(frozen=True)
class SceneSpec:
    background: str | None
    objects: tuple[ObjectSpec, ...]


def spec_of(scene: Scene, detail: str = "full") -> SceneSpec:
    """What a caption of `detail` states about `scene`."""
    full = detail == "full"
    return SceneSpec(scene.background, tuple(
        ObjectSpec(o.colour, o.shape, o.position if full else None, o.size if full else None)
        for o in scene.objects))


# -- writing -----------------------------------------------------------------------------------
# Templates take the background word and the already-phrased object list.

EN_TEMPLATES = {
    "short": ["{objects} on a {bg} background", "{objects} against a {bg} background",
              "a {bg} background with {objects}", "{bg} background, {objects}"],
    "full": ["{objects} on a {bg} background", "a {bg} background with {objects}",
             "a picture of {objects}; {bg} background"],
}
ZH_TEMPLATES = {
    "short": ["{bg}背景上的{objects}", "{objects}，背景是{bg}", "{bg}底色上有{objects}"],
    "full": ["{bg}的背景中，{objects}", "{objects}，背景是{bg}", "在{bg}背景上，{objects}"],
}


def _en_object(obj, full: bool) -> str:
    if full:
        return f"a {obj.size} {obj.colour} {obj.shape} {EN_POSITIONS[obj.position]}"
    return f"a {obj.colour} {obj.shape}"


def _zh_object(obj, full: bool, style: int) -> str:
    colour, shape = ZH_COLOURS[obj.colour], ZH_SHAPES[obj.shape]
    if not full:
        return f"一个{colour}的{shape}" if style % 2 else f"{colour}{shape}"
    size, position = ZH_SIZES[obj.size], ZH_POSITIONS[obj.position]
    if style % 2:
        return f"一个{size}的{colour}{shape}在{position}"
    return f"{position}有一个{size}{colour}{shape}"


def templates(lang: str, detail: str) -> list[str]:
    _check_lang_detail(lang, detail)
    return (EN_TEMPLATES if lang == "en" else ZH_TEMPLATES)[detail]


def caption(scene: Scene, lang: str = "en", detail: str = "full", template: int = 0) -> str:
    """One phrasing of `scene` (template indexes wrap around)."""
    forms = templates(lang, detail)
    form = forms[template % len(forms)]
    full = detail == "full"
    if lang == "en":
        objects = " and ".join(_en_object(o, full) for o in scene.objects)
        return form.format(objects=objects, bg=scene.background)
    objects = "，".join(_zh_object(o, full, template) for o in scene.objects)
    return form.format(objects=objects, bg=ZH_COLOURS[scene.background])


def all_captions(scene: Scene, lang: str, detail: str) -> list[str]:
    return [caption(scene, lang, detail, i) for i in range(len(templates(lang, detail)))]


def random_caption(scene: Scene, rng: random.Random, lang: str | None = None,
                   detail: str | None = None) -> tuple[str, str, str]:
    """(caption, lang, detail) with random choices for whatever is None."""
    lang = lang or rng.choice(LANGS)
    detail = detail or rng.choice(DETAILS)
    return caption(scene, lang, detail, rng.randrange(len(templates(lang, detail)))), lang, detail


def _check_lang_detail(lang: str, detail: str) -> None:
    if lang not in LANGS or detail not in DETAILS:
        raise ValueError(f"lang must be one of {LANGS} and detail one of {DETAILS}; got {lang!r}, {detail!r}")


# -- parsing -----------------------------------------------------------------------------------

def is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def _alternation(words) -> str:
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))


_EN_COLOUR = _alternation(COLOURS)
_EN_BACKGROUND = [re.compile(rf"\b({_EN_COLOUR})\s+background\b"),
                  re.compile(rf"\bbackground\s+(?:is\s+|of\s+)?({_EN_COLOUR})\b")]
_EN_OBJECT = re.compile(rf"\b(?:({_alternation(EN_SIZE_WORDS)})\s+)?({_EN_COLOUR})\s+({_alternation(SHAPES)})s?\b")
_EN_POSITION = re.compile(rf"\b({_alternation(EN_POSITION_WORDS)})\b")

_ZH_COLOUR_WORDS = {zh: en for en, zh in ZH_COLOURS.items()}
_ZH_COLOUR_WORDS.update({zh[0]: en for en, zh in ZH_COLOURS.items()})  # 红 as well as 红色
_ZH_COLOUR = _alternation(_ZH_COLOUR_WORDS)
_ZH_SHAPE_WORDS = {zh: en for en, zh in ZH_SHAPES.items()}
_ZH_SHAPE_WORDS.update({"圆": "circle", "方形": "square", "方块": "square"})
_ZH_BACKGROUND = [re.compile(rf"({_ZH_COLOUR})的?(?:背景|底色)"),
                  re.compile(rf"(?:背景|底色)(?:是|为|换成|变成)?({_ZH_COLOUR})")]
_ZH_OBJECT = re.compile(rf"(小|大)?的?({_ZH_COLOUR})的?({_alternation(_ZH_SHAPE_WORDS)})")
_ZH_POSITION = re.compile(_alternation(ZH_POSITION_WORDS))


def parse(text: str) -> SceneSpec:
    """The SceneSpec a caption states, in English or Chinese. Raises CaptionError."""
    return (_parse_zh if is_chinese(text) else _parse_en)(text)


def _cut_background(text: str, patterns, words) -> tuple[str | None, str]:
    for pattern in patterns:
        found = pattern.search(text)
        if found:
            return words[found.group(1)], text[:found.start()] + " | " + text[found.end():]
    return None, text


def _parse_en(text: str) -> SceneSpec:
    lowered = text.lower()
    background, rest = _cut_background(lowered, _EN_BACKGROUND, {c: c for c in COLOURS})
    objects = []
    for clause in re.split(r",|;|\band\b|\|", rest):
        for found in _EN_OBJECT.finditer(clause):
            # The position is the one stated after this object in its clause (English puts it last).
            position = _EN_POSITION.search(clause, found.end())
            objects.append(ObjectSpec(
                colour=found.group(2), shape=found.group(3),
                position=EN_POSITION_WORDS[position.group(1)] if position else None,
                size=EN_SIZE_WORDS[found.group(1)] if found.group(1) else None))
    return _checked(text, background, objects)


def _parse_zh(text: str) -> SceneSpec:
    background, rest = _cut_background(text, _ZH_BACKGROUND, _ZH_COLOUR_WORDS)
    objects = []
    for clause in re.split(r"[，,、；;|]|和|以及", rest):
        found = _ZH_OBJECT.search(clause)
        if not found:
            continue
        position = _ZH_POSITION.search(clause)
        objects.append(ObjectSpec(
            colour=_ZH_COLOUR_WORDS[found.group(2)], shape=_ZH_SHAPE_WORDS[found.group(3)],
            position=ZH_POSITION_WORDS[position.group(0)] if position else None,
            size={"小": "small", "大": "large"}.get(found.group(1) or "")))
    return _checked(text, background, objects)


def _checked(text: str, background, objects) -> SceneSpec:
    if background is None:
        raise CaptionError(f"caption {text!r}: no background colour found (e.g. 'on a blue background' / '蓝色背景')")
    if not objects:
        raise CaptionError(f"caption {text!r}: no object found (a colour followed by a shape, e.g. 'red circle' / '红色圆形')")
    return SceneSpec(background, tuple(objects))

