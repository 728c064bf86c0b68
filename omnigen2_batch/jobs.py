"""The data that flows through the engine: Job -> Attempt(s) -> JobResult.

A Job is everything that determines an output; its id is a hash of exactly those fields, so a
rerun recognises finished work and a changed prompt makes a new job (content addressing, as in
DVC or Make). Scoring context and labels travel with the job but do not change its id: they
decide what is *kept*, not what is *made*, and `score` can re-decide them later.

This module is pure data: no torch, no I/O, cheap to import from the CLI.
"""
from __future__ import annotations

import hashlib
import json
from functools import cached_property
from dataclasses import asdict, dataclass, field, replace
from typing import Any

KINDS = ("t2i", "edit", "incontext")
STATUSES = ("pending", "kept", "rejected", "failed", "superseded")  # superseded: no longer planned


@dataclass(frozen=True)
class ImageRef:
    """An input image: a file known by its content hash, or the kept image of another job.

    `key` is "sha256:<hex>" for a file or "job:<id>" for another job's output; only the key
    enters a job id, so moving a file does not redo work but editing its pixels does.
    """

    key: str
    path: str = ""  # where the file lies (absolute); "" for a job output

    @property
    def job_id(self) -> str | None:
        return self.key[4:] if self.key.startswith("job:") else None


@dataclass(frozen=True)
class LoraRef:
    """A LoRA adapter a job applies: its file by content hash ("sha256:<hex>", as ImageRef: moving
    the file redoes nothing, editing it does) and its scale."""

    key: str
    path: str  # where the file lies (absolute)
    scale: float = 1.0


@dataclass(frozen=True)
class Scoring:
    """What an output is judged against. Not part of the job id."""

    text: str = ""  # text for CLIP alignment: the prompt, or the English twin of a ZH prompt
    references: tuple[ImageRef, ...] = ()  # subject consistency targets (character refs/anchor)
    source: ImageRef | None = None  # the edit input, for preservation
    source_caption: str = ""  # edit direction: caption of the input ...
    target_caption: str = ""  # ... and of the wanted output
    pair: str = ""  # bilingual pair key shared by the EN and ZH job; "" otherwise
    # character -> the keys of its references (a subset of `references`): scored one by one
    characters: dict[str, list[str]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)  # metric -> minimum to pass

    def measures(self, metric: str) -> bool:
        """Whether the scorer can measure `metric` for this job (scoring.py's rules)."""
        if metric.startswith("consistency"):
            return bool(self.references)
        if metric == "direction":
            return self.source is not None and bool(self.source_caption and self.target_caption)
        return metric != "preservation" or self.source is not None


# The fields that determine the pixels. Order matters only for readability; the hash is of a
# sorted JSON object.
IDENTITY_FIELDS = (
    "kind", "prompt", "negative_prompt", "inputs", "width", "height", "steps",
    "text_guidance", "image_guidance", "cfg_range", "scheduler", "seed", "model", "max_input_side",
)
# Fields that determine the pixels only when set: at these defaults they stay out of the
# identity, so the ids of every job made before they existed stay the same.
OPTIONAL_IDENTITY = {"lora": (), "cache": "none", "cache_threshold": None, "transformer": ""}


@dataclass(frozen=True)
class Job:
    section: str  # recipe section, e.g. "prompts", "series/hero", "edits", "bilingual"
    name: str  # human label, unique within the section, used in file names
    kind: str  # one of KINDS
    prompt: str
    negative_prompt: str = ""
    inputs: tuple[ImageRef, ...] = ()  # images the model sees, in order
    width: int = 1024
    height: int = 1024
    steps: int = 50
    text_guidance: float = 5.0
    image_guidance: float = 2.0
    cfg_range: tuple[float, float] = (0.0, 1.0)
    scheduler: str = "euler"  # "euler" | "dpmsolver++"
    seed: int = 0
    model: str = "OmniGen2/OmniGen2"
    max_input_side: int = 1024  # input images are shrunk to fit this side before encoding
    lora: tuple[LoraRef, ...] = ()  # adapters acting together, in recipe order
    cache: str = "none"  # step cache: "none" | "teacache" | "taylorseer"
    cache_threshold: float | None = None  # TeaCache's threshold; None for the other kinds
    transformer: str = ""  # content key of a replacing transformer ("" : the model's own)
    lang: str = "en"
    candidates: int = 1  # best-of-N first attempts
    max_attempts: int = 3  # budget for the reflection ladder (candidates included)
    ladder: tuple[str, ...] = ()  # strategy names after the first attempt; () = the default
    variants: int = 1  # passing images to keep, ranked (the best is the job's image)
    # sweep cell labels: {"axes": [...], "at": [...], "values": [...], "base": name}; {} if none
    sweep: dict[str, Any] = field(default_factory=dict)
    scoring: Scoring = field(default_factory=Scoring)

    @cached_property  # hashed once: a resume scan of 10,000 jobs asks for ids many times
    def id(self) -> str:
        return job_id(self.identity())

    def identity(self) -> dict[str, Any]:
        """The fields that determine the output, as plain JSON-able values."""
        ident = {name: getattr(self, name) for name in IDENTITY_FIELDS}
        ident["inputs"] = [ref.key for ref in self.inputs]
        ident["cfg_range"] = list(self.cfg_range)
        for name, default in OPTIONAL_IDENTITY.items():
            value = getattr(self, name)
            if value != default:
                ident[name] = [[r.key, r.scale] for r in value] if name == "lora" else value
        return ident

    @property
    def depends_on(self) -> tuple[str, ...]:
        """Ids of jobs whose kept image this job needs (as an input or a reference)."""
        refs = self.inputs + self.scoring.references
        return tuple(dict.fromkeys(ref.job_id for ref in refs if ref.job_id))

    @property
    def pair_side(self) -> str | None:
        """Which side of a bilingual pair this job is: "en" when its lang is "en", "zh" for any
        other language; None when it belongs to no pair. Scoring and the report both use this."""
        if not self.scoring.pair:
            return None
        return "en" if self.lang == "en" else "zh"

    @property
    def edit_source(self) -> ImageRef | None:
        """The image an edit starts from: the scoring source, else (for an edit) its first input."""
        if self.scoring.source is not None:
            return self.scoring.source
        return self.inputs[0] if self.kind == "edit" and self.inputs else None

    def with_(self, **changes: Any) -> "Job":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Job":
        data = dict(data)
        data["inputs"] = tuple(ImageRef(**ref) for ref in data.get("inputs", ()))
        data["cfg_range"] = tuple(data.get("cfg_range", (0.0, 1.0)))
        data["ladder"] = tuple(data.get("ladder", ()))
        data["lora"] = tuple(LoraRef(**ref) for ref in data.get("lora", ()))
        scoring = dict(data.get("scoring") or {})
        scoring["references"] = tuple(ImageRef(**r) for r in scoring.get("references", ()))
        if scoring.get("source"):
            scoring["source"] = ImageRef(**scoring["source"])
        data["scoring"] = Scoring(**scoring)
        return cls(**data)


def job_id(identity: dict[str, Any]) -> str:
    """16 hex digits of sha256 over the canonical JSON of a job's identity."""
    canonical = json.dumps(identity, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class Attempt:
    """One generation of a job and how it was judged."""

    n: int  # 0-based attempt number within the job
    seed: int
    strategy: str  # "initial", "candidate", "new_seed", "stronger_guidance", "refine", "ask_mllm"
    reason: str  # why this attempt was made (what the previous one failed)
    params: dict[str, Any]  # parameters actually used (guidances, edit instruction, ...)
    scores: dict[str, float] = field(default_factory=dict)
    passed: bool = False
    failed_metrics: tuple[str, ...] = ()
    seconds: float = 0.0
    image: Any = None  # PIL.Image.Image; not persisted in the manifest

    def record(self) -> dict[str, Any]:
        """The manifest row (everything but the pixels)."""
        row = asdict(self)
        row.pop("image")
        row["failed_metrics"] = list(self.failed_metrics)
        return row


@dataclass
class JobResult:
    job_id: str
    status: str  # "kept" | "rejected" | "failed"
    attempts: list[Attempt] = field(default_factory=list)
    best: int | None = None  # index into attempts of the kept (or best rejected) attempt
    error: str = ""

    @property
    def image(self):
        return None if self.best is None else self.attempts[self.best].image


@dataclass
class GenRequest:
    """One image to generate: what the worker asks of a Generator.

    A Generator (see generate.py) takes a list of these and returns one PIL image each, in
    order; requests with the same `batch_key` may share one pipeline call.
    """

    prompt: str
    negative_prompt: str = ""
    images: list = field(default_factory=list)  # PIL images, RGB, in order
    width: int = 1024
    height: int = 1024
    steps: int = 50
    text_guidance: float = 5.0
    image_guidance: float = 2.0
    cfg_range: tuple[float, float] = (0.0, 1.0)
    scheduler: str = "euler"
    seed: int = 0
    max_input_side: int = 1024
    lora: tuple[LoraRef, ...] = ()
    cache: str = "none"
    cache_threshold: float | None = None

    @classmethod
    def for_job(cls, job: Job, images: list, **overrides: Any) -> "GenRequest":
        fields = {name: getattr(job, name) for name in (
            "prompt", "negative_prompt", "width", "height", "steps", "text_guidance",
            "image_guidance", "cfg_range", "scheduler", "seed", "max_input_side", "lora",
            "cache", "cache_threshold")}
        return cls(images=list(images), **{**fields, **overrides})

    def batch_key(self) -> tuple:
        """Requests with equal keys can run in one pipeline call (adapters and cache are
        per call: jobs with other LoRA scales or another cache never share one)."""
        return (self.width, self.height, self.steps, self.text_guidance, self.image_guidance,
                tuple(self.cfg_range), self.scheduler, self.max_input_side,
                tuple(im.size for im in self.images), self.lora_scales(), self.cache,
                self.cache_threshold)

    def lora_scales(self) -> tuple[tuple[str, float], ...]:
        return tuple((ref.key, ref.scale) for ref in self.lora)

    def model_options(self) -> dict[str, Any]:
        """The adapters and cache this request runs with, for its attempt's record; {} when
        none (records of plain jobs look as they always did)."""
        options: dict[str, Any] = {}
        if self.lora:
            options["lora"] = [{"path": r.path, "key": r.key, "scale": r.scale} for r in self.lora]
        if self.cache != "none":
            options["cache"] = self.cache
        if self.cache_threshold is not None:
            options["cache_threshold"] = self.cache_threshold
        return options

