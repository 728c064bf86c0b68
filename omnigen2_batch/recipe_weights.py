"""What a recipe says about the weights and how they run: the model, a replaced transformer,
LoRA adapters, the step cache and the speed mode. Schema types (typed_yaml custom types and
dataclasses) and checks that need no torch: a LoRA file is checked by reading its safetensors
header only, so `validate` still answers at once.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Annotated

from .config import DEFAULT_MODEL, EMBEDDED_MODELS
from .recipe_types import InputFile, is_regular_file, resolve_inside
from .typed_yaml import (INVALID, Context, Range, convert, dataclass_schema, did_you_mean, opt,
                         req, show)

HUB_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+"
MODES = ("exact", "fast")  # model/presets.py's PRESETS (a test holds them equal)
CACHE_KINDS = ("none", "teacache", "taylorseer")
MAX_LORAS = 8  # adapters per job: they are stacked into one low-rank pair, but each costs rank
LORA_SCALE = Range(-2, 2)  # beyond +-2 an adapter trained at 1.0 gives noise, not more style
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header


def check_model(model: str | None, ctx: Context) -> str | None:
    """"tiny" or "toy", a hub id, or a local folder (made absolute)."""
    if model is None or model in EMBEDDED_MODELS:
        return model
    if model.startswith(("/", "./", "../", "~")):
        path = resolve_inside(model, ("model",), ctx)
        if path is not None and not path.is_dir():
            ctx.error(("model",), f"no such model folder: {model} (looked for {path})")
        return str(path) if path else model
    if not re.fullmatch(HUB_ID_PATTERN, model):
        ctx.error(("model",), f"expected a hub id like {DEFAULT_MODEL}, toy, tiny, or a local "
                              f"folder starting with ./ or /, got {model!r}")
    return model


def check_transformer(value: str | None, ctx: Context) -> str | None:
    """A transformer folder (or a model folder holding transformer/) or one .safetensors file,
    inside the recipe's roots; made absolute. Its configs and shards are checked by preflight."""
    if value is None:
        return None
    path = resolve_inside(value, ("transformer",), ctx)
    if path is None or path.is_dir():
        return str(path) if path else value
    if not is_regular_file(path):
        ctx.error(("transformer",), f"no such file or folder: {value} (looked for {path})")
    elif path.suffix != ".safetensors":
        ctx.error(("transformer",), f"expected a folder or a .safetensors file (weights load "
                                    f"from safetensors only), got {value}")
    return str(path)


def safetensors_keys(path) -> list[str] | None:
    """The tensor names in a safetensors file's header, or None when it is not one (read
    without torch: an 8-byte little-endian length, then that much JSON)."""
    try:
        with open(path, "rb") as stream:
            length = int.from_bytes(stream.read(8), "little")
            if not 2 <= length <= MAX_HEADER_BYTES:
                return None
            header = json.loads(stream.read(length))
    except (OSError, ValueError):
        return None
    return [key for key in header if key != "__metadata__"] if isinstance(header, dict) else None


@dataclass(frozen=True)
class LoraFile(InputFile):
    """A LoRA adapter file: safetensors with PEFT keys (<module>.lora_A.weight, .lora_B.weight)."""

    DESCRIPTION = "a .safetensors LoRA file path"

    @classmethod
    def convert(cls, value, at, ctx):
        file = super().convert(value, at, ctx)
        if file is INVALID:
            return INVALID
        if file.path.suffix != ".safetensors":
            ctx.error(at, f"expected a .safetensors file (LoRA weights load from safetensors "
                          f"only), got {value}")
            return INVALID
        keys = safetensors_keys(file.path)
        if keys is None:
            ctx.error(at, f"{value} is not a safetensors file (its header is unreadable)")
            return INVALID
        if not any(key.endswith(".lora_A.weight") for key in keys):
            ctx.error(at, f"{value} holds no LoRA weights (keys like <module>.lora_A.weight)")
            return INVALID
        return file


@dataclass(kw_only=True)
class Lora:
    """A LoRA adapter for the transformer and how strongly it acts."""

    path: LoraFile = req("a LoRA .safetensors file (PEFT keys <module>.lora_A/B.weight)")
    scale: Annotated[float, LORA_SCALE] = opt("how strongly it acts: 1.0 as trained, 0 off, "
                                              "negative pushes away from it", default=1.0)


class LoraList:
    """`lora: [{path, scale}, ...]`: adapters acting together; `[]` turns off an outer level's."""

    KINDS, DESCRIPTION = {"array"}, "a list of {path, scale}"

    @staticmethod
    def convert(value, at, ctx):
        if len(value) > MAX_LORAS:
            ctx.error(at, f"at most {MAX_LORAS} LoRA adapters per job, got {len(value)}")
            return INVALID
        loras = [convert(item, Lora, at + (index,), ctx) for index, item in enumerate(value)]
        if any(lora is INVALID or lora.path is None for lora in loras):
            return INVALID  # each reason is recorded already
        paths = [lora.path.path for lora in loras]
        for index, path in enumerate(paths):
            if path in paths[:index]:
                ctx.error(at + (index, "path"), f"{path.name} is listed twice; give it one "
                                                "entry with the scale you want")
                return INVALID
        return tuple(loras)

    @staticmethod
    def schema() -> dict:
        return {"type": "array", "items": dataclass_schema(Lora, {}), "maxItems": MAX_LORAS}


@dataclass(frozen=True)
class CacheSetting:
    """`cache: none | teacache | taylorseer`, or `cache: {teacache: 0.08}` for TeaCache with
    its own threshold (official default 0.05; larger skips more steps)."""

    KINDS = {"string", "object"}
    DESCRIPTION = "none, teacache, taylorseer or {teacache: THRESHOLD}"
    kind: str
    threshold: float | None = None  # TeaCache only; None: the model's default

    @classmethod
    def convert(cls, value, at, ctx):
        if value in CACHE_KINDS:
            return cls(value)
        if isinstance(value, dict) and list(value) == ["teacache"]:
            threshold = value["teacache"]
            if (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
                    and math.isfinite(threshold) and 0 < threshold <= 1):
                return cls("teacache", float(threshold))
            ctx.error(at + ("teacache",), f"expected a TeaCache threshold above 0 and at most 1 "
                                          f"(official default 0.05), got {show(threshold)}")
            return INVALID
        hint = did_you_mean(value, CACHE_KINDS) if isinstance(value, str) else ""
        ctx.error(at, f"expected {cls.DESCRIPTION}, got {show(value)}{hint}")
        return INVALID

    @staticmethod
    def schema() -> dict:
        threshold = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
        return {"oneOf": [{"enum": list(CACHE_KINDS)},
                          {"type": "object", "properties": {"teacache": threshold},
                           "required": ["teacache"], "additionalProperties": False}]}
