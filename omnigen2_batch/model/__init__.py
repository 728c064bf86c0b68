"""Our own OmniGen2: transformer, pipeline, samplers, loading (and the tiny offline model).

Exports resolve lazily so that importing the package (e.g. from the CLI) does not import torch.
"""
from importlib import import_module

_EXPORTS = {
    "OmniGen2Pipeline": ".pipeline",
    "OmniGen2Transformer2DModel": ".transformer",
    "load_pipeline": ".loading",
    "ModelLoadError": ".loading",
    "CacheConfig": ".cache",
    "OFFLOAD_MODES": ".memory",
    "SpeedPreset": ".presets",
    "preset": ".presets",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
