"""Where the weights live during a run: the `offload` modes of `load_pipeline`.

Weight memory of the released model at bf16 (2 bytes per parameter): transformer 3.97 B params =
7.9 GB (its largest block 105 M = 0.21 GB, largest single Linear 26 M = 52 MB); MLLM
(Qwen2.5-VL-3B) ~3.75 B = 7.5 GB (its token embedding alone 311 M = 0.62 GB); VAE ~84 M = 0.17 GB.
Accelerator memory each mode needs for the weights, plus activations on top (at 1024x1024 with
three guidance branches, roughly 1-2 GB in the transformer and a few GB in the VAE decoder):

- "none": everything resident on the device: ~15.6 GB. Fastest.
- "model": one whole model on the device at a time (mllm -> transformer -> vae, accelerate's
  model CPU offload): ~7.9 GB (the transformer). Each call moves the models over once: a few
  seconds per call over PCIe, small next to 50 denoising steps.
- "group": diffusers group offloading, one block of each model at a time (with a CUDA stream the
  next block is copied while the current one runs): ~0.6-1 GB (the MLLM embedding table and one
  block). Copies every block every step: slower, much less than "sequential".
- "sequential": leaf-level offloading, every leaf module (Linear, norm, embedding) copied in just
  before it runs and dropped after: ~0.6 GB (the largest leaf, the MLLM token embedding).
  Slowest by far (every weight crosses the bus on every step, in small pieces).

All modes give the same pixels; they only trade speed for memory. They also work with the CPU as
the execution device (the hooks then move weights from the CPU to the CPU), which is how the
tests check them on a machine without an accelerator.
"""
from __future__ import annotations

import torch

OFFLOAD_MODES = ("none", "model", "sequential", "group")


def resolve_offload(offload) -> str:
    """The mode name; True/False (the older boolean option) mean "model"/"none"."""
    if offload is None or offload is False:
        return "none"
    if offload is True:
        return "model"
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload: expected one of {OFFLOAD_MODES}, got {offload!r}")
    return offload


def place(pipeline, device, offload: str) -> None:
    """Put the pipeline's models on `device` according to the offload mode."""
    device = torch.device(device)
    if offload == "none":
        pipeline.to(device)
    elif offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    else:
        # "sequential" = diffusers' leaf-level group offloading, the same scheme as accelerate's
        # sequential offload (which fails on transformers 5's Qwen2.5-VL when moving weights back).
        kind = {"sequential": "leaf_level", "group": "block_level"}[offload]
        extra = {"num_blocks_per_group": 1} if kind == "block_level" else {}
        pipeline.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                      offload_type=kind, use_stream=device.type == "cuda", **extra)
