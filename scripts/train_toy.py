"""Train the toy-world models from nothing and save them in the released OmniGen2 folder layout.

    python scripts/train_toy.py --out toy-model --minutes 60 --seed 0

Trains, in this order and within one wall-clock budget: a tokenizer (the tiny one's ids and
chat format, merges learnt on the toy world's prompts), a tiny FLUX-layout VAE (16 latent
channels, no quant convs), our OmniGen2 transformer on text-to-image, then text-to-image, edit
and in-context tasks (EN + ZH instructions, caption and image dropout, weights averaged), and
an open_clip model contrastively on EN + ZH captions and captioned characters. The text encoder
is the frozen, seeded tiny Qwen2.5-VL of model/tiny.py. Then it loads the saved folder through
the normal loader, generates, judges the images from pixels, and writes a model card
(README.md) with the command, seed, time, machine and figures.

Output: transformer/ vae/ scheduler/ mllm/ processor/ model_index.json clip/ README.md, which
`omnigen2_batch.model.load_pipeline(folder)` loads and `ClipScorer("local-dir:<folder>/clip")`
scores with. Budgets are wall-clock: 60 minutes is meant for 2 quiet CPU cores.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # toy_training.py lives next to this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, when run from a checkout

import build_tiny_tokenizer  # noqa: E402
import toy_training as training  # noqa: E402
from omnigen2_batch.model import tiny  # noqa: E402
from omnigen2_batch.toy import judge  # noqa: E402
from omnigen2_batch.toy.captions import DETAILS, LANGS, caption  # noqa: E402
from omnigen2_batch.toy.characters import CHARACTER_POSITIONS, make_incontext_task  # noqa: E402
from omnigen2_batch.toy.edits import make_edit  # noqa: E402
from omnigen2_batch.toy.scenes import render, sample_scene  # noqa: E402

# Shares of the budget; the rest (~10 %) is for saving and the evaluation.
PHASES = {"vae": 0.2, "transformer": 0.62, "clip": 0.08}
MAX_FOLDER_BYTES = 25 * 1024 * 1024
MIN_VAE_PSNR = 20.0  # dB on fresh scenes; a good run reaches 25-30

TRANSFORMER_CONFIG = dict(
    patch_size=2, in_channels=16, out_channels=None, hidden_size=96, num_layers=3, num_refiner_layers=1,
    num_attention_heads=3, num_kv_heads=1, multiple_of=32, ffn_dim_multiplier=None, norm_eps=1e-5,
    axes_dim_rope=[16, 8, 8], axes_lens=[512, 128, 128], text_feat_dim=32, timestep_scale=1000.0,
)


def vae_config(widths: list[int], size: int) -> dict:
    return dict(tiny.VAE_CONFIG, block_out_channels=widths, norm_num_groups=min(8, widths[0]), sample_size=size)


def clip_config(size: int) -> dict:
    """open_clip config: a 64 px ViT and a small text tower reading the toy tokenizer (600 BPE
    tokens, Chinese split per character), so Chinese is tokenised as well as English and the
    text embedding table stays small. Padding id 600 is the highest id in plain text, so 'argmax'
    pooling reads the first padding position, which (causal) has seen the whole caption."""
    return {
        "model_cfg": {
            "embed_dim": 64,
            "vision_cfg": {"image_size": size, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 128, "vocab_size": 614, "width": 64, "heads": 4, "layers": 2,
                         "hf_tokenizer_name": "toy-bilingual", "pad_id": tiny.PAD_ID, "pool_type": "argmax"},
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                           "resize_mode": "shortest"},
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; must be empty or new)")
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget for the whole run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (a multiple of 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (1 is fastest on a busy 2-core box)")
    parser.add_argument("--vae-widths", type=int, nargs=4, default=[16, 32, 32, 32])
    parser.add_argument("--pool", type=int, default=30000, help="transformer training examples, encoded once")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on each phase's steps (for smoke tests)")
    parser.add_argument("--eval-count", type=int, default=24, help="generated images per evaluation row")
    parser.add_argument("--eval-steps", type=int, default=20, help="sampling steps in the evaluation")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.command = "python scripts/train_toy.py " + " ".join(shlex.quote(a) for a in argv)
    started, clock = datetime.datetime.now(datetime.timezone.utc), time.monotonic()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = prepare_folder(args.out)
    budget = args.minutes * 60
    figures: dict = {}

    components = tiny.build_components(seed=args.seed)  # the frozen text encoder
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer

    from omnigen2_batch.model.pipeline import OmniGen2Pipeline
    from omnigen2_batch.model.scheduler import FlowMatchEulerDiscreteScheduler
    from omnigen2_batch.model.transformer import OmniGen2Transformer2DModel

    # The tiny tokenizer's ids and chat template, with merges learnt on the toy world's prompts.
    build_tiny_tokenizer.build(out / "processor", training.toy_corpus(rng, 4000, args.size), training.CHAT_TEMPLATE)
    processor = AutoTokenizer.from_pretrained(out / "processor")
    vae = AutoencoderKL(**vae_config(args.vae_widths, args.size))
    figures |= training.train_vae(vae, rng, PHASES["vae"] * budget, args.max_steps, 16, args.size, 1e-3)
    figures |= training.calibrate_vae(vae, rng, args.size)
    figures |= vae_figures(vae, rng, args.size)
    if figures["vae_psnr_db"] < MIN_VAE_PSNR and args.max_steps is None:
        raise SystemExit(f"the VAE reconstructs at {figures['vae_psnr_db']:.1f} dB (< {MIN_VAE_PSNR}): "
                         "training it failed; a transformer on its latents would be wasted")

    pipeline = OmniGen2Pipeline(
        transformer=OmniGen2Transformer2DModel(**TRANSFORMER_CONFIG), vae=vae.requires_grad_(False),
        # No time shift: at 64 px it jumps straight past the early steps where the layout forms.
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, dynamic_time_shift=False),
        mllm=components["mllm"].requires_grad_(False), processor=processor)
    pool = training.build_pool(pipeline, rng, args.pool, args.size)
    figures |= training.train_transformer(pipeline, pool, rng, PHASES["transformer"] * budget, args.max_steps,
                                          32, 1e-3)
    save_pipeline(pipeline, out)
    figures |= train_and_save_clip(out, rng, args, PHASES["clip"] * budget)

    figures |= evaluate(out, args)
    figures["parameters"] = parameter_counts(pipeline)
    figures["folder_megabytes"] = folder_bytes(out) / 2**20
    figures["total_seconds"] = time.monotonic() - clock
    write_card(out, args, started, figures)
    print(json.dumps(figures, indent=1, default=str))
    if folder_bytes(out) > MAX_FOLDER_BYTES:
        raise SystemExit(f"{out} is {figures['folder_megabytes']:.1f} MB, over the 25 MB limit: shrink the models")


def prepare_folder(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out}: folder exists and is not empty; pass a new folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


@torch.no_grad()
def vae_figures(vae, rng, size: int) -> dict:
    """Reconstruction PSNR and how often the judge still reads the scene after the round trip:
    the ceiling for anything the transformer can draw through this VAE."""
    scenes = [sample_scene(rng, "train", rng.randint(1, 2)) for _ in range(64)]
    rebuilt, value = training.reconstruct(vae, [render(s, size) for s in scenes])
    verdicts = [judge.judge_scene(image, scene) for image, scene in zip(rebuilt, scenes)]
    figures = {"vae_psnr_db": value, "vae_judge_all": mean(v.ok for v in verdicts)}
    for name in ("background", "colour", "shape", "position", "size"):
        figures[f"vae_judge_{name}"] = mean(v.checks.get(name, False) for v in verdicts)
    print(f"[vae] reconstruction {value:.1f} dB, judge {figures['vae_judge_all']:.0%}", flush=True)
    return figures


def save_pipeline(pipeline, out: Path) -> None:
    """The released layout; safetensors only."""
    pipeline.transformer.save_pretrained(out / "transformer", safe_serialization=True)
    pipeline.vae.save_pretrained(out / "vae", safe_serialization=True)
    pipeline.scheduler.save_pretrained(out / "scheduler")
    pipeline.mllm.save_pretrained(out / "mllm", safe_serialization=True)
    pipeline.processor.save_pretrained(out / "processor")
    index = {"_class_name": "OmniGen2Pipeline", "is_tiny": False, "toy_world": True}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def train_and_save_clip(out: Path, rng, args, seconds: float) -> dict:
    """Write the config and tokenizer first, build the model from that folder (random init),
    train it, save the weights beside them: the folder is then a complete `local-dir:` model."""
    import open_clip
    from safetensors.torch import save_file

    folder = out / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(clip_config(args.size), indent=2), encoding="utf-8")
    for path in (out / "processor").iterdir():
        shutil.copy(path, folder / path.name)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    figures = training.train_clip(model, tokenizer, preprocess, rng, seconds, args.max_steps, 64, args.size, 1e-3)
    for lang in ("en", "zh"):
        figures[f"clip_top1_{lang}"] = training.clip_retrieval(model, tokenizer, preprocess, rng, args.size, lang)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return figures


def evaluate(out: Path, args) -> dict:
    """Load the folder through the normal loader, generate, and judge from pixels."""
    from omnigen2_batch.model import load_pipeline
    from omnigen2_batch.scoring import ClipScorer

    pipeline = load_pipeline(out)
    scorer = ClipScorer(f"local-dir:{out / 'clip'}")  # proves the clip folder loads as the engine loads it
    rng = random.Random(args.seed + 1)
    figures = {"clip_loads_random": scorer.random_weights}
    for split, detail, lang in itertools.product(("train", "eval"), DETAILS, LANGS):
        scenes = [sample_scene(rng, split, 1) for _ in range(args.eval_count)]
        prompts = [caption(s, lang, detail, rng.randrange(3)) for s in scenes]
        images = generate(pipeline, prompts, None, args, rng)
        verdicts = [judge.judge_caption(im, p) for im, p in zip(images, prompts)]
        figures |= judged(f"t2i_{split}_{detail}_{lang}", verdicts)
    edits = [make_edit(rng, sample_scene(rng, "train", 1), split="train") for _ in range(args.eval_count)]
    sources = [[render(e.source, args.size)] for e in edits]
    images = generate(pipeline, [e.instruction_en for e in edits], sources, args, rng)
    figures |= judged("edit_en", [judge.judge_edit(e.source, e.instruction_en, im) for e, im in zip(edits, images)])
    tasks = [make_incontext_task(rng, 1, args.size) for _ in range(args.eval_count)]
    images = generate(pipeline, [t.instruction_en for t in tasks], [list(t.references) for t in tasks], args, rng)
    figures |= judged("incontext_en", [judge.judge_incontext(list(t.references), im, t.target.background,
                                                             [p for _, p in t.target.placed])
                                       for t, im in zip(tasks, images)])
    assert all(p in CHARACTER_POSITIONS for t in tasks for _, p in t.target.placed)
    return figures


def generate(pipeline, prompts, inputs, args, rng) -> list:
    generators = [torch.Generator().manual_seed(rng.randrange(2**31)) for _ in prompts]
    images = []
    for start in range(0, len(prompts), 8):  # small batches keep memory flat
        chunk = slice(start, start + 8)
        images += pipeline(prompts[chunk], input_images=inputs[chunk] if inputs else None, height=args.size,
                           width=args.size, num_inference_steps=args.eval_steps, text_guidance_scale=4.0,
                           image_guidance_scale=2.0 if inputs else 1.0, generator=generators[chunk]).images
    return images


def judged(row: str, verdicts) -> dict:
    figures = {f"{row}_all": mean(v.ok for v in verdicts)}
    names = sorted({name for v in verdicts for name in v.checks})
    figures |= {f"{row}_{name}": mean(v.checks.get(name, False) for v in verdicts) for name in names}
    print(f"[eval] {row}: " + " ".join(f"{k[len(row) + 1:]}={v:.0%}" for k, v in figures.items()), flush=True)
    return figures


def mean(values) -> float:
    values = list(values)
    return sum(map(float, values)) / len(values) if values else 0.0


def parameter_counts(pipeline) -> dict:
    return {name: sum(p.numel() for p in getattr(pipeline, name).parameters())
            for name in ("transformer", "vae", "mllm")}


def folder_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def write_card(out: Path, args, started, figures: dict) -> None:
    machine = (f"{platform.platform()}, {os.cpu_count()} CPU cores, {args.threads} torch thread(s), "
               f"torch {torch.__version__}, Python {platform.python_version()}")
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in figures.items())
    text = f"""# Toy-world OmniGen2 (trained from nothing on synthetic shapes)

NOT OmniGen2's weights. A tiny model of the same architecture, trained on a synthetic world of
flat coloured shapes and sprite characters (omnigen2_batch/toy), so the engine's claims can be
measured with a pixel judge. It draws 64 px toy scenes only; EN and ZH prompts.

- Command: `{args.command}`
- Seed: {args.seed}; budget {args.minutes} min; per-phase step cap: {args.max_steps}
- Started: {started.isoformat(timespec='seconds')}; took {figures['total_seconds']:.0f} s
- Machine: {machine}
- Layout: transformer/ vae/ scheduler/ mllm/ processor/ (load with
  `omnigen2_batch.model.load_pipeline(folder)`), clip/ (`ClipScorer("local-dir:<folder>/clip")`).
- The mllm is the frozen random tiny Qwen2.5-VL of model/tiny.py (seed {args.seed}): a fixed
  text featuriser, not a language model. The processor is the tiny tokenizer's ids with merges
  learnt on the toy world's prompts (a word, or a Chinese character, per token) and a chat
  template of the user turn alone: a random featuriser cannot follow a system prompt, and its
  45 tokens would triple every step's text.

## Figures

Evaluation rows are fractions of generated images the judge accepts (t2i: train / held-out
combinations; `all` = every stated attribute right).

| figure | value |
|---|---|
{rows}
"""
    (out / "README.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
