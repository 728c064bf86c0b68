"""The three training loops behind scripts/train_toy.py: VAE, OmniGen2 transformer, open_clip.

Each loop runs until its time slice is spent (budgets are wall-clock on the machine at hand) or
an optional step cap is reached, and returns its figures. The VAE and CLIP draw fresh data from
the toy world every step; the transformer samples a pool of examples encoded once (text
embeddings, latents), text-to-image alone first, then every task. Everything is seeded.
Nothing here saves files: train_toy.py owns the output folder.
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

from omnigen2_batch.toy.captions import DETAILS, random_caption
from omnigen2_batch.toy.characters import make_incontext_task, render_characters
from omnigen2_batch.toy.edits import make_edit
from omnigen2_batch.toy.scenes import default_layout, render, sample_scene

TASKS = {"t2i": 0.45, "edit": 0.3, "incontext": 0.25}  # share of each task in the pool and the VAE's data
# The transformer's curriculum: (until this share of its time, task shares). Text-to-image alone
# first: mixed from the start, edits and in-context shots slowed the t2i it rests on several-fold.
CURRICULUM = ((0.4, {"t2i": 1.0}), (1.0, TASKS))


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
        detail = rng.choice(DETAILS)
        if detail == "short":  # what a short caption leaves open goes where the world puts it
            scene = default_layout(scene)
        return Example(kind, random_caption(scene, rng, lang, detail)[0], [], render(scene, size))
    if kind == "edit":
        edit = make_edit(rng, sample_scene(rng, "train", rng.randint(1, 2)), split="train")
        return Example(kind, edit.instruction(lang), [render(edit.source, size)], render(edit.target, size))
    task = make_incontext_task(rng, subjects=rng.choice((1, 2)), size=size)
    return Example(kind, task.instruction(lang), list(task.references), render_characters(task.target, size))


# The toy's chat template: the user turn alone. Its text encoder is a fixed random featuriser
# that no system prompt can instruct, and that prompt's 45 tokens (with the toy tokenizer) would
# triple every training and sampling step's text sequence.
CHAT_TEMPLATE = "{% for message in messages %}{% if message['role'] == 'user' %}<|im_start|>user\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"


def toy_corpus(rng: random.Random, count: int, size: int) -> list[str]:
    """Prompts of every task in both languages: the toy tokenizer's training text."""
    return [make_example(rng, random_kind(rng), size).prompt for _ in range(count)]


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
    """L1 + MSE reconstruction + a tiny KL (1e-6): the KL only keeps the posterior from collapsing.
    Clipped gradients and a decaying rate: at a constant 1e-3 one run blew up in its last steps
    (28 dB to 11 dB) and took the transformer's whole phase down with it."""
    optimiser = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    clock, losses = Clock("vae", seconds, max_steps), []
    vae.train()
    while clock.running():
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(lr, clock.step, clock.seconds / seconds)
        images = to_tensor(vae_images(rng, batch, size))
        posterior = vae.encode(images).latent_dist
        decoded = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(decoded, images) + F.mse_loss(decoded, images) + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
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


@dataclass
class Pool:
    """Training examples encoded once: text embeddings, target latents, reference latents.
    Encoding afresh every step cost as much as the transformer step itself; a pool of tens of
    thousands of examples, each seen a few times with fresh noise and time, trains as well."""

    kinds: list[str]
    embeds: list[torch.Tensor]  # [length, D] each, padding cut off
    targets: torch.Tensor  # [N, C, h, w]
    refs: list[list[torch.Tensor]]  # [C, h, w] latents of each example's inputs (may be empty)
    empty: torch.Tensor  # the empty prompt's embedding: caption dropout, the guidance negative

    def __len__(self) -> int:
        return len(self.embeds)

    def indices(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == kind]


@torch.no_grad()
def build_pool(pipeline, rng: random.Random, count: int, size: int, chunk: int = 64) -> Pool:
    kinds, embeds, targets, refs = [], [], [], []
    for start in range(0, count, chunk):
        examples = [make_example(rng, random_kind(rng), size) for _ in range(min(chunk, count - start))]
        kinds += [ex.kind for ex in examples]
        hidden, mask = pipeline.encode_prompts([ex.prompt for ex in examples])
        embeds += [h[: int(m.sum())].clone() for h, m in zip(hidden, mask)]
        latents = list(normalised_latents(pipeline.vae, [ex.target for ex in examples]
                                          + [im for ex in examples for im in ex.inputs]))
        targets += latents[:len(examples)]
        rest = latents[len(examples):]
        for ex in examples:
            refs.append(rest[:len(ex.inputs)])
            rest = rest[len(ex.inputs):]
    hidden, mask = pipeline.encode_prompts([""])
    return Pool(kinds, embeds, torch.stack(targets), refs, hidden[0, : int(mask[0].sum())].clone())


def pool_batch(pool: Pool, rng: random.Random, batch: int, picks: list[int], caption_dropout: float,
               image_dropout: float):
    """(prompt embeds, mask, target latents, per-sample ref latents or None) for one step.

    Dropout teaches the unconditional branches that guidance needs: an empty prompt (the
    pipeline's negative) with and without the input images.
    """
    texts = [pool.empty if rng.random() < caption_dropout else pool.embeds[i] for i in picks]
    embeds = torch.nn.utils.rnn.pad_sequence(texts, batch_first=True)
    mask = torch.zeros(embeds.shape[:2], dtype=torch.long)
    for row, text in enumerate(texts):
        mask[row, : len(text)] = 1
    refs = [pool.refs[i] if pool.refs[i] and rng.random() >= image_dropout else None for i in picks]
    return embeds, mask, pool.targets[picks], refs


class Ema:
    """Exponential moving average of the weights: what gets saved. A short run's raw weights
    jitter with the last batches; their average samples markedly cleaner images."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        weight = 1 - min(self.decay, (1 + self.updates) / (10 + self.updates))  # warm up from a plain copy
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].lerp_(value.detach(), weight)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)


def learning_rate(base: float, step: int, progress: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay over the time budget to a tenth of `base`."""
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_transformer(pipeline, pool: Pool, rng: random.Random, seconds: float, max_steps: int | None, batch: int,
                      lr: float, caption_dropout: float = 0.1, image_dropout: float = 0.1,
                      ema_decay: float = 0.999) -> dict:
    """Flow matching in the pipeline's convention: x_t = t x1 + (1 - t) x0 (x0 noise, x1 data),
    target velocity x1 - x0, which the Euler sampler integrates from t = 0 to 1."""
    model = pipeline.transformer.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    ema = Ema(model, ema_decay)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    clock, losses = Clock("transformer", seconds, max_steps), []
    by_kind = {kind: pool.indices(kind) for kind in TASKS}
    while clock.running():
        progress = clock.seconds / seconds
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(lr, clock.step, progress)
        stage = next(shares for until, shares in CURRICULUM if progress < until or until == 1.0)
        shares = {kind: share for kind, share in stage.items() if by_kind[kind]}  # a tiny pool may lack one
        kinds = rng.choices(list(shares), weights=list(shares.values()), k=batch)
        picks = [rng.choice(by_kind[kind]) for kind in kinds]
        embeds, mask, x1, refs = pool_batch(pool, rng, batch, picks, caption_dropout, image_dropout)
        x0 = torch.randn(x1.shape, generator=generator)
        t = sample_times(len(x1), generator)
        xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
        velocity = model(xt, t, embeds, None, mask, ref_image_hidden_states=refs)
        loss = F.mse_loss(velocity, x1 - x0)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        ema.update(model)
        losses.append(loss.item())
        clock.tick(loss=np.mean(losses[-50:]))
    ema.copy_to(model)
    model.eval()
    return {"transformer_steps": clock.step, "transformer_seconds": clock.seconds,
            "transformer_final_loss": float(np.mean(losses[-50:])), "transformer_pool": len(pool)}


# -- CLIP ----------------------------------------------------------------------------------------

CLIP_CHARACTER_SHARE = 0.3


def clip_batch(rng: random.Random, batch: int, size: int) -> tuple[list[Image.Image], list[str]]:
    """Scenes with an EN or ZH caption each, and characters captioned by their parts: the
    in-context score compares sprites image to image, so the image tower must see what tells
    one character from another, wherever it stands."""
    images, captions = [], []
    for _ in range(batch):
        if rng.random() < CLIP_CHARACTER_SHARE:
            task = make_incontext_task(rng, subjects=1, size=size)
            character, _ = task.target.placed[0]
            images.append(render_characters(task.target, size))
            captions.append(f"a character: {character.describe()}")
        else:
            scene = sample_scene(rng, "train", rng.randint(1, 2))
            images.append(render(scene, size))
            captions.append(random_caption(scene, rng)[0])
    return images, captions


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
