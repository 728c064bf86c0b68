"""Step caches beyond the official behaviour: decisions per image, no state across calls.

Tiny model, float32 CPU. Batched and alone agree to float rounding (1e-5 on [0,1] pixels); a
TeaCache decision has margins far above that rounding, so patterns must be identical.
"""
import pytest
import torch

from omnigen2_batch.model import load_pipeline
from omnigen2_batch.model.cache import CacheConfig

PROMPTS = ["a red fox in the snow", "a lighthouse", "an astronaut riding a horse on the moon, oil painting"]
CALL = dict(height=32, width=32, num_inference_steps=10, output_type="pt", text_guidance_scale=4.0)
TEACACHE = CacheConfig("teacache", threshold=1.0)  # the tiny model's distances are large (feature README)
TAYLORSEER = CacheConfig("taylorseer")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


def generate(pipe, indices, cache, **kwargs):
    """Images and per-image pattern strings {branch: [pattern of image i]}."""
    steps = []
    out = pipe([PROMPTS[i] for i in indices], generator=[torch.Generator().manual_seed(10 + i) for i in indices],
               cache=cache, callback_on_step_end=lambda p, s, t, v: steps.append(v["cache_modes"]),
               **{**CALL, **kwargs}).images
    branches = dict.fromkeys(branch for step in steps for branch in step)
    patterns = {branch: ["".join(step[branch][i] for step in steps if branch in step) for i in range(len(indices))]
                for branch in branches}
    return out, patterns


@pytest.mark.parametrize("cache", [TEACACHE, TAYLORSEER], ids=["teacache", "taylorseer"])
def test_an_image_does_not_depend_on_its_batch(pipe, cache):
    batched, batched_patterns = generate(pipe, [0, 1, 2], cache)
    for i in range(3):
        alone, alone_patterns = generate(pipe, [i], cache)
        assert (batched[i] - alone[0]).abs().max().item() <= 1e-5, f"image {i}"
        for branch in alone_patterns:
            assert batched_patterns[branch][i] == alone_patterns[branch][0], (branch, i)
    skipped = "S" if cache.kind == "teacache" else "T"
    assert any(skipped in p for patterns in batched_patterns.values() for p in patterns), "the cache never acted"


def test_teacache_decides_per_image(pipe):
    """Different prompts take different decisions within one batch (one shared decision would not)."""
    _, patterns = generate(pipe, [0, 1, 2], TEACACHE)
    assert len(set(patterns["cond"] + patterns["uncond"])) > 1, patterns


@pytest.mark.parametrize("cache", [TEACACHE, TAYLORSEER], ids=["teacache", "taylorseer"])
def test_no_state_leaks_from_one_call_to_the_next(pipe, cache):
    first, _ = generate(pipe, [0], cache)
    second, _ = generate(pipe, [1, 2], cache, height=48)  # another shape: stale state would not fit
    fresh = load_pipeline("tiny")
    assert torch.equal(first, generate(fresh, [0], cache)[0])
    assert torch.equal(second, generate(fresh, [1, 2], cache, height=48)[0])
    exact_after, patterns = generate(pipe, [0], None)  # cache off again: the exact result
    assert torch.equal(exact_after, generate(fresh, [0], None)[0])
    assert set("".join(patterns["cond"])) == {"F"}


def test_cache_changes_the_result_and_teacache_saves_calls(pipe):
    exact, _ = generate(pipe, [0], None)
    cached, patterns = generate(pipe, [0], TEACACHE)
    assert (exact - cached).abs().max().item() > 1e-3
    assert patterns["cond"][0][0] == "F" and patterns["cond"][0][-1] == "F"  # first and last steps always run


def test_taylorseer_schedule_follows_its_settings(pipe):
    _, patterns = generate(pipe, [0], CacheConfig("taylorseer", first_enhance=2, fresh_threshold=2, max_order=1))
    assert patterns["cond"] == ["FF" + "TF" * 4]


def test_taylorseer_with_cfg_range_counts_each_branch_on_its_own(pipe):
    """uncond only runs while guidance is on: its own call counter, not the step index, decides."""
    _, patterns = generate(pipe, [0], TAYLORSEER, num_inference_steps=12, cfg_range=(0.5, 1.0))
    assert patterns["cond"] == ["FFFFFTTFTTFT"]
    assert patterns["uncond"] == ["FFFFFT"]  # steps 6..11: its calls 0..5


def test_invalid_cache_settings_are_refused():
    with pytest.raises(ValueError, match="kind"):
        CacheConfig("fastcache")
    with pytest.raises(ValueError, match="invalid"):
        CacheConfig("taylorseer", fresh_threshold=0)
