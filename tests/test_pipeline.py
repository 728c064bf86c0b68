"""The pipeline's own behaviour on the tiny model: batching, seeds, sizes, samplers, validation,
and the PipelineGenerator on top of it.

Batched and one-by-one runs agree to float rounding, not bit for bit: a matrix product over a
batch of rows may round differently from the same product over one row. The tolerance (1e-5 on
[0,1] pixels, one 8-bit level on PIL images) is far below what any real difference would make.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from omnigen2_batch.generate import PipelineGenerator
from omnigen2_batch.jobs import GenRequest
from omnigen2_batch.model import load_pipeline
from omnigen2_batch.model.scheduler import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                                            flow_timesteps)

PROMPTS = ["a red fox", "一只猫睡在木桌上，旁边有一杯咖啡",
           "a futuristic city skyline at night with neon lights and flying cars, cinematic"]
NEGATIVES = ["", "blurry", "ugly, low quality, watermark"]
FAST = dict(num_inference_steps=3, output_type="pt")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


def noise_image(seed, width, height):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def run(pipe, indices, images=None, **kwargs):
    return pipe([PROMPTS[i] for i in indices], negative_prompt=[NEGATIVES[i] for i in indices],
                input_images=None if images is None else [images[i] for i in indices],
                generator=gens(*(100 + i for i in indices)), **{**FAST, **kwargs}).images


def assert_close(a, b, atol=1e-5):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= atol


@pytest.mark.parametrize("mode", ["t2i", "edit", "incontext"])
def test_batch_equals_one_by_one(pipe, mode):
    images = {"t2i": None,
              "edit": [[noise_image(i, 100, 72)] for i in range(3)],
              "incontext": [[noise_image(i, 80, 48), noise_image(9 + i, 64, 64)] for i in range(3)]}[mode]
    kwargs = dict(height=48, width=64) if mode != "edit" else {}
    batched = run(pipe, [0, 1, 2], images, **kwargs)
    alone = torch.cat([run(pipe, [i], images, **kwargs) for i in range(3)])
    assert_close(batched, alone)
    assert (batched[0] - batched[1]).abs().max() > 0.01  # different prompts and seeds differ


def test_images_per_prompt_pair_each_prompt_with_its_own_mask(pipe):
    # Prompts of different token lengths: pairing p1's embeddings with p0's mask would change p1.
    out = pipe(PROMPTS[:2], num_images_per_prompt=2, generator=gens(1, 2, 3, 4), height=32, width=32, **FAST)
    alone = [pipe([PROMPTS[p]], generator=gens(seed), height=32, width=32, **FAST).images
             for p, seed in [(0, 1), (0, 2), (1, 3), (1, 4)]]
    assert_close(out.images, torch.cat(alone))


def test_seeds_decide_and_global_rng_does_not(pipe):
    edit = [[noise_image(0, 64, 48)]]

    def once(seed, global_seed):
        torch.manual_seed(global_seed)
        return pipe(["make it blue"], input_images=edit, generator=gens(seed), **FAST).images

    first = once(5, 0)
    assert torch.equal(first, once(5, 1234))  # VAE posterior sampled from the caller's generator
    assert (first - once(6, 0)).abs().max() > 0.01


def test_output_sizes(pipe):
    # Not a multiple of 16: generated at 32x64, resized back to the request.
    [image] = pipe(["x"], height=40, width=72, num_inference_steps=1, generator=gens(0)).images
    assert image.size == (72, 40) and image.mode == "RGB"
    # Capped at max_pixels (generated at 32x32), then resized to the request.
    capped = pipe(["x"], height=64, width=64, max_pixels=32 * 32, generator=gens(0), **FAST).images
    assert capped.shape == (1, 3, 64, 64)
    capped_latents = pipe(["x"], height=64, width=64, max_pixels=32 * 32, num_inference_steps=1,
                          generator=gens(0), output_type="latent").images
    assert capped_latents.shape == (1, 16, 4, 4)
    # One input with align_res: the processed input size (100x72 -> 96x64) wins over height/width.
    source = [[noise_image(0, 100, 72)]]
    aligned = pipe(["x"], input_images=source, height=32, width=32, generator=gens(0), **FAST).images
    assert aligned.shape == (1, 3, 64, 96)
    free = pipe(["x"], input_images=source, height=32, width=48, align_res=False, generator=gens(0), **FAST)
    assert free.images.shape == (1, 3, 32, 48)
    latents = pipe(["x"], height=32, width=48, generator=gens(0), num_inference_steps=1, output_type="latent")
    assert latents.images.shape == (1, 16, 4, 6)


def test_dpmsolver_runs_and_differs_from_euler(pipe):
    # 4+ steps: with 3 the second-order step sits between two first-order ends and degenerates.
    kwargs = dict(height=32, width=32, num_inference_steps=5, output_type="pt")
    euler = pipe(["a fox"], generator=gens(0), scheduler="euler", **kwargs).images
    dpm = pipe(["a fox"], generator=gens(0), scheduler="dpmsolver++", **kwargs).images
    assert torch.isfinite(dpm).all()
    assert (euler - dpm).abs().max() > 1e-3
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler  # a per-call sampler, not a swap


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_images=[[noise_image(0, 64, 64)], [noise_image(1, 96, 64)]]), r"input_images\[1\]\[0\]"),
    (dict(input_images=[[noise_image(0, 64, 64)], []]), "different numbers of images"),
    (dict(input_images=[[noise_image(0, 64, 64)]]), "1 entries for 2 prompts"),
    (dict(generator=gens(1, 2, 3)), "3 generators for 2 output images"),
    (dict(negative_prompt=["a", "b", "c"]), "negative_prompt"),
    (dict(cfg_range=(0.6, 0.2)), "cfg_range"),
    (dict(output_type="np"), "output_type"),
])
def test_invalid_calls_say_what_is_wrong(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(["a", "b"], **{"num_inference_steps": 1, **kwargs})


def test_tiny_is_labelled(pipe):
    assert pipe.is_tiny is True


# -- samplers ----------------------------------------------------------------------------------

def integrate(scheduler, velocity, steps=6, num_tokens=256):
    scheduler.set_timesteps(steps, num_tokens=num_tokens)
    x = torch.zeros(1)
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(t, x), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("scheduler", [FlowMatchEulerDiscreteScheduler(), DPMSolverMultistepScheduler(),
                                       DPMSolverMultistepScheduler(solver_order=3)])
def test_samplers_follow_a_straight_flow_exactly(scheduler):
    # x_t = t * 3 (noise 0, data 3) has the constant velocity 3: every sampler lands on 3.
    assert integrate(scheduler, lambda t, x: torch.full((1,), 3.0)).item() == pytest.approx(3.0, abs=1e-5)


def test_dpmsolver_order_two_beats_euler_on_a_curved_flow():
    # dx/dt = 3 t^2 from x(0) = 0: x(1) = 1.
    def curved(t, x):
        return torch.full((1,), 3.0) * t ** 2
    euler_error = abs(integrate(FlowMatchEulerDiscreteScheduler(), curved).item() - 1)
    dpm_error = abs(integrate(DPMSolverMultistepScheduler(), curved).item() - 1)
    first_order = abs(integrate(DPMSolverMultistepScheduler(solver_order=1), curved).item() - 1)
    assert first_order == pytest.approx(euler_error, abs=1e-6)  # DPM-Solver++(1) is Euler on a flow
    assert dpm_error < euler_error / 2


def test_time_shift_spends_more_steps_near_noise_for_larger_images():
    small, large = flow_timesteps(10, 40 * 40, True), flow_timesteps(10, 128 * 128, True)
    assert small.tolist() == pytest.approx([k / 10 for k in range(10)], abs=1e-6)  # m = 1: no shift
    assert (large[1:] < small[1:]).all()


# -- PipelineGenerator -------------------------------------------------------------------------

def requests():
    base = dict(steps=2, width=32, height=32)
    edit = {**base, "width": 48}
    return [
        GenRequest(prompt=PROMPTS[0], seed=1, **base),
        GenRequest(prompt=PROMPTS[1], seed=2, negative_prompt="blurry", **base),
        # The request's size decides (the plan sizes an edit after its input).
        GenRequest(prompt="edit: make it blue", seed=3, images=[noise_image(3, 48, 32)], **edit),
        GenRequest(prompt=PROMPTS[2], seed=4, **base),
        GenRequest(prompt="edit: add a boat", seed=5, images=[noise_image(5, 48, 32)], **edit),
        GenRequest(prompt=PROMPTS[0], seed=6, **{**base, "width": 48}),
    ]


def batch_sizes_seen(pipe):
    sizes = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes, handle


def test_generate_batched_equals_one_by_one_in_request_order(pipe):
    reqs = requests()
    sizes, handle = batch_sizes_seen(pipe)
    try:
        batched = PipelineGenerator(pipe).generate(reqs)
    finally:
        handle.remove()
    alone = [PipelineGenerator(pipe).generate([r])[0] for r in reqs]
    # 3 groups (t2i 32x32 x3, edits x2, t2i 48 wide x1), 2 steps each; one transformer batch per
    # step holds every guidance branch: text CFG = 2 rows per image, edits 3.
    assert sizes == [3 * 2] * 2 + [2 * 3] * 2 + [1 * 2] * 2
    assert [im.size for im in batched] == [(32, 32), (32, 32), (48, 32), (32, 32), (48, 32), (48, 32)]
    for one, other in zip(batched, alone):
        assert np.abs(np.asarray(one, dtype=int) - np.asarray(other, dtype=int)).max() <= 1


def test_generate_respects_max_batch_size(pipe):
    sizes, handle = batch_sizes_seen(pipe)
    try:
        PipelineGenerator(pipe, max_batch_size=2).generate(requests()[:4])
    finally:
        handle.remove()
    assert sizes == [2 * 2] * 2 + [1 * 2] * 2 + [1 * 3] * 2  # t2i 2 + 1, then the edit (2 steps each)


def test_critique_is_none_for_the_tiny_model(pipe):
    assert PipelineGenerator(pipe).critique(noise_image(0, 32, 32), "a fox") is None


def test_critique_asks_a_real_mllm_with_the_image(pipe):
    """The tiny MLLM with a full Qwen2.5-VL processor, treated as real. Its final norm is zeroed so
    every logit ties and greedy decoding repeats token 0: a known answer, through the whole path."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from omnigen2_batch.model.pipeline import OmniGen2Pipeline

    tokenizer = pipe.tokenizer
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        video_processor=Qwen2VLVideoProcessor(), tokenizer=tokenizer, chat_template=tokenizer.chat_template)
    components = {name: getattr(pipe, name) for name in ("transformer", "vae", "scheduler", "mllm")}
    real = OmniGen2Pipeline(**components, processor=processor, is_tiny=False)
    norm = pipe.mllm.model.language_model.norm.weight
    saved = norm.detach().clone()
    try:
        with torch.no_grad():
            norm.zero_()
        answer = PipelineGenerator(real).critique(noise_image(0, 64, 64), "a red fox")
    finally:
        with torch.no_grad():
            norm.copy_(saved)
    assert answer == tokenizer.decode([0] * 48).strip()
