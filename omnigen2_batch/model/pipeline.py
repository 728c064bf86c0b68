"""OmniGen2Pipeline: text (+ input images) -> images, for a LIST of prompts in one call.

The steps follow the reference pipeline (see tests/fixtures/parity/README.md, "FACTS"), with
three deliberate differences that make a batched call equal to its items run one by one:
- every output image may have its own generator (its seed): its initial noise and, for its
  prompt, the sampling of the input images' VAE posteriors come from that generator only (the
  reference samples the posterior from the global RNG);
- prompt embeddings and masks are repeated per image consistently (p0,p0,p1,p1 for both);
- text padding is harmless: the transformer attends through key-padding masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .cache import CacheConfig
from .guidance import TextRows, active_branches, combine, stack_branches
from .lora import LoraSet
from .scheduler import make_scheduler
from .transformer import _right_padded_lengths

SYSTEM_PROMPT = "You are a helpful assistant that generates high-quality images based on user instructions."
DEFAULT_SIZE = 1024
OUTPUT_TYPES = ("pil", "pt", "latent")


@dataclass
class OmniGen2PipelineOutput(BaseOutput):
    """`images`: PIL images, a [N,3,H,W] tensor in [0,1] ("pt"), or final latents ("latent");
    N = len(prompts) * num_images_per_prompt, ordered prompt by prompt."""

    images: list[PIL.Image.Image] | torch.Tensor


def fit_size(width: int, height: int, max_pixels: int, max_side: int, multiple: int = 16) -> tuple[int, int]:
    """(width, height) scaled down (never up) to <= max_pixels and <= max_side, floored to `multiple`."""
    # The same float expressions as the reference, so the floors land on the same integers.
    ratio = min((max_pixels / (width * height)) ** 0.5, max_side / max(width, height), 1.0)
    return int(width * ratio) // multiple * multiple, int(height * ratio) // multiple * multiple


def preprocess_image(image: PIL.Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """[1,3,H,W] in [-1,1]: LANCZOS-resized to exactly `size` (w, h); the aspect may shift slightly."""
    resized = image.convert("RGB").resize(size, resample=PIL.Image.LANCZOS)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """[N,3,H,W] in [0,1] -> RGB PIL images (rounded to the nearest level)."""
    array = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [PIL.Image.fromarray(item) for item in array]


def _repeat(tensor: torch.Tensor | None, times: int) -> torch.Tensor | None:
    return None if tensor is None else tensor.repeat_interleave(times, dim=0)


class OmniGen2Pipeline(DiffusionPipeline):
    """transformer + FLUX-style VAE + flow scheduler + Qwen2.5-VL text encoder (`mllm`).

    `processor` is the Qwen2.5-VL processor or just its tokenizer (only the tokenizer is used
    to encode prompts). `mllm` may be None when callers always pass prompt embeddings.
    """

    model_cpu_offload_seq = "mllm->transformer->vae"
    _optional_components = ["mllm"]

    def __init__(self, transformer, vae, scheduler, mllm, processor, is_tiny: bool = False):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler, mllm=mllm,
                              processor=processor)
        self.register_to_config(is_tiny=is_tiny)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.loras = LoraSet(transformer)  # adapters by name; a call picks the active ones
        # Quiet by default: callers show their own per-job progress.
        self.set_progress_bar_config(disable=True)

    @property
    def is_tiny(self) -> bool:
        """True for the random tiny model: its images are noise and must be labelled so."""
        return bool(self.config.is_tiny)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def size_multiple(self) -> int:
        """Image sides are multiples of this: VAE downsampling x transformer patch size."""
        return self.vae_scale_factor * self.transformer.config.patch_size

    @torch.no_grad()
    def __call__(
        self,
        prompt: Sequence[str] | str | None = None,
        input_images: Sequence[Sequence[PIL.Image.Image]] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,  # the official pipeline's defaults; recipes set their own
        text_guidance_scale: float = 4.0,
        image_guidance_scale: float = 1.0,
        cfg_range: tuple[float, float] = (0.0, 1.0),
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        max_pixels: int = 1024 * 1024,
        max_input_image_side_length: int = 1024,
        align_res: bool = True,
        scheduler: str | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        ref_latents: Sequence[Sequence[torch.Tensor]] | None = None,
        max_sequence_length: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        cache: CacheConfig | None = None,
        lora: dict[str, float] | None = None,
        batch_guidance: bool = True,
    ):
        """Generate `num_images_per_prompt` images for each prompt.

        prompt: a list of prompts (a single string is taken as [prompt]); may be None when
            `prompt_embeds` is given. input_images: per prompt, a list of PIL images (the same
            count and sizes for every prompt: the caller groups such prompts). generator: one
            generator for the whole call, or one per output image (its seed). scheduler: "euler" |
            "dpmsolver++" | None (the pipeline's own). ref_latents: per prompt, precomputed
            normalised VAE latents [16,h,w] of its input images (replaces their VAE
            encode; input_images still decide the sizes).
            callback_on_step_end(pipeline, step, t, {"latents", "model_output", "cache_modes"}) runs
            after each step; cache_modes maps each branch run to one letter per image (F computed,
            S skipped by TeaCache, T predicted by TaylorSeer).
            cache: a step cache for this call only (CacheConfig; None: exact). lora: adapter name ->
            scale for this call (loaded with `load_lora`); none is active otherwise.
            batch_guidance: run all guidance branches of a step in one transformer batch.
        Returns OmniGen2PipelineOutput (or a 1-tuple) with one image per prompt per requested image.
        """
        # 1. Check inputs and normalise their shapes.
        prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        batch = self._batch_size(prompts, prompt_embeds)
        images = self._check_images(input_images, batch)
        negatives = self._check_negatives(negative_prompt, batch)
        n = num_images_per_prompt
        generators = self._check_generator(generator, batch * n)
        self._check_options(cfg_range, output_type, n, num_inference_steps)
        device = self._execution_device
        dtype = self.transformer.dtype

        # 2. Decide the sizes: inputs resized to multiples of 16; the output from the single
        #    input (align_res) or from height/width capped at max_pixels.
        input_sizes = self._input_sizes(images, max_pixels, max_input_image_side_length)
        (gen_w, gen_h), (out_w, out_h) = self._output_sizes(height, width, input_sizes, align_res, max_pixels)

        # 3. Encode the prompts (and the negatives when text guidance is on).
        text_cfg = text_guidance_scale > 1.0
        cond = self._text(prompts, prompt_embeds, prompt_attention_mask, n, max_sequence_length, device, dtype)
        uncond = (self._text(negatives, negative_prompt_embeds, negative_prompt_attention_mask, n,
                             max_sequence_length, device, dtype) if text_cfg else None)

        # 4. Initial noise: each output image's from its own generator (or one shared draw).
        latents = self.prepare_latents(batch * n, gen_h, gen_w, dtype, device, generator)

        # 5. Encode the input images with the VAE (posterior sampled from the prompt's generator).
        refs = self._reference_latents(images, input_sizes, ref_latents, generators, generator, n, batch,
                                       device, dtype)
        if not images and ref_latents is None:
            image_guidance_scale = 1.0  # nothing to guide towards

        # 6. Set up the sampler for this resolution.
        sampler = self._sampler(scheduler)
        latent_tokens = (gen_h // self.vae_scale_factor) * (gen_w // self.vae_scale_factor)
        sampler.set_timesteps(num_inference_steps, device=device, num_tokens=latent_tokens)

        # 7. Denoise: per step 1-3 guidance branches (one batch or one pass each) combined by
        #    classifier-free guidance; this call's own step cache and LoRA set.
        num_steps = len(sampler.timesteps)
        step_cache = cache.make(num_steps) if cache is not None else None
        batches = {}  # branch tuple -> stacked inputs, built once per call
        with self.loras.active(lora, device, dtype):
            for step, t in enumerate(self.progress_bar(sampler.timesteps)):
                guided = cfg_range[0] <= step / num_steps <= cfg_range[1]
                scales = (text_guidance_scale, image_guidance_scale) if guided else (1.0, 1.0)
                branches = active_branches(*scales, uncond is not None)
                velocities = self._branch_velocities(latents, t, step, branches, cond, uncond, refs,
                                                     step_cache, batches if batch_guidance else None)
                velocity = combine(velocities, *scales)
                latents = sampler.step(velocity, t, latents, return_dict=False)[0].to(self.vae.dtype)
                if callback_on_step_end is not None:
                    modes = _modes(step_cache, branches, len(cond.lengths))
                    callback_on_step_end(self, step, t, {"latents": latents, "model_output": velocity,
                                                         "cache_modes": modes})

        # 8. Decode, resize to the requested size, map to [0,1].
        output = latents if output_type == "latent" else self._decode(latents, out_h, out_w)
        if output_type == "pil":
            output = to_pil(output)
        self.maybe_free_model_hooks()
        return OmniGen2PipelineOutput(images=output) if return_dict else (output,)

    # -- input checks -------------------------------------------------------------------------

    @staticmethod
    def _batch_size(prompts, prompt_embeds) -> int:
        if prompt_embeds is not None:
            if prompts is not None and len(prompts) != prompt_embeds.shape[0]:
                raise ValueError(f"prompt: {len(prompts)} prompts but prompt_embeds has "
                                 f"{prompt_embeds.shape[0]} rows; pass one row per prompt")
            return prompt_embeds.shape[0]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt: pass a non-empty list of strings (or prompt_embeds)")
        return len(prompts)

    @staticmethod
    def _check_images(input_images, batch: int) -> list[list[PIL.Image.Image]]:
        """[] when no prompt has images; else per prompt a list, all of the same length."""
        if input_images is None:
            return []
        if len(input_images) != batch:
            raise ValueError(f"input_images: {len(input_images)} entries for {batch} prompts; pass one "
                             "list of images per prompt ([] for none)")
        counts = {len(items) for items in input_images}
        if len(counts) > 1:
            raise ValueError(f"input_images: prompts have different numbers of images {sorted(counts)}; "
                             "call the pipeline separately for each group")
        if counts == {0}:
            return []
        for p, items in enumerate(input_images):
            for j, image in enumerate(items):
                if not isinstance(image, PIL.Image.Image):
                    raise TypeError(f"input_images[{p}][{j}]: expected a PIL image, got {type(image).__name__}")
        return [list(items) for items in input_images]

    def _input_sizes(self, images, max_pixels: int, max_side: int) -> list[tuple[int, int]]:
        """(w, h) each input position is resized to; the same for every prompt or an error."""
        sizes = []
        for j in range(len(images[0]) if images else 0):
            per_prompt = [fit_size(*items[j].size, max_pixels, max_side, self.size_multiple) for items in images]
            for p, size in enumerate(per_prompt):
                if size != per_prompt[0]:
                    raise ValueError(
                        f"input_images[{p}][{j}]: {images[p][j].size} resizes to {size}, but prompt 0's "
                        f"image {j} to {per_prompt[0]}; one call needs the same image sizes for every prompt")
            if 0 in per_prompt[0]:
                raise ValueError(f"input_images[0][{j}]: {images[0][j].size} is too small; each side must "
                                 f"keep at least {self.size_multiple} pixels after resizing")
            sizes.append(per_prompt[0])
        return sizes

    @staticmethod
    def _check_negatives(negative_prompt, batch: int) -> list[str]:
        if negative_prompt is None or isinstance(negative_prompt, str):
            return [negative_prompt or ""] * batch
        if len(negative_prompt) != batch:
            raise ValueError(f"negative_prompt: {len(negative_prompt)} entries for {batch} prompts")
        return list(negative_prompt)

    @staticmethod
    def _check_generator(generator, count: int) -> list[torch.Generator] | None:
        """The generator of each output image, or None when one generator (or none) serves all."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != count:
                raise ValueError(f"generator: {len(generator)} generators for {count} output images; pass "
                                 "one generator, or one per prompt per image")
            return list(generator)
        return None

    @staticmethod
    def _check_options(cfg_range, output_type, n, steps) -> None:
        if len(cfg_range) != 2 or not 0.0 <= cfg_range[0] <= cfg_range[1] <= 1.0:
            raise ValueError(f"cfg_range: expected (start, end) with 0 <= start <= end <= 1, got {cfg_range}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        if n < 1 or steps < 1:
            raise ValueError(f"num_images_per_prompt and num_inference_steps must be >= 1, got {n} / {steps}")

    # -- sizes ------------------------------------------------------------------------------

    def _output_sizes(self, height, width, input_sizes, align_res: bool, max_pixels: int):
        """((w, h) generated, (w, h) returned). A single input with align_res fixes both;
        otherwise the request is capped at max_pixels, floored to the size multiple, and the
        decoded image resized back to the request."""
        if len(input_sizes) == 1 and align_res:
            return input_sizes[0], input_sizes[0]
        height, width = height or DEFAULT_SIZE, width or DEFAULT_SIZE
        ratio = min((max_pixels / (height * width)) ** 0.5, 1.0)
        m = self.size_multiple
        generated = (int(width * ratio) // m * m, int(height * ratio) // m * m)
        if 0 in generated:
            raise ValueError(f"height/width: {height}x{width} is too small; each side needs >= {m} pixels")
        return generated, (width, height)

    # -- text -------------------------------------------------------------------------------

    def apply_chat_template(self, prompt: str) -> str:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def encode_prompts(self, prompts: list[str], max_sequence_length: int | None = None, device=None):
        """(embeds [B,L,D], mask [B,L]) from the MLLM's last hidden layer, right-padded to the longest."""
        if self.mllm is None:
            raise ValueError("this pipeline has no mllm: pass prompt_embeds (and negative_prompt_embeds)")
        tokens = self.tokenizer(
            [self.apply_chat_template(p) for p in prompts], padding="longest", padding_side="right",
            truncation=True, max_length=max_sequence_length or self.tokenizer.model_max_length,
            return_tensors="pt")
        device = device or self._execution_device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        # Called on the whole model (not .model) so CPU-offload hooks see the call.
        hidden = self.mllm(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        return hidden.to(self.mllm.dtype), mask

    def _text(self, texts, embeds, mask, n: int, max_sequence_length, device, dtype) -> TextRows:
        """One row per output image (p0,p0,p1,p1 for n=2), embeddings and masks alike; the valid
        lengths are read once here so the transformer never has to."""
        if embeds is None:
            embeds, mask = self.encode_prompts(texts, max_sequence_length, device)
        elif mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        lengths = _right_padded_lengths(mask)
        return TextRows(_repeat(embeds.to(device, dtype), n), _repeat(mask.to(device), n),
                        [length for length in lengths for _ in range(n)])

    # -- latents ----------------------------------------------------------------------------

    def prepare_latents(self, count: int, height: int, width: int, dtype, device, generator=None):
        """Initial noise [count,16,h/8,w/8]; with a list of generators, item i from generator i."""
        shape = (count, self.transformer.config.in_channels,
                 height // self.vae_scale_factor, width // self.vae_scale_factor)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def encode_image(self, image: PIL.Image.Image, size: tuple[int, int], generator=None) -> torch.Tensor:
        """Normalised latent [16,h,w] of one input: a posterior sample from `generator`."""
        pixels = preprocess_image(image, size).to(self._execution_device, self.vae.dtype)
        sample = self.vae.encode(pixels).latent_dist.sample(generator=generator)
        config = self.vae.config
        return ((sample - (config.shift_factor or 0.0)) * config.scaling_factor)[0]

    def _reference_latents(self, images, input_sizes, ref_latents, generators, generator, n, batch,
                           device, dtype) -> list[list[torch.Tensor] | None]:
        """Per output image, its prompt's input latents (None without inputs)."""
        if ref_latents is not None:
            if len(ref_latents) != batch:
                raise ValueError(f"ref_latents: {len(ref_latents)} entries for {batch} prompts")
            per_prompt = [[lat.to(device, dtype) for lat in items] or None for items in ref_latents]
        elif images:
            prompt_generators = generators[::n] if generators else [generator] * batch
            per_prompt = [[self.encode_image(image, size, gen).to(dtype) for image, size in zip(items, input_sizes)]
                          for items, gen in zip(images, prompt_generators)]
        else:
            per_prompt = [None] * batch
        return [refs for refs in per_prompt for _ in range(n)]

    # -- denoising --------------------------------------------------------------------------

    def _sampler(self, name: str | None):
        """A fresh sampler per call (samplers keep per-run state): the named one, or a copy of
        the pipeline's own."""
        if name is None:
            return self.scheduler.__class__.from_config(self.scheduler.config)
        return make_scheduler(name, self.scheduler.config.dynamic_time_shift)

    def _branch_velocities(self, latents, t, step, branches, cond, uncond, refs, step_cache, batches):
        """{branch: velocity}: one stacked transformer batch (`batches` caches its inputs), or one
        pass per branch when `batches` is None."""
        if batches is None:
            return {branch: self._velocity(latents, t, step, stack_branches((branch,), cond, uncond, refs),
                                           step_cache) for branch in branches}
        if branches not in batches:
            batches[branches] = stack_branches(branches, cond, uncond, refs)
        stacked = self._velocity(latents.repeat(len(branches), 1, 1, 1), t, step, batches[branches], step_cache)
        return dict(zip(branches, stacked.chunk(len(branches))))

    def _velocity(self, latents, t, step, batch, step_cache) -> torch.Tensor:
        if step_cache is not None:
            step_cache.begin(step, batch.row_keys())
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        return self.transformer(latents, timestep, batch.text.embeds, None, batch.text.mask,
                                ref_image_hidden_states=batch.refs, text_lens=batch.text.lengths,
                                step_cache=step_cache)

    # -- LoRA -------------------------------------------------------------------------------

    def load_lora(self, path, name: str | None = None) -> str:
        """Load a LoRA safetensors file as adapter `name` (default: the file stem); it acts only
        in calls that name it in `lora=`. Returns the name."""
        return self.loras.load(path, name)

    def unload_lora(self, name: str) -> None:
        self.loras.unload(name)

    def _decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[N,3,height,width] in [0,1]. One image at a time: a batch of large images would
        multiply the decoder's activation memory."""
        config = self.vae.config
        images = []
        for item in latents.to(self.vae.dtype).split(1):
            z = item / config.scaling_factor + (config.shift_factor or 0.0)
            decoded = self.vae.decode(z, return_dict=False)[0]
            decoded = F.interpolate(decoded, size=(height, width), mode="bilinear")
            images.append((decoded / 2 + 0.5).clamp(0, 1))
        return torch.cat(images)


def _modes(step_cache, branches, rows: int) -> dict[str, list[str]]:
    """Per branch, the cache mode letter of each image at this step (all F without a cache)."""
    if step_cache is None:
        return {branch: ["F"] * rows for branch in branches}
    return {branch: [step_cache.modes[(branch, i)] for i in range(rows)] for branch in branches}
