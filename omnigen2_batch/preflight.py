"""Preflight: can this machine run the recipe? Checked before any work starts (`run`, and
`validate --deep`), so that a missing model file or scorer weight is reported in seconds with
what to do, not found an hour into a cluster job.

It resolves the model (a local folder, or a hub id through huggingface_hub's cache) and checks
every component's configs and safetensors headers without loading weights; it finds the CLIP
weights file (a local file, or an open_clip tag in the hub cache or open_clip's URL cache); and
it checks that the requested device exists.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from .config import ClipConfig, RunConfig, open_clip_name
from .errors import UnavailableError

PROBE_TIMEOUT = 5.0  # seconds to wait for a Ray head to accept a connection
OPEN_CLIP_DEFAULT_FILE = "open_clip_pytorch_model.bin"  # open_clip's name when hf_hub has none


def preflight(config: RunConfig) -> None:
    """Raise UnavailableError listing every problem; return quietly when all is in place."""
    problems = _device_problems(config.device) + _model_problems(config.model)
    if config.executor == "ray":
        problems += ray_address_problems(config.ray.address)
    problems += _transformer_problems(config.transformer)
    if config.score:
        problems += clip_problems(config.clip)
    if problems:
        raise UnavailableError("this machine cannot run the recipe yet:\n" +
                               "\n".join(f"  {p}" for p in problems), errors=problems)


def _device_problems(device: str) -> list[str]:
    from .worker import resolve_device  # the check the worker makes, made before any work

    try:
        resolve_device(device)
    except UnavailableError as err:
        return [str(err)]
    return []


def ray_address_problems(address: str | None) -> list[str]:
    """Ray retries a head that does not answer for minutes: find out in seconds. (None starts
    a local Ray; "auto" is resolved by Ray itself, which fails fast.)"""
    if not address or address == "auto":
        return []
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=PROBE_TIMEOUT).close()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        return [f"--ray-address {address}: no Ray head answers there ({reason}); start one "
                "with `ray start --head`, or pass its host:port (or auto)"]
    return []


def _model_problems(model: str) -> list[str]:
    if model == "tiny":  # built from code; the toy model is a folder, checked like any other
        return []
    from .model.loading import COMPONENTS, ModelLoadError, check_component, resolve_folder

    try:
        folder = resolve_folder(model)
        for name in COMPONENTS:
            check_component(folder, name)
    except ModelLoadError as err:
        return [str(err)]
    return []


def _transformer_problems(transformer: str | None) -> list[str]:
    """A replacing transformer is where it was planned, with its configs and weights (checked
    the way load_pipeline reads it, without loading the weights)."""
    if transformer is None:
        return []
    from .model.loading import ModelLoadError, check_component, check_directory

    path = Path(transformer)
    try:
        if path.is_file():
            return [] if path.suffix == ".safetensors" else [
                f"transformer {transformer}: only .safetensors weights are loaded"]
        if (path / "transformer").is_dir():
            check_component(path, "transformer")
        elif path.is_dir():
            check_directory(path, "transformer")
        else:
            return [f"transformer {transformer}: no such file or folder"]
    except ModelLoadError as err:
        return [f"transformer: {err}"]
    return []


def clip_problems(clip: ClipConfig) -> list[str]:
    """Why the scorer's model or weights cannot be had here ([] when they can)."""
    import open_clip

    from .scoring import register_configs

    register_configs()
    name = open_clip_name(clip.model)
    if name.startswith("local-dir:"):
        return _clip_folder_problems(clip.model, Path(name.removeprefix("local-dir:")))
    if name.startswith("hf-hub:"):
        return []  # brings its own weights; open_clip reports a missing one itself
    if name not in open_clip.list_models():
        return [f"scoring.model {name!r}: not an open_clip model; see open_clip.list_models()"]
    if clip.pretrained is None:
        return []  # seeded random weights: nothing to find (scores are meaningless)
    return _weights_problems(name, clip.pretrained)


def _clip_folder_problems(model: str, folder: Path) -> list[str]:
    """An open_clip model folder needs its config and its weights."""
    config = folder / "open_clip_config.json"
    weights = [p for p in folder.glob("open_clip_*") if p.suffix in (".safetensors", ".bin")]
    if not config.is_file() or not weights:
        missing = config.name if not config.is_file() else "open_clip_model.safetensors"
        return [f"scoring.model {model!r}: {folder} lacks {missing}; reinstall the package or name "
                "another CLIP under defaults.scoring"]
    return []


def _weights_problems(model: str, pretrained: str) -> list[str]:
    import open_clip

    path = Path(pretrained).expanduser()
    if path.suffix or os.sep in pretrained:
        if not path.is_file():
            return [f"scoring.pretrained {pretrained!r}: no such weights file ({path.resolve()})"]
        return []
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        return [f"scoring.pretrained {pretrained!r}: not a weights tag of {model} (known: {tags}), "
                "nor a weights file path"]
    if _cached(cfg):
        return []
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or not cfg.get("hf_hub"):
        where = _source(cfg)
        return [f"scoring.pretrained {pretrained!r} of {model}: the weights file is not on this "
                f"machine ({where}) and offline mode forbids downloading it; fetch it on a "
                "machine with network into the Hugging Face cache, or pass a local file with "
                "scoring.pretrained: /path/to/weights.safetensors"]
    return []  # online: open_clip downloads it into the hub cache when the scorer loads


def _cached(cfg: dict) -> bool:
    """Whether open_clip will find the tag's weights without a download."""
    if cfg.get("file"):
        return Path(cfg["file"]).is_file()
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = _hub_file(cfg)
        candidates = [filename] + ([filename[:-4] + ".safetensors"] if filename.endswith(".bin") else [])
        return any(isinstance(try_to_load_from_cache(repo, name), str) for name in candidates)
    if cfg.get("url"):
        return (Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])).is_file()
    return False


def _source(cfg: dict) -> str:
    if cfg.get("hf_hub"):
        return "hub repo {}, file {}".format(*_hub_file(cfg))
    return cfg.get("url") or cfg.get("file") or "unknown source"


def _hub_file(cfg: dict) -> tuple[str, str]:
    """open_clip's "org/name/file" (or "org/name/" for its default file) as (repo, file)."""
    repo, filename = os.path.split(cfg["hf_hub"])
    return repo, filename or OPEN_CLIP_DEFAULT_FILE
