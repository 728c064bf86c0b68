"""The three training loops behind scripts/train_toy.py: VAE, OmniGen2 transformer, open_clip.

Each loop runs until its time slice is spent (budgets are wall-clock on the machine at hand) or
an optional step cap is reached, draws its data fresh from the toy world with a seeded RNG, and
returns its figures. Nothing here saves files: train_toy.py owns the output folder.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from omnigen2_batch.toy.captions import random_caption
from omnigen2_batch.toy.characters import make_incontext_task, render_characters
from omnigen2_batch.toy.edits import make_edit
from omnigen2_batch.toy.scenes import render, sample_scene

TASKS = {"t2i": 0.5, "edit": 0.3, "incontext": 0.2}  # share of each task in a transformer batch


@dataclass
class Example:
    kind: str
    prompt: str
    inputs: list[Image.Image]  # what the model sees (edit source, character references)
    target: Image.Image


def make_example(rng: random.Random, kind: str, size: int) -> Example:
    """One fresh training example of `kind` from the train split, instruction in EN or ZH."""
    lang = rng.choice(("en", "zh"))
    if kind == "t2i":
        scene = sample_scene(rng, "train", rng.randint(1, 2))
        return Example(kind, random_caption(scene, rng, lang)[0], [], render(scene, size))
    if kind == "edit":
        edit = make_edit(rng, sample_scene(rng, "train", rng.randint(1, 2)), split="train")
        return Example(kind, edit.instruction(lang), [render(edit.source, size)], render(edit.target, size))
    task = make_incontext_task(rng, subjects=rng.choice((1, 2)), size=size)
    return Example(kind, task.instruction(lang), list(task.references), render_characters(task.target, size))


def random_kind(rng: random.Random) -> str:
    return rng.choices(list(TASKS), weights=list(TASKS.values()))[0]


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """[N,3,H,W] in [-1, 1], the VAE's input range."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1,1] batches."""
    mse = F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-10))


class Clock:
    """Stops a loop at a wall-clock deadline or a step cap, and prints progress every `every` s."""

    def __init__(self, name: str, seconds: float, max_steps: int | None, every: float = 30.0):
        self.name, self.deadline, self.max_steps, self.every = name, time.monotonic() + seconds, max_steps, every
        self.start = self.last_print = time.monotonic()
        self.step = 0

    def running(self) -> bool:
        over = time.monotonic() >= self.deadline or (self.max_steps is not None and self.step >= self.max_steps)
        return self.step == 0 or not over  # at least one step, so every phase is exercised

    def tick(self, **figures) -> None:
        self.step += 1
        now = time.monotonic()
        if now - self.last_print >= self.every or not self.running():
            shown = " ".join(f"{k}={v:.4g}" for k, v in figures.items())
            print(f"[{self.name}] step {self.step} ({now - self.start:.0f}s) {shown}", flush=True)
            self.last_print = now

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start


# -- VAE -----------------------------------------------------------------------------------------

def vae_images(rng: random.Random, count: int, size: int) -> list[Image.Image]:
    """Targets and inputs of every task, so the VAE sees scenes and characters alike."""
    images = []
    while len(images) < count:
        example = make_example(rng, random_kind(rng), size)
        images += [example.target, *example.inputs]
    return images[:count]


def train_vae(vae, rng: random.Random, seconds: float, max_steps: int | None, batch: int, size: int, lr: float) -> dict:
    """L1 + MSE reconstruction + a tiny KL (1e-6): the KL only keeps the posterior from collapsing."""
    optimiser = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    clock, losses = Clock("vae", seconds, max_steps), []
    vae.train()
    while clock.running():
        images = to_tensor(vae_images(rng, batch, size))
        posterior = vae.encode(images).latent_dist
        decoded = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(decoded, images) + F.mse_loss(decoded, images) + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        clock.tick(loss=np.mean(losses[-20:]), psnr=psnr(decoded.detach(), images))
    vae.eval()
    return {"vae_steps": clock.step, "vae_seconds": clock.seconds, "vae_final_loss": float(np.mean(losses[-20:]))}


@torch.no_grad()
def calibrate_vae(vae, rng: random.Random, size: int, count: int = 256) -> dict:
    """Measure the latents' mean and spread and write shift/scale into the VAE's config, so the
    transformer sees roughly unit-variance latents (as FLUX's factors do for its VAE)."""
    latents = torch.cat([vae.encode(to_tensor(vae_images(rng, 32, size))).latent_dist.mean
                         for _ in range(max(1, count // 32))])
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return {"vae_shift_factor": shift, "vae_scaling_factor": scale}


@torch.no_grad()
def reconstruct(vae, images: list[Image.Image]) -> tuple[list[Image.Image], float]:
    """VAE round trip of `images` (posterior mean) and its PSNR."""
    pixels = to_tensor(images)
    decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    array = ((decoded.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array], psnr(decoded, pixels)


# -- transformer ---------------------------------------------------------------------------------

@torch.no_grad()
def normalised_latents(vae, images: list[Image.Image]) -> torch.Tensor:
    """Posterior samples scaled as the pipeline scales them ((z - shift) * scale)."""
    z = vae.encode(to_tensor(images)).latent_dist.sample()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def sample_times(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Half uniform, half logit-normal (more weight mid-way, where structure is decided)."""
    uniform = torch.rand(batch, generator=generator)
    logit_normal = torch.sigmoid(torch.randn(batch, generator=generator))
    return torch.where(torch.arange(batch) % 2 == 0, uniform, logit_normal)


def transformer_batch(pipeline, rng: random.Random, batch: int, size: int, caption_dropout: float,
                      image_dropout: float):
    """(prompt embeds, mask, target latents, per-sample ref latents or None) for one step.

    Dropout teaches the unconditional branches that guidance needs: an empty prompt (the
    pipeline's negative) with and without the input images.
    """
    examples = [make_example(rng, random_kind(rng), size) for _ in range(batch)]
    prompts = ["" if rng.random() < caption_dropout else ex.prompt for ex in examples]
    embeds, mask = pipeline.encode_prompts(prompts)
    kept = [ex.inputs if ex.inputs and rng.random() >= image_dropout else [] for ex in examples]
    # One VAE call for targets and inputs together: per-example calls cost more than the encoding.
    latents = list(normalised_latents(pipeline.vae, [ex.target for ex in examples] + [im for k in kept for im in k]))
    targets, rest = torch.stack(latents[:batch]), latents[batch:]
    refs = []
    for inputs in kept:
        refs.append(rest[:len(inputs)] or None)
        rest = rest[len(inputs):]
    return embeds.detach(), mask, targets, refs


def train_transformer(pipeline, rng: random.Random, seconds: float, max_steps: int | None, batch: int,
                      size: int, lr: float, caption_dropout: float = 0.1, image_dropout: float = 0.1) -> dict:
    """Flow matching in the pipeline's convention: x_t = t x1 + (1 - t) x0 (x0 noise, x1 data),
    target velocity x1 - x0, which the Euler sampler integrates from t = 0 to 1."""
    model = pipeline.transformer.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    clock, losses = Clock("transformer", seconds, max_steps), []
    while clock.running():
        embeds, mask, x1, refs = transformer_batch(pipeline, rng, batch, size, caption_dropout, image_dropout)
        x0 = torch.randn(x1.shape, generator=generator)
        t = sample_times(len(x1), generator)
        xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
        velocity = model(xt, t, embeds, None, mask, ref_image_hidden_states=refs)
        loss = F.mse_loss(velocity, x1 - x0)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        losses.append(loss.item())
        clock.tick(loss=np.mean(losses[-50:]))
    model.eval()
    return {"transformer_steps": clock.step, "transformer_seconds": clock.seconds,
            "transformer_final_loss": float(np.mean(losses[-50:]))}


# -- CLIP ----------------------------------------------------------------------------------------

def clip_batch(rng: random.Random, batch: int, size: int) -> tuple[list[Image.Image], list[str]]:
    """Scenes with a caption each, half English, half Chinese."""
    scenes = [sample_scene(rng, "train", rng.randint(1, 2)) for _ in range(batch)]
    return [render(s, size) for s in scenes], [random_caption(s, rng)[0] for s in scenes]


def train_clip(model, tokenizer, preprocess, rng: random.Random, seconds: float, max_steps: int | None,
               batch: int, size: int, lr: float) -> dict:
    """Symmetric InfoNCE on (image, EN or ZH caption) pairs."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    clock, losses = Clock("clip", seconds, max_steps), []
    model.train()
    while clock.running():
        images, captions = clip_batch(rng, batch, size)
        image_features = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        labels = torch.arange(len(images))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        clock.tick(loss=np.mean(losses[-20:]))
    model.eval()
    return {"clip_steps": clock.step, "clip_seconds": clock.seconds, "clip_final_loss": float(np.mean(losses[-20:]))}


@torch.no_grad()
def clip_retrieval(model, tokenizer, preprocess, rng: random.Random, size: int, lang: str, count: int = 64) -> float:
    """Top-1 accuracy of picking each image's own caption among `count` captions in `lang`."""
    scenes = [sample_scene(rng, "train", 1) for _ in range(count)]
    images = torch.stack([preprocess(render(s, size)) for s in scenes])
    texts = tokenizer([random_caption(s, rng, lang)[0] for s in scenes])
    similarity = F.normalize(model.encode_image(images), dim=-1) @ F.normalize(model.encode_text(texts), dim=-1).T
    return (similarity.argmax(dim=1) == torch.arange(count)).float().mean().item()
