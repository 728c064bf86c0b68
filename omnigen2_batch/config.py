"""RunConfig: how a run is carried out (model, device, dtype, offload, CLIP, executor, batch
size, Ray), as opposed to what it makes (the jobs). Built once from the recipe and the command
line, saved in the run directory, loaded back typed; frozen, so nothing changes it mid-run.
No torch here: the CLI builds it before deciding whether torch is needed at all.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "OmniGen2/OmniGen2"
DEFAULT_CLIP = "ViT-B-32"
DEFAULT_CLIP_WEIGHTS = "openai"
# The toy-world model shipped in the package (trained here on flat shapes and sprites, see
# omnigen2_batch/toy and the model card in TOY_DIR/README.md), its bilingual CLIP, and the
# thresholds calibrated for that CLIP on that world (per job kind).
TOY_MODEL = "toy"
TOY_DIR = Path(__file__).parent / "model" / "assets" / "toy"
TOY_CLIP = "toy-clip"
EMBEDDED_MODELS = ("tiny", TOY_MODEL)
RANDOM_WEIGHTS = "random"  # recipe value for seeded random CLIP weights (tests, smoke runs)
DEFAULT_BATCH_SIZE = 4

# What a generation setting is when no level of a recipe sets it (image guidance: below).
BUILTIN_DEFAULTS: dict[str, Any] = {
    "size": (1024, 1024), "steps": 50, "text_guidance": 5.0, "cfg_range": (0.0, 1.0),
    "scheduler": "euler", "candidates": 1, "max_attempts": 3, "seed": 0, "ladder": (),
    "variants": 1, "max_input_side": 1024,
    "negative_prompt": "blurry, low quality, distorted, deformed, bad anatomy, extra limbs, "
                       "watermark, text artifacts",
}
# OmniGen2's README: edits work best with image guidance 1.2-2.0, in-context 2.5-3.0.
IMAGE_GUIDANCE = {"t2i": 1.0, "edit": 2.0, "incontext": 2.5}
BUILTIN_SCORING = {"enabled": True, "model": DEFAULT_CLIP, "pretrained": DEFAULT_CLIP_WEIGHTS,
                   "multilingual": False}
# The toy model draws 64 px scenes and learnt guidance against the empty prompt; its scorer is
# the bilingual toy CLIP unless the recipe names another.
TOY_DEFAULTS: dict[str, Any] = {"size": (64, 64), "steps": 20, "text_guidance": 4.0,
                                "negative_prompt": "", "max_input_side": 64}
TOY_SCORING = {"model": TOY_CLIP, "pretrained": None, "multilingual": True}
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OFFLOADS = ("none", "model", "sequential", "group")
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ClipConfig:
    """The CLIP scorer: an open_clip model and its weights (None: seeded random weights)."""

    model: str = DEFAULT_CLIP
    pretrained: str | None = DEFAULT_CLIP_WEIGHTS
    multilingual: bool = False  # the text tower reads Chinese: no English twin needed

    @property
    def random_weights(self) -> bool:
        own_weights = self.model == TOY_CLIP or self.model.startswith(("hf-hub:", "local-dir:"))
        return self.pretrained is None and not own_weights


def open_clip_name(model: str) -> str:
    """The name open_clip loads: the toy CLIP is a folder of the package (its config, tokenizer
    and weights), every other name is open_clip's own."""
    return f"local-dir:{TOY_DIR / 'clip'}" if model == TOY_CLIP else model


def toy_thresholds() -> dict[str, dict[str, float]]:
    """Job kind -> {metric: threshold} for the toy CLIP, written beside the weights by
    evaluation/calibrate_scorer.py (keys starting with "_" say how they were made)."""
    return {kind: dict(values) for kind, values in toy_file("thresholds.json").items()
            if not kind.startswith("_")}


@lru_cache(maxsize=4)
def toy_file(name: str) -> dict[str, Any]:
    """A JSON file beside the toy weights ({} when absent): thresholds.json, figures.json (the
    headline figures evaluation/toy_eval.py measured, shown by the report)."""
    path = TOY_DIR / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: a private local Ray on 127.0.0.1; "auto"/host:port: join
    workers: int | None = None  # actors; None: one per GPU of the cluster (at least one)
    dashboard: bool = False  # only for a local Ray


@dataclass(frozen=True)
class RunConfig:
    model: str = DEFAULT_MODEL  # "tiny", a hub id or a local folder (absolute)
    device: str = "auto"  # auto: CUDA when there is one, else the CPU
    dtype: str = "auto"  # auto: float32 on the CPU, bfloat16 on a GPU
    offload: str = "none"  # none | model | sequential | group (see model/memory.py)
    transformer: str | None = None  # a replacing transformer (absolute path); None: the model's
    compile: bool = False  # torch.compile the transformer's blocks
    score: bool = True
    clip: ClipConfig = field(default_factory=ClipConfig)
    executor: str = "local"
    batch_size: int = DEFAULT_BATCH_SIZE  # jobs per micro-batch
    keep_attempts: bool = False
    ray: RayConfig = field(default_factory=RayConfig)

    def with_(self, **changes: Any) -> "RunConfig":
        """A copy with the given fields changed; None values leave a field as it is, so
        unset command-line flags can be passed straight through."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def compile_problem(self) -> str | None:
        """Why `compile` cannot be used with this offload mode, or None."""
        if self.compile and self.offload in ("sequential", "group"):
            return (f"works with offload none or model, not {self.offload} (its hooks run "
                    "inside the transformer's blocks, which a compiled block cannot hold)")
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """The inverse of to_dict; unknown keys (a newer version's) are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["clip"] = ClipConfig(**_known(ClipConfig, values.get("clip") or {}))
        values["ray"] = RayConfig(**_known(RayConfig, values.get("ray") or {}))
        return cls(**values)


def _known(cls, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}
