"""LoRA adapters for the transformer: load several by name, choose the active set per call.

An adapted Linear computes y = W x + sum over active adapters of s * (alpha / r) * B (A x), with s
the per-call scale. Adapters never touch the base weights: every Linear of the transformer is a
`LoraLinear` (an nn.Linear with the same parameter names, so checkpoints load unchanged) holding
the active adapters stacked into one low-rank pair, None outside a call that names adapters.
Switching adapters or scales between calls costs nothing and the next call is exact again. Being
buffers read in forward (not hooks added later), the pair is seen by torch.compile.

File format (what the official OmniGen2 training writes, PEFT key names with a `transformer.`
prefix): `transformer.<module path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], e.g.
`transformer.layers.0.attn.to_q.lora_A.weight`. Unlike the official loader (which ignores it), an
optional `<module path>.alpha` scalar is honoured; without it alpha = r (scaling 1).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PREFIXES = ("transformer.", "base_model.model.")  # official save / raw PEFT export
SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".alpha": "alpha"}


@dataclass
class LoraLayer:
    down: torch.Tensor  # A [r, in]
    up: torch.Tensor  # B [out, r]
    scaling: float  # alpha / r

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoraAdapter:
    name: str
    path: str
    layers: dict[str, LoraLayer]  # module path in the transformer -> its low-rank pair

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())


def read_lora_file(path: str | os.PathLike) -> dict[str, LoraLayer]:
    """Module path -> LoraLayer from a safetensors LoRA file; errors name the offending keys."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"lora {path}: only .safetensors files are loaded")
    parts: dict[str, dict] = {}
    unknown = []
    for key, tensor in load_file(str(path)).items():
        stripped = next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)
        suffix = next((s for s in SUFFIXES if stripped.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        parts.setdefault(stripped[: -len(suffix)], {})[SUFFIXES[suffix]] = tensor
    if unknown:
        raise ValueError(f"lora {path}: keys not in the PEFT format (<module>.lora_A/B.weight): "
                         f"{unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
    layers = {}
    for module, found in sorted(parts.items()):
        if "A" not in found or "B" not in found:
            raise ValueError(f"lora {path}: {module} needs both lora_A and lora_B weights")
        down, up = found["A"].float(), found["B"].float()
        if down.shape[0] != up.shape[1]:
            raise ValueError(f"lora {path}: {module} has lora_A rank {down.shape[0]} but lora_B rank {up.shape[1]}")
        alpha = float(found["alpha"]) if "alpha" in found else float(down.shape[0])
        layers[module] = LoraLayer(down, up, alpha / down.shape[0])
    if not layers:
        raise ValueError(f"lora {path}: no LoRA weights found")
    return layers


class LoraSet:
    """The adapters loaded for one transformer, by name."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.adapters: dict[str, LoraAdapter] = {}

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def load(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Read an adapter and check it against the transformer; returns its name (default: file stem)."""
        name = name or Path(path).stem
        layers = read_lora_file(path)
        for module_path, layer in layers.items():
            try:
                module = self.transformer.get_submodule(module_path)
            except AttributeError:
                raise ValueError(f"lora {path}: the transformer has no module {module_path!r}") from None
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"lora {path}: {module_path} is a {type(module).__name__}, not a Linear")
            if layer.down.shape[1] != module.in_features or layer.up.shape[0] != module.out_features:
                raise ValueError(f"lora {path}: {module_path} expects [{module.out_features}x{module.in_features}], "
                                 f"the adapter gives [{layer.up.shape[0]}x{layer.down.shape[1]}]")
        self.adapters[name] = LoraAdapter(name, str(path), layers)
        return name

    def unload(self, name: str) -> None:
        self.adapters.pop(name, None)

    @contextmanager
    def active(self, scales: dict[str, float] | None, device=None, dtype=None):
        """Within the block the named adapters act with their scales; outside nothing does.
        Their weights are placed on `device` in `dtype` (default: the transformer's)."""
        scales = {name: float(s) for name, s in (scales or {}).items() if s != 0}
        missing = sorted(set(scales) - set(self.adapters))
        if missing:
            raise ValueError(f"lora: no adapter named {missing} is loaded (loaded: {self.names})")
        device = device or self.transformer.device
        dtype = dtype or self.transformer.dtype
        per_module: dict[str, list] = {}
        for name, scale in scales.items():
            for module_path, layer in self.adapters[name].layers.items():
                per_module.setdefault(module_path, []).append((layer, scale * layer.scaling))
        modules = {path: self.transformer.get_submodule(path) for path in per_module}
        try:
            for path, module in modules.items():
                module.set_lora(*stack_terms(per_module[path], device, dtype))
            yield
        finally:
            for module in modules.values():
                module.set_lora(None, None)


def stack_terms(terms, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Several (layer, scale) as ONE low-rank pair: down = [A1; A2], up = [s1 B1, s2 B2], so
    sum s_i B_i A_i x = up (down x) costs two matmuls whatever the number of adapters."""
    down = torch.cat([layer.down for layer, _ in terms])
    up = torch.cat([scale * layer.up for layer, scale in terms], dim=1)
    return down.to(device, dtype), up.to(device, dtype)


class LoraLinear(nn.Linear):
    """nn.Linear plus the active low-rank pair (lora_down [r, in], lora_up [out, r]), None when off.

    The pair are non-persistent buffers: outside the state dict, moved with the module, and graph
    inputs to torch.compile, so changing adapters or scales reuses the compiled code.
    """

    def set_lora(self, down: torch.Tensor | None, up: torch.Tensor | None) -> None:
        self.register_buffer("lora_down", down, persistent=False)
        self.register_buffer("lora_up", up, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.lora_down is not None:
            out = out + F.linear(F.linear(x, self.lora_down), self.lora_up)
        return out


def make_adaptable(model: nn.Module) -> None:
    """Turn every nn.Linear of `model` into a LoraLinear sharing the same parameters."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                # Built on `meta` (no memory), then given the very same Parameter objects.
                adaptable = LoraLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                       device="meta")
                adaptable.weight, adaptable.bias = child.weight, child.bias
                adaptable.set_lora(None, None)
                setattr(parent, child_name, adaptable)
