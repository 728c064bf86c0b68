"""load_pipeline: "tiny" | "toy" | a local folder in the released layout | a Hugging Face hub id.

The released layout is transformer/, vae/, scheduler/, mllm/, processor/ (model_index.json is
optional). Weights load from safetensors only and no remote code ever runs. Every file is checked
before the heavy loading starts, so a missing or corrupt component names its folder and file.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from ..config import TOY_DIR, TOY_MODEL
from ..errors import UnavailableError

log = logging.getLogger(__name__)

COMPONENTS = ("transformer", "vae", "scheduler", "mllm", "processor")
WEIGHT_STEMS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "mllm": "model"}
# What a hub download fetches: configs, safetensors weights, tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(UnavailableError):
    """A model could not be loaded; the message names the folder/file and what to do."""


def load_pipeline(spec: str | os.PathLike = "tiny", device: str | torch.device = "cpu",
                  dtype: torch.dtype | str | None = None, offload: str | bool = "none",
                  transformer: str | os.PathLike | None = None, compile: bool = False):
    """An OmniGen2Pipeline ready on `device`.

    spec: "tiny", "toy" (the toy-world model shipped in the package), a folder in the released
    layout, or a hub id. dtype None means float32 on the
    CPU and bfloat16 elsewhere. offload: "none" | "model" | "sequential" | "group" (memory.py says
    what each costs; True/False mean "model"/"none"). transformer: replaces the spec's transformer
    with one from another place: a transformer folder (config.json + safetensors), a model folder
    holding transformer/, or a single .safetensors state dict for the spec's own config (e.g. a
    fine-tune). compile: compile the transformer's blocks with torch.compile (one compiled block
    reused by every layer; the first calls of each new shape are slow).
    """
    from .memory import place, resolve_offload

    torch_dtype = resolve_dtype(dtype, device)
    mode = resolve_offload(offload)
    if compile and mode in ("sequential", "group"):
        raise ValueError(f"compile: works with offload none or model, not {mode!r} (its hooks run inside the blocks)")
    if str(spec) == "tiny":
        from .tiny import build_tiny_pipeline

        pipeline = build_tiny_pipeline()
        if torch_dtype != torch.float32:
            pipeline.to(dtype=torch_dtype)
    else:
        pipeline = load_folder(resolve_folder(spec), torch_dtype)
    if transformer is not None:
        replace_transformer(pipeline, transformer, torch_dtype)
    place(pipeline, device, mode)
    if compile:
        compile_transformer(pipeline.transformer)
    return pipeline


BLOCK_VARIANTS = 16  # compiled variants of the block code the process may keep (see below)


def compile_transformer(transformer, **compile_kwargs) -> None:
    """torch.compile every transformer block in place (regional compilation: the block code is
    compiled once per variant and shared by all layers). fullgraph: a graph break is an error, not
    a slowdown. Variants: masked or not x modulated or not (context refiner) x LoRA on or off = 8,
    above dynamo's default limit of 8 per code object once a shape is re-specialised, so the
    process-wide limit is raised to BLOCK_VARIANTS (it never lowers a larger setting)."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, BLOCK_VARIANTS)
    transformer.compile_repeated_blocks(**{"fullgraph": True, "dynamic": True, **compile_kwargs})


def replace_transformer(pipeline, source: str | os.PathLike, dtype: torch.dtype) -> None:
    """Swap in a transformer from a folder, a model folder, or a .safetensors file (see load_pipeline)."""
    path = Path(source).expanduser()
    if path.is_file():
        transformer = _transformer_from_state_dict(pipeline.transformer, path, dtype)
    elif (path / "transformer").is_dir():
        check_component(path, "transformer")
        transformer = _load_component(path / "transformer", "transformer", dtype)
    elif path.is_dir():
        check_directory(path, "transformer")
        transformer = _load_component(path, "transformer", dtype)
    else:
        raise ModelLoadError(f"transformer {str(source)!r}: no such folder or file")
    pipeline.register_modules(transformer=transformer)
    pipeline.loras.transformer = transformer


def _transformer_from_state_dict(base, path: Path, dtype: torch.dtype):
    """A transformer of `base`'s config with the weights of one safetensors file (all keys, exactly)."""
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise ModelLoadError(f"transformer {path}: only .safetensors weights are loaded")
    _check_safetensors(path)
    state = load_file(str(path))
    expected = set(base.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelLoadError(f"transformer {path}: keys do not fit the model's config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); pass a transformer folder with its config.json")
    transformer = type(base).from_config(base.config)
    transformer.load_state_dict(state, strict=True)
    return transformer.to(dtype).eval()


def resolve_dtype(dtype: torch.dtype | str | None, device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_folder(spec: str | os.PathLike) -> Path:
    """"toy": the package's toy-world folder; a local folder as is; a hub id through
    huggingface_hub (its cache, HF_HUB_OFFLINE)."""
    if str(spec) == TOY_MODEL:
        return TOY_DIR
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    text = str(spec)
    if path.exists() or not HUB_ID.match(text):
        raise ModelLoadError(f"model {text!r}: not a folder in the OmniGen2 layout and not a hub id "
                             "(owner/name); pass 'tiny', 'toy', a folder with transformer/ vae/ scheduler/ "
                             "mllm/ processor/, or e.g. OmniGen2/OmniGen2")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # hub errors are many (offline, missing, auth); all mean the same here
        raise ModelLoadError(
            f"model {text!r}: not a local folder, and the hub download failed ({type(exc).__name__}: "
            f"{exc}). With HF_HUB_OFFLINE=1 it must already be in the Hugging Face cache; otherwise "
            "check the id and your network, or pass a local folder") from exc


def load_folder(folder: Path, dtype: torch.dtype):
    from .pipeline import OmniGen2Pipeline

    for name in COMPONENTS:
        check_component(folder, name)
    components = {name: _load_component(folder / name, name, dtype) for name in COMPONENTS}
    return OmniGen2Pipeline(**components, is_tiny=_model_index(folder).get("is_tiny", False))


def check_component(folder: Path, name: str) -> None:
    """Raise ModelLoadError unless folder/name holds its configs and (readable) weights."""
    directory = folder / name
    if not directory.is_dir():
        raise ModelLoadError(f"{folder}: missing component folder '{name}/' (the OmniGen2 layout has "
                             f"{', '.join(c + '/' for c in COMPONENTS)})")
    check_directory(directory, name)


def check_directory(directory: Path, kind: str) -> None:
    """The checks of `check_component` for a folder holding a component of this kind."""
    required = {"scheduler": ["scheduler_config.json"], "processor": ["tokenizer_config.json"]}
    for filename in required.get(kind, ["config.json"]):
        if not (directory / filename).is_file():
            raise ModelLoadError(f"{directory}: missing {filename}")
    if kind == "processor" and not ((directory / "tokenizer.json").is_file()
                                    or (directory / "vocab.json").is_file()):
        raise ModelLoadError(f"{directory}: missing tokenizer.json (or vocab.json + merges.txt)")
    for path in sorted(directory.glob("*.json")):
        _read_json(path)
    if kind in WEIGHT_STEMS:
        for path in _weight_files(directory, WEIGHT_STEMS[kind]):
            _check_safetensors(path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable JSON ({exc}); restore the file from the model release") from exc


def _weight_files(directory: Path, stem: str) -> list[Path]:
    single = directory / f"{stem}.safetensors"
    index = directory / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing or not shards:
            raise ModelLoadError(f"{index}: shard files missing: {missing or 'none listed'}")
        return [directory / s for s in shards]
    raise ModelLoadError(f"{directory}: missing {single.name} (or {index.name}); only safetensors "
                         "weights are loaded")


def _check_safetensors(path: Path) -> None:
    """Read the header; safetensors also checks that the data section has the declared length."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # SafetensorError and OSError: both mean an unusable file
        raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({exc}); download it again") from exc


def _model_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    return _read_json(index) if index.is_file() else {}


def _load_component(directory: Path, name: str, dtype: torch.dtype):
    try:
        return _LOADERS[name](directory, dtype)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{directory}: could not load the {name} ({type(exc).__name__}: {exc})") from exc


def _load_transformer(directory: Path, dtype):
    from .transformer import OmniGen2Transformer2DModel

    return OmniGen2Transformer2DModel.from_pretrained(directory, torch_dtype=dtype, use_safetensors=True).eval()


def _load_vae(directory: Path, dtype):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(directory, torch_dtype=dtype, use_safetensors=True).eval()


def _load_mllm(directory: Path, dtype):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        directory, dtype=dtype, use_safetensors=True, trust_remote_code=False).eval()


def _load_scheduler(directory: Path, dtype):
    from .scheduler import SCHEDULERS

    path = directory / "scheduler_config.json"
    class_name = _read_json(path).get("_class_name", "FlowMatchEulerDiscreteScheduler")
    classes = {cls.__name__: cls for cls in SCHEDULERS.values()}
    if class_name not in classes:
        raise ModelLoadError(f"{path}: _class_name {class_name!r} is not one of {sorted(classes)}")
    return classes[class_name].from_pretrained(directory)


def _load_processor(directory: Path, dtype):
    """The full Qwen2.5-VL processor when its image config is there (the MLLM can then see
    images), else just the tokenizer (all that prompt encoding needs)."""
    from transformers import AutoProcessor, AutoTokenizer

    has_image_config = any((directory / f).is_file() for f in ("preprocessor_config.json", "processor_config.json"))
    loader = AutoProcessor if has_image_config else AutoTokenizer
    return loader.from_pretrained(directory, trust_remote_code=False)


_LOADERS = {"transformer": _load_transformer, "vae": _load_vae, "scheduler": _load_scheduler,
            "mllm": _load_mllm, "processor": _load_processor}
