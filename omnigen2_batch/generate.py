"""PipelineGenerator: GenRequests in, one image each out, micro-batched through the pipeline.

Requests that agree on everything but prompt, negative prompt, input pixels and seed
(`GenRequest.batch_key`) share one pipeline call; each keeps its own seed through a generator of
its own, so an image does not depend on what it was batched with. LoRA adapters are loaded once
per worker, named by their content hash, and chosen per call (switching them costs nothing and
never reloads the model); the step cache is chosen per call too.
"""
from __future__ import annotations

from typing import Sequence

from .jobs import GenRequest

CRITIQUE_QUESTION = (
    'This image was generated for the prompt: "{prompt}". What in the image does not match the '
    "prompt? Answer with one short instruction that would fix it, or 'nothing' if it matches.")


class PipelineGenerator:
    """Wraps an OmniGen2Pipeline. max_batch_size caps the images per pipeline call (None: no cap)."""

    def __init__(self, pipeline, max_batch_size: int | None = None):
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        self.pipeline = pipeline
        self.max_batch_size = max_batch_size

    @property
    def is_tiny(self) -> bool:
        return self.pipeline.is_tiny

    def generate(self, requests: Sequence[GenRequest]) -> list:
        """One RGB PIL image per request, in request order."""
        images: list = [None] * len(requests)
        for indices in self._micro_batches(requests):
            batch = [requests[i] for i in indices]
            for i, image in zip(indices, self._run(batch)):
                images[i] = image
        return images

    def _micro_batches(self, requests: Sequence[GenRequest]) -> list[list[int]]:
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.batch_key(), []).append(index)
        size = self.max_batch_size or len(requests) or 1
        return [indices[start:start + size] for indices in groups.values()
                for start in range(0, len(indices), size)]

    def _run(self, batch: list[GenRequest]) -> list:
        import torch

        first = batch[0]  # every field but prompt, negative, pixels and seed is shared
        return self.pipeline(
            prompt=[r.prompt for r in batch],
            input_images=[list(r.images) for r in batch],
            negative_prompt=[r.negative_prompt for r in batch],
            height=first.height, width=first.width, num_inference_steps=first.steps,
            text_guidance_scale=first.text_guidance, image_guidance_scale=first.image_guidance,
            cfg_range=tuple(first.cfg_range), scheduler=first.scheduler,
            max_input_image_side_length=first.max_input_side,
            # The job's size decides, always: the plan already fits an edit's size to its input,
            # and the official single-input rule (output = input size) would make a series shot
            # with one reference ignore the size its recipe asks for, and the PNG record lie.
            align_res=False,
            lora=self._adapters(first) or None, cache=cache_config(first),
            # CPU generators: the same seed gives the same noise on any device.
            generator=[torch.Generator("cpu").manual_seed(r.seed) for r in batch],
            output_type="pil",
        ).images

    def _adapters(self, request: GenRequest) -> dict[str, float]:
        """Adapter name -> scale for a call, loading each file the first time it is named."""
        for ref in request.lora:
            if ref.key not in self.pipeline.loras.names:
                self.pipeline.load_lora(ref.path, name=ref.key)
        return dict(request.lora_scales())

    def critique(self, image, prompt: str) -> str | None:
        """Ask the MLLM what in `image` does not match `prompt`: a short instruction, or None
        (the tiny model's MLLM is random, a processor without image support cannot look, or
        the answer says nothing is wrong)."""
        pipeline = self.pipeline
        processor = pipeline.processor
        if pipeline.is_tiny or pipeline.mllm is None or not hasattr(processor, "image_processor"):
            return None
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": CRITIQUE_QUESTION.format(prompt=prompt)}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")
        inputs = inputs.to(pipeline._execution_device)  # where the MLLM runs, even when offloaded
        output = pipeline.mllm.generate(**inputs, max_new_tokens=48, do_sample=False)
        answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        answer = answer.strip()
        return None if not answer or answer.lower().strip(" .!") == "nothing" else answer


def cache_config(request: GenRequest):
    """The pipeline's CacheConfig for a request (None: exact, no cache)."""
    if request.cache == "none":
        return None
    from .model import CacheConfig

    if request.cache_threshold is None:
        return CacheConfig(request.cache)
    return CacheConfig(request.cache, threshold=request.cache_threshold)
