"""Seconds per image of our OmniGen2 pipeline.

    python evaluation/bench_model.py                   # tiny model, CPU, real text path (MLLM)
    python evaluation/bench_model.py --full            # GPU: full-size random weights, bf16
    python evaluation/bench_model.py --full --dry      # the --full scenarios on tiny parts (sanity, CPU)
    python evaluation/bench_model.py --modes           # exact vs `mode: fast`: s/image and PSNR

--full builds the released sizes with random weights: the transformer per the parity README
(3.97 B parameters), a FLUX.1-size VAE, and NO MLLM: prompts are random text embeddings of width
2048 (Qwen2.5-VL-3B's hidden size) with different lengths per prompt, so the timings cover the
transformer, the VAE and the sampler, not prompt encoding (one MLLM pass per call, small next to
50 steps). Scenarios: t2i, t2i with cfg_range (0, 0.6), an edit with one input (three transformer
passes per step), 4 different prompts in one call, and 8 different prompts at half size in one call.
Weights are random, so only the timings mean anything.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnigen2_batch.model.pipeline import OmniGen2Pipeline  # noqa: E402

FULL_TRANSFORMER = dict(
    patch_size=2, in_channels=16, out_channels=None, hidden_size=2520, num_layers=32,
    num_refiner_layers=2, num_attention_heads=21, num_kv_heads=7, multiple_of=256,
    ffn_dim_multiplier=None, norm_eps=1e-5, axes_dim_rope=[40, 40, 40],
    axes_lens=[10000, 10000, 10000], text_feat_dim=2048, timestep_scale=1000.0,
)
FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=1024,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    mid_block_add_attention=True,
)
PROMPT_LENGTHS = [96, 57, 120, 33, 80, 64, 101, 45]  # tokens per prompt: padding is exercised
NEGATIVE_LENGTH = 40


def embedding_pipeline(full: bool, device: str, dtype: torch.dtype) -> OmniGen2Pipeline:
    """transformer + VAE + Euler, no MLLM: full size (random) or the tiny parts."""
    from diffusers import AutoencoderKL

    from omnigen2_batch.model import tiny
    from omnigen2_batch.model.scheduler import FlowMatchEulerDiscreteScheduler
    from omnigen2_batch.model.transformer import OmniGen2Transformer2DModel

    if full:
        transformer = built_on(device, dtype, OmniGen2Transformer2DModel, FULL_TRANSFORMER)
        vae = built_on(device, dtype, AutoencoderKL, FLUX_VAE)
        processor = tiny.build_components()["processor"]  # unused: prompts come as embeddings
    else:
        parts = tiny.build_components()
        transformer, vae, processor = parts["transformer"], parts["vae"], parts["processor"]
    pipe = OmniGen2Pipeline(transformer=transformer.eval(), vae=vae.eval(), mllm=None, processor=processor,
                            scheduler=FlowMatchEulerDiscreteScheduler())
    return pipe.to(device)


def built_on(device: str, dtype: torch.dtype, cls, config: dict):
    """A randomly initialised model created directly on `device` in `dtype` (no float32 copy:
    the full transformer alone is 16 GB in float32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(**config)
    finally:
        torch.set_default_dtype(previous)


def random_text(count: int, lengths: list[int], width: int, device, dtype, seed: int):
    """Right-padded random embeddings [count, max(lengths), width] and their masks."""
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths[:count])
    embeds = torch.randn(count, longest, width, generator=generator).to(device, dtype)
    mask = (torch.arange(longest)[None] < torch.tensor(lengths[:count])[:, None]).long().to(device)
    return embeds, mask


def noise_image(size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def scenarios(size: int) -> list[tuple[str, int, dict]]:
    """(name, prompts in the call, extra kwargs)."""
    half = max(size // 2 // 16 * 16, 16)
    return [
        (f"t2i {size}x{size}", 1, dict(height=size, width=size)),
        (f"t2i {size}x{size} cfg_range (0,0.6)", 1, dict(height=size, width=size, cfg_range=(0.0, 0.6))),
        (f"edit, one {size}x{size} input", 1, dict(input_images=[[noise_image(size)]])),
        (f"4 prompts {size}x{size}, one call", 4, dict(height=size, width=size)),
        (f"8 prompts {half}x{half}, one call", 8, dict(height=half, width=half)),
    ]


def timed(pipe, device: str, **kwargs) -> tuple[float, float]:
    """(seconds, peak GiB or nan on the CPU) of one pipeline call."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe(output_type="pil", **kwargs)
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
    return time.perf_counter() - start, peak


def run_embedding_scenarios(pipe, device, dtype, size, steps) -> None:
    width = pipe.transformer.config.text_feat_dim
    warm = random_text(1, PROMPT_LENGTHS, width, device, dtype, 0)
    pipe(prompt_embeds=warm[0], prompt_attention_mask=warm[1], height=size, width=size,
         num_inference_steps=1, text_guidance_scale=1.0, output_type="pil")  # warm-up
    for name, count, extra in scenarios(size):
        cond = random_text(count, PROMPT_LENGTHS, width, device, dtype, 1)
        uncond = random_text(count, [NEGATIVE_LENGTH] * count, width, device, dtype, 2)
        if "input_images" in extra:
            extra = dict(extra, input_images=extra["input_images"] * count)
        seconds, peak = timed(
            pipe, device, prompt_embeds=cond[0], prompt_attention_mask=cond[1],
            negative_prompt_embeds=uncond[0], negative_prompt_attention_mask=uncond[1],
            num_inference_steps=steps, text_guidance_scale=5.0, image_guidance_scale=2.0,
            generator=[torch.Generator().manual_seed(i) for i in range(count)], **extra)
        print(f"{name:40s} {steps:3d} steps  {seconds / count:8.3f} s/image  peak {peak:6.2f} GiB")


def run_tiny(device: str, size: int, steps: int) -> None:
    from omnigen2_batch.model import load_pipeline

    start = time.perf_counter()
    pipe = load_pipeline("tiny", device=device)
    print(f"load_pipeline('tiny'): {time.perf_counter() - start:.2f} s")
    prompts = ["a red fox in the snow", "一只猫睡在木桌上", "a lighthouse on a rocky coast, watercolor",
               "a robot reading a book", "a bowl of ramen", "a knight on a white horse", "a city at night",
               "a bear having a picnic"]
    pipe(prompts[:1], height=size, width=size, num_inference_steps=1)  # warm-up
    for count in (1, 8):
        seconds, _ = timed(pipe, device, prompt=prompts[:count], height=size, width=size,
                           num_inference_steps=steps,
                           generator=[torch.Generator().manual_seed(i) for i in range(count)])
        print(f"tiny {size}x{size} {count} prompt(s) {steps} steps: {seconds / count:.3f} s/image")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (inf when identical)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def run_modes(device: str, size: int, steps: int, count: int = 4) -> None:
    """exact vs fast on the tiny model: seconds per image and the PSNR of fast against exact.

    The tiny model's images are noise, so the PSNR only says how far the fast path drifts from the
    exact one on this model, not how an image looks; on real weights drift is usually smaller.
    """
    from omnigen2_batch.model import load_pipeline
    from omnigen2_batch.model.presets import EXACT, FAST

    pipe = load_pipeline("tiny", device=device)
    prompts = ["a red fox in the snow", "a lighthouse on a rocky coast", "a bowl of ramen", "a robot reading"][:count]
    common = dict(prompt=prompts, height=size, width=size, num_inference_steps=steps, output_type="pt",
                  text_guidance_scale=4.0)
    pipe(prompts[:1], height=size, width=size, num_inference_steps=1)  # warm-up
    results = {}
    for preset in (EXACT, FAST):
        start = time.perf_counter()
        images = pipe(generator=[torch.Generator().manual_seed(i) for i in range(count)],
                      **preset.call_kwargs(), **common).images
        results[preset.name] = (images, (time.perf_counter() - start) / count)
    for name, (_, seconds) in results.items():
        print(f"mode {name:5s} tiny {size}x{size} {count} prompts {steps} steps: {seconds:.3f} s/image")
    print(f"PSNR fast vs exact: {psnr(results['fast'][0], results['exact'][0]):.1f} dB; "
          f"speed-up x{results['exact'][1] / results['fast'][1]:.2f}")


def run_compile(device: str, size: int, steps: int) -> None:
    """compile: true with inductor, the real option (the tests compile with aot_eager, which
    checks the graph capture in seconds): first-call cost, s/image, and max |compiled - eager|."""
    from omnigen2_batch.model import load_pipeline

    common = dict(prompt=["a red fox in the snow"], height=size, width=size,
                  num_inference_steps=steps, output_type="pt")
    images = {}
    for compiled in (False, True):
        pipe = load_pipeline("tiny", device=device, compile=compiled)
        start = time.perf_counter()
        pipe(generator=[torch.Generator().manual_seed(0)], **common)
        first = time.perf_counter() - start
        start = time.perf_counter()
        images[compiled] = pipe(generator=[torch.Generator().manual_seed(0)], **common).images
        print(f"compile={compiled!s:5s} first call {first:7.2f} s, then "
              f"{time.perf_counter() - start:.3f} s/image")
    print(f"max |compiled - eager| = {(images[True] - images[False]).abs().max().item():.2e} "
          "(the contract: <= 1e-4)")


def main() -> None:
    parser = argparse.ArgumentParser(description="Seconds per image of the OmniGen2 pipeline.")
    parser.add_argument("--full", action="store_true", help="full-size random weights (needs a GPU)")
    parser.add_argument("--dry", action="store_true", help="with --full: tiny parts, to check the script")
    parser.add_argument("--size", type=int, help="image side (default 1024 full, 64 otherwise)")
    parser.add_argument("--steps", type=int, help="sampling steps (default 50 full, 10 tiny, 1 dry)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", action="store_true", help="exact vs mode: fast on the tiny model")
    parser.add_argument("--compile", action="store_true", help="inductor-compiled vs eager, tiny model")
    args = parser.parse_args()
    if args.compile:
        run_compile(args.device, args.size or 64, args.steps or 10)
        return
    if args.modes:
        run_modes(args.device, args.size or 64, args.steps or 28)
        return
    if not args.full:
        run_tiny(args.device, args.size or 64, args.steps or 10)
        return
    if not args.dry and not args.device.startswith("cuda"):
        parser.error("--full needs a CUDA device (add --dry to check the script on tiny parts)")
    dtype = torch.float32 if args.dry else torch.bfloat16
    pipe = embedding_pipeline(full=not args.dry, device=args.device, dtype=dtype)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"transformer {params / 1e6:.1f} M parameters, {dtype}, {args.device}; MLLM skipped "
          "(random text embeddings)")
    run_embedding_scenarios(pipe, args.device, dtype, args.size or (64 if args.dry else 1024),
                            args.steps or (1 if args.dry else 50))


if __name__ == "__main__":
    main()
