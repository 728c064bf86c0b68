"""TeaCache, TaylorSeer and LoRA against golden runs of the official pipeline (feature_cases/).

Every `<feature dir>/*.json` is a case; every setting (threshold and polynomial, TaylorSeer
schedule and order, LoRA file, rank and scale, sizes, seeds, steps, embeddings) is read from it.
The feature dir is $OMNIGEN2_FEATURE_CASES_DIR, else `<parity dir>/feature_cases`; the tiny model
is its sibling `tiny/`. Compared, float32 on CPU: the computed / skipped / predicted pattern of
every guidance branch (exactly), every step's guided velocity, the final latents and the images
(atol 1e-4). Each case runs branch by branch (as the reference) and with the branches batched.

As in test_pipeline_parity.py, the reference samples the input image's VAE posterior from the
global RNG: the test checks that our encoder reproduces that sample under the recorded global
seed, then passes the recorded latent as `ref_latents`.
"""
import json
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from omnigen2_batch.model import load_pipeline
from omnigen2_batch.model.cache import CacheConfig
from omnigen2_batch.model.pipeline import fit_size
from parity_checks import assert_close

EMBED_ARGS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")


@pytest.fixture(scope="module")
def feature_dir(parity_dir) -> Path:
    return Path(os.environ.get("OMNIGEN2_FEATURE_CASES_DIR", parity_dir / "feature_cases"))


def _cases(feature_dir):
    cases = sorted(feature_dir.glob("*.json"))
    assert cases, f"no feature cases under {feature_dir}"
    return cases


def _seed(text: str) -> int:
    return int(re.search(r"manual_seed\((\d+)\)", text).group(1))


def _feature_kwargs(pipe, case: Path, feature: dict) -> dict:
    """The per-call kwargs that switch the case's feature on, checked against the case's record."""
    name = feature["name"]
    if name == "teacache":
        return dict(cache=CacheConfig("teacache", threshold=feature["teacache_rel_l1_thresh"],
                                      coefficients=tuple(feature["rescale_coefficients_highest_power_first"])))
    if name == "taylorseer":
        params = feature["cache_init_params"]
        # Only "full" and "Taylor" calls are reachable with these (see the feature README).
        assert params["taylor_cache"] and params["fresh_ratio"] == 0.0, params
        return dict(cache=CacheConfig("taylorseer", first_enhance=params["first_enhance"],
                                      fresh_threshold=params["fresh_threshold"], max_order=params["max_order"]))
    if name == "lora":
        adapter = pipe.load_lora(case.parent / feature["lora_file"], name=feature["adapter_name"])
        loaded = pipe.loras.adapters[adapter]
        assert sorted(loaded.layers) == sorted(feature["target_modules"])
        assert {layer.rank for layer in loaded.layers.values()} == {feature["rank"]}
        for layer in loaded.layers.values():
            assert layer.scaling * feature["lora_scale"] == pytest.approx(feature["effective_scaling"])
        return dict(lora={adapter: feature["lora_scale"]})
    raise AssertionError(f"{case.name}: unknown feature {name!r}")


def _ref_latents(pipe, case: Path, spec: dict, data: dict, kwargs: dict):
    """The recorded input latents (one prompt), after checking our encoder reproduces them."""
    names = spec.get("input_images") or []
    if not names:
        return None, None
    images = [Image.open(case.parent / name).convert("RGB") for name in names]
    limits = (kwargs.get("max_pixels", 1024 * 1024), kwargs.get("max_input_image_side_length", 1024))
    torch.manual_seed(spec["global_seed_before_call"])  # the reference draws the posterior sample here
    latents = []
    for j, image in enumerate(images):
        ours = pipe.encode_image(image, fit_size(*image.size, *limits, pipe.size_multiple))
        assert_close(ours, data[f"ref_latents.0.{j}"], f"ref_latents.0.{j} (VAE encode under the global seed)")
        latents.append(data[f"ref_latents.0.{j}"])
    return [images], [latents]


def _run_case(pipe, case: Path, batch_guidance: bool):
    spec = json.loads(case.read_text())
    data = load_file(case.with_suffix(".safetensors"))
    kwargs = dict(spec["pipeline_call_kwargs"])
    prompt = kwargs.pop("prompt")
    kwargs.pop("input_images", None)  # described in words there; the files are in spec["input_images"]
    for name in EMBED_ARGS:
        if name in kwargs:
            kwargs[name] = data[f"arg.{name}"]
    if "cfg_range" in kwargs:
        kwargs["cfg_range"] = tuple(kwargs["cfg_range"])
    images, ref_latents = _ref_latents(pipe, case, spec, data, kwargs)
    feature = _feature_kwargs(pipe, case, spec["feature"])

    steps = []
    try:
        out = pipe([prompt] if isinstance(prompt, str) else prompt, input_images=images, ref_latents=ref_latents,
                   generator=torch.Generator().manual_seed(_seed(spec["generator"])),
                   callback_on_step_end=lambda p, i, t, v: steps.append(v), batch_guidance=batch_guidance,
                   **feature, **kwargs)
    finally:
        for name in pipe.loras.names:
            pipe.unload_lora(name)

    patterns = {}
    for values in steps:
        for branch, letters in values["cache_modes"].items():
            patterns[branch] = patterns.get(branch, "") + letters[0]
    assert patterns == spec["pattern_per_branch"], "computed / skipped / predicted pattern per branch"
    assert len(steps) == spec["n_scheduler_steps"]
    for i, values in enumerate(steps):
        assert_close(values["model_output"], data[f"step.{i:03d}.guided_model_output"], f"step {i} guided velocity")
    assert_close(steps[-1]["latents"], data["final_latents"], "final_latents")
    assert_close(out.images, data["output_images"], "output_images")


@pytest.fixture(scope="module")
def pipe(feature_dir):
    return load_pipeline(feature_dir.parent / "tiny")


@pytest.mark.parametrize("batch_guidance", [False, True], ids=["branch_by_branch", "branches_batched"])
def test_every_feature_case_matches_the_official_pipeline(pipe, feature_dir, subtests, batch_guidance):
    for case in _cases(feature_dir):
        with subtests.test(case=case.stem):
            _run_case(pipe, case, batch_guidance)


def test_feature_cases_cover_all_three_features(feature_dir):
    kinds = {json.loads(case.read_text())["feature"]["name"] for case in _cases(feature_dir)}
    assert kinds == {"teacache", "taylorseer", "lora"}
