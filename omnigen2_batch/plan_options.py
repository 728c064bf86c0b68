"""A job's model options, made concrete at plan time: the speed mode applied to what the recipe
left unset, the step cache, LoRA files by content hash, and the key of a replacing transformer;
the command line's --model / --transformer resolved like the recipe's, and the RunConfig a
recipe asks for.
No torch here: model/presets.py and model/cache.py's CacheConfig import none.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

from .config import (BUILTIN_DEFAULTS, BUILTIN_SCORING, RANDOM_WEIGHTS, TOY_CLIP, TOY_MODEL,
                     TOY_SCORING, ClipConfig, RunConfig)
from .images import content_hash
from .jobs import LoraRef
from .recipe import Recipe, RecipeError


def speed_settings(explicit: Callable[[str], Any]) -> dict[str, Any]:
    """cfg_range, scheduler, cache and cache_threshold of a job. `explicit(key)` is the nearest
    level's value or None; what no level sets comes from the job's mode (exact: the built-ins),
    so an explicit value is never overridden and every job carries concrete values."""
    from .model import CacheConfig, preset

    cache = explicit("cache")
    if cache is not None:
        cache = CacheConfig(cache.kind, **({} if cache.threshold is None
                                           else {"threshold": cache.threshold}))
    chosen = preset(explicit("mode") or "exact").call_kwargs(
        cfg_range=explicit("cfg_range"), scheduler=explicit("scheduler"), cache=cache)
    made = chosen["cache"] or CacheConfig("none")
    return {"cfg_range": tuple(chosen["cfg_range"]),
            "scheduler": chosen["scheduler"] or BUILTIN_DEFAULTS["scheduler"],
            "cache": made.kind,
            "cache_threshold": made.threshold if made.kind == "teacache" else None}


class LoraRefs:
    """LoraRefs for the recipe's `lora` entries, each file hashed once per plan."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        self._keys: dict[Path, str] = {}

    def refs(self, loras) -> tuple[LoraRef, ...]:
        found: dict[str, str] = {}  # key -> where, to refuse one file listed under two names
        refs = []
        for lora in loras or ():
            key = self.key(lora.path)
            if key in found:
                self.errors.append(f"{lora.path.where}: the same file content as "
                                   f"{found[key]}; list it once with the scale you want")
            found.setdefault(key, lora.path.where)
            refs.append(LoraRef(key, str(lora.path.path), lora.scale))
        return tuple(refs)

    def key(self, file) -> str:
        if file.path not in self._keys:
            try:
                self._keys[file.path] = content_hash(file.path)
            except OSError as err:
                self._keys[file.path] = f"unreadable:{file.path}"
                self.errors.append(f"{file.where}: cannot read {file.path} ({err.strerror})")
        return self._keys[file.path]


def transformer_key(path: str | None) -> str:
    """The content key of a replacing transformer ("" for none): a file's hash, or for a folder
    one hash over its configs' and weights' hashes, so a moved copy redoes nothing and new
    weights redo everything. Hashed in full: a 8 GB fine-tune costs seconds per plan."""
    if not path:
        return ""
    source = Path(path)
    if source.is_file():
        return _hash(source)
    folder = source / "transformer" if (source / "transformer").is_dir() else source
    files = sorted(f for f in folder.iterdir()
                   if f.suffix in (".json", ".safetensors") and f.is_file())
    listing = "".join(f"{f.name}\t{_hash(f)}\n" for f in files)
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()


def _hash(path: Path) -> str:
    try:
        return content_hash(path)
    except OSError as err:
        raise RecipeError([f"transformer: cannot read {path} ({err.strerror})"]) from err


def resolve_model(spec: str) -> str:
    """A --model value: "tiny", a hub id, or a local folder (made absolute)."""
    if not spec.startswith(("/", "./", "../", "~")):
        return spec
    path = Path(spec).expanduser().resolve()
    if not path.is_dir():
        raise RecipeError([f"--model: no such model folder: {spec} (looked for {path})"])
    return str(path)


def resolve_transformer(spec: str) -> str:
    """A --transformer value: a folder or a .safetensors file (made absolute)."""
    path = Path(spec).expanduser().resolve()
    if not (path.is_dir() or path.is_file()):
        raise RecipeError([f"--transformer: no such file or folder: {spec} (looked for {path})"])
    if path.is_file() and path.suffix != ".safetensors":
        raise RecipeError([f"--transformer: expected a folder or a .safetensors file (weights "
                           f"load from safetensors only), got {spec}"])
    return str(path)


def run_config(recipe: Recipe, model: str, transformer: str | None = None) -> RunConfig:
    """The RunConfig a recipe asks for; unset scoring keys take the built-in defaults."""
    scoring = scoring_settings(recipe, model)
    pretrained = None if scoring["pretrained"] == RANDOM_WEIGHTS else scoring["pretrained"]
    return RunConfig(model=model, dtype=recipe.dtype, offload=recipe.offload,
                     transformer=transformer, compile=recipe.compile,
                     score=scoring["enabled"], executor=recipe.executor,
                     batch_size=recipe.batch_size, keep_attempts=recipe.keep_attempts,
                     clip=ClipConfig(scoring["model"], pretrained, scoring["multilingual"]))


def scoring_settings(recipe: Recipe, model: str) -> dict[str, Any]:
    """defaults.scoring over the built-ins (for model toy: its CLIP, unless the recipe names one)."""
    given = recipe.defaults.scoring
    toy = model == TOY_MODEL and getattr(given, "model", None) is None
    builtin = BUILTIN_SCORING | (TOY_SCORING if toy else {})
    return {key: default if getattr(given, key, None) is None else getattr(given, key)
            for key, default in builtin.items()}


def toy_scored(recipe: Recipe, model: str) -> bool:
    """Whether the toy CLIP scores this recipe (its calibrated thresholds then apply)."""
    return scoring_settings(recipe, model)["model"] == TOY_CLIP
