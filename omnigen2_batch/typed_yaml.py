"""Typed YAML: turn a YAML document into dataclasses, with file:line in every error.

A schema is a tree of dataclasses whose field annotations give the YAML shape (str, int,
float, bool, list[...], dict[...], Literal[...], unions, nested dataclasses, Annotated[...,
Range(...)] or Pattern(...) constraints, and custom types with KINDS, DESCRIPTION, convert()
and schema()) and whose `doc` metadata (see opt/req) describes each field. From the same
classes this module converts parsed YAML, reporting every problem at once as
"file:line: field.path: message", and derives a JSON Schema. A dataclass may add
`check(at, ctx)` for rules across fields, `HINTS` (unknown key -> why it is not allowed) and
`FREE_PREFIX` (keys starting with it are ignored). It exists so that recipe.py can hold only
what a recipe is; nothing here knows about recipes, and nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints


from .errors import UserError

# Characters text may not hold: C0/C1 controls other than tab and newlines (they corrupt file
# names, tables and terminals) and lone surrogates (they cannot be written as UTF-8 at all).
BAD_TEXT_CHAR = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` with control characters and lone surrogates escaped (\\n, \\x00, \\ud800), so a
    message stays one line and can always be printed."""
    return UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)


class DocumentError(UserError):
    """An invalid document; `errors` holds every "file:line: field: message" (printable)."""

    def __init__(self, errors: list[str]):
        printed = [printable(str(error)) for error in errors]
        super().__init__("\n".join(printed), errors=printed)


# ---- where a value came from --------------------------------------------------------------

Loc = tuple  # a field path such as ("series", 0, "shots", 2, "size")


def field_name(at: Loc) -> str:
    """("series", 0, "shots", 2) -> "series[0].shots[2]"."""
    text = ""
    for part in at:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


@dataclass
class Source:
    """The file as read, plus the line of every field in it."""

    path: Path  # absolute
    label: str  # the path as the person gave it, used in messages
    sha256: str
    lines: dict[Loc, int]
    roots: tuple[Path, ...]  # folders that paths in the file may point into
    overrides: dict[Loc, str] = field(default_factory=dict)  # field -> the --set that gave it

    def line(self, at: Loc) -> int:
        for end in range(len(at), -1, -1):
            if at[:end] in self.lines:
                return self.lines[at[:end]]
        return 1

    def where(self, at: Loc) -> str:
        for end in range(len(at), 0, -1):
            if at[:end] in self.overrides:
                return f"{self.label}: --set {self.overrides[at[:end]]}: {field_name(at)}"
        return f"{self.label}:{self.line(at)}: {field_name(at)}"


class Context:
    """Conversion state: the source and the errors found so far (line, message), which
    `raise_if_any` raises as `raises` (DocumentError or a subclass)."""

    def __init__(self, source: Source, raises: type[DocumentError] = DocumentError):
        self.source = source
        self.raises = raises
        self.found: list[tuple[int, str]] = []

    def error(self, at: Loc, message: str) -> None:
        self.found.append((self.source.line(at), f"{self.source.where(at)}: {message}"))

    def raise_if_any(self) -> None:
        if self.found:
            raise self.raises([text for _, text in sorted(self.found, key=lambda f: f[0])])


INVALID = object()  # a value that failed conversion (its error is already recorded)


def did_you_mean(word: Any, choices) -> str:
    # 0.7: typos score 0.75 and up; "colour" vs "lora" (0.6) shares letters, not a meaning
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.7)
    return f"; did you mean '{close[0]}'?" if close else ""


def show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- constraints --------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    """Annotated constraint: lo <= value <= hi."""

    lo: float
    hi: float

    def check(self, value, at, ctx) -> bool:
        if self.lo <= value <= self.hi:
            return True
        ctx.error(at, f"expected a value from {show(self.lo)} to {show(self.hi)}, "
                      f"got {show(value)}")
        return False

    def schema(self) -> dict:
        return {"minimum": self.lo, "maximum": self.hi}


@dataclass(frozen=True)
class Pattern:
    """Annotated constraint: the whole string matches `regex` (fullmatch: a `$` cannot let a
    trailing newline through); `hint` says what that means."""

    regex: str
    hint: str

    def check(self, value, at, ctx) -> bool:
        if re.fullmatch(self.regex, value):
            return True
        ctx.error(at, f"expected {self.hint}, got {show(value)}")
        return False

    def schema(self) -> dict:
        return {"pattern": self.regex}


# ---- declaring fields ---------------------------------------------------------------------

def opt(doc: str, default: Any = None, factory: Any = None) -> Any:
    """An optional field described by `doc`; unset it is `default` (None: the key was absent)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def req(doc: str) -> Any:
    return field(metadata={"doc": doc})


# ---- conversion: YAML values -> dataclasses -----------------------------------------------

def json_kind(value: Any) -> str:
    for kind, types_ in (("boolean", bool), ("integer", int), ("number", float),
                         ("string", str), ("array", list), ("object", dict)):
        if isinstance(value, types_):
            return kind
    return "null" if value is None else type(value).__name__


def kinds_of(tp) -> set[str]:
    """The YAML kinds a schema type accepts (unions dispatch on these)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return kinds_of(args[0])
    if origin in (Union, types.UnionType):
        return set().union(*(kinds_of(a) for a in args))
    if origin is Literal:
        return {json_kind(a) for a in args}
    if hasattr(tp, "KINDS"):
        return tp.KINDS
    if dataclasses.is_dataclass(tp) or origin is dict:
        return {"object"}
    return {list: {"array"}, str: {"string"}, int: {"integer"}, float: {"integer", "number"},
            bool: {"boolean"}, type(None): {"null"}}[origin or tp]


def describe(tp) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return describe(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hasattr(tp, "DESCRIPTION"):
        return tp.DESCRIPTION
    if dataclasses.is_dataclass(tp) or origin is dict:
        return "a mapping"
    return {list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "true or false"}[origin or tp]


def unusable_value(value: Any) -> str | None:
    """Why a value YAML accepts cannot be used at all (NaN, infinity, control characters,
    lone surrogates), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, got {show(value)}"
    if isinstance(value, str) and (bad := BAD_TEXT_CHAR.search(value)):
        return (f"contains the character {printable(bad.group())} (U+{ord(bad.group()):04X}), "
                "which text here may not hold; remove it")
    return None


def convert(value: Any, tp, at: Loc, ctx: Context) -> Any:
    """`value` as schema type `tp`, or INVALID after recording why not."""
    if problem := unusable_value(value):
        ctx.error(at, problem)
        return INVALID
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        for alternative in args:  # None in a union means "absent"; a YAML null is an error
            if alternative is not type(None) and json_kind(value) in kinds_of(alternative):
                return convert(value, alternative, at, ctx)
    elif json_kind(value) in kinds_of(tp):
        if origin is Annotated:
            result = convert(value, args[0], at, ctx)
            ok = result is not INVALID and all(mark.check(result, at, ctx) for mark in args[1:])
            return result if ok else INVALID
        if hasattr(tp, "convert"):
            return tp.convert(value, at, ctx)
        if dataclasses.is_dataclass(tp):
            return convert_dataclass(value, tp, at, ctx)
        if origin is list:
            return [convert(item, args[0], at + (i,), ctx) for i, item in enumerate(value)]
        if origin is dict:
            pairs = [(convert(k, args[0], at + (k,), ctx), convert(v, args[1], at + (k,), ctx))
                     for k, v in value.items()]
            return {k: v for k, v in pairs if k is not INVALID and v is not INVALID}
        if origin is Literal and value not in args:
            ctx.error(at, f"expected one of {', '.join(map(repr, args))}, got {show(value)}"
                          f"{did_you_mean(value, args)}")
            return INVALID
        return to_float(value, at, ctx) if tp is float else value
    hint = " (remove the key to use the default)" if value is None else ""
    ctx.error(at, f"expected {describe(tp)}, got {json_kind(value)} {show(value)}{hint}")
    return INVALID


def to_float(value: int | float, at: Loc, ctx: Context) -> Any:
    try:
        return float(value)
    except OverflowError:  # an integer too large for any float
        ctx.error(at, f"expected a finite number, got an integer of {len(str(value))} digits")
        return INVALID


def schema_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def convert_dataclass(value: dict, cls, at: Loc, ctx: Context):
    hints = get_type_hints(cls, include_extras=True)
    fields = schema_fields(cls)
    hints_for_unknown = getattr(cls, "HINTS", {})
    free = getattr(cls, "FREE_PREFIX", None)
    for key in value:
        if key not in fields and (problem := unusable_value(key)):
            ctx.error(at + (key,), problem)
        elif key not in fields and not (free and str(key).startswith(free)):
            hint = hints_for_unknown.get(key)
            ctx.error(at + (key,), f"not allowed here: {hint}" if hint else
                      f"unknown key{did_you_mean(key, fields)}")
    kwargs = {}
    for name, spec in fields.items():
        required = spec.default is dataclasses.MISSING
        if name in value:
            result = convert(value[name], hints[name], at + (name,), ctx)
            if result is not INVALID:
                kwargs[name] = result
        elif required and spec.default_factory is dataclasses.MISSING:
            ctx.error(at, f"missing required key '{name}'")
        if name not in kwargs and required and spec.default_factory is dataclasses.MISSING:
            kwargs[name] = None  # let later checks go on; the error is already recorded
    instance = cls(**kwargs)
    if hasattr(instance, "check"):
        instance.check(at, ctx)
    return instance


# ---- JSON Schema --------------------------------------------------------------------------

def dataclass_schema(cls, defs: dict) -> dict:
    hints = get_type_hints(cls, include_extras=True)
    properties, required = {}, []
    for name, spec in schema_fields(cls).items():
        properties[name] = {"description": spec.metadata["doc"], **type_schema(hints[name], defs)}
        if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            required.append(name)
        elif spec.default not in (None, dataclasses.MISSING):
            properties[name]["default"] = spec.default
    schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if getattr(cls, "FREE_PREFIX", None):
        schema["patternProperties"] = {f"^{cls.FREE_PREFIX}": {}}
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        schema["description"] = " ".join(cls.__doc__.split())
    return {**schema, "required": required} if required else schema


def type_schema(tp, defs: dict) -> dict:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        schema = type_schema(args[0], defs)
        for mark in args[1:]:
            schema.update(mark.schema())
        return schema
    if origin in (Union, types.UnionType):
        options = [type_schema(a, defs) for a in args if a is not type(None)]
        return options[0] if len(options) == 1 else {"oneOf": options}
    if origin is Literal:
        return {"enum": list(args)}
    if hasattr(tp, "schema"):
        return tp.schema()
    if dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # reserve the name first: classes may refer to themselves
            defs[tp.__name__] = dataclass_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if origin is list:
        return {"type": "array", "items": type_schema(args[0], defs)}
    if origin is dict:
        return {"type": "object", "propertyNames": type_schema(args[0], defs),
                "additionalProperties": type_schema(args[1], defs)}
    return {"type": {str: "string", int: "integer", float: "number", bool: "boolean"}[tp]}
