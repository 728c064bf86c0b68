"""LoRA adapters: loaded once by name, chosen per call with a scale, never left active.

The adapter is the official-format file of the feature fixtures (`lora_tiny.safetensors`), on the
fixture's tiny transformer so its module paths and shapes fit. Scales combine linearly
(W x + a B A x + b B A x = W x + (a + b) B A x), which float32 reproduces to ~1e-6 on [0,1] pixels.
"""
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnigen2_batch.model import load_pipeline
from omnigen2_batch.model.lora import read_lora_file

CALL = dict(height=32, width=32, num_inference_steps=3, output_type="pt")


@pytest.fixture(scope="module")
def feature_dir(parity_dir) -> Path:
    return Path(os.environ.get("OMNIGEN2_FEATURE_CASES_DIR", parity_dir / "feature_cases"))


@pytest.fixture(scope="module")
def lora_file(feature_dir) -> Path:
    return feature_dir / "lora_tiny.safetensors"


@pytest.fixture(scope="module")
def pipe(feature_dir):
    pipe = load_pipeline(feature_dir.parent / "tiny")
    width = pipe.transformer.config.text_feat_dim
    pipe.embeds = torch.randn(1, 6, width, generator=torch.Generator().manual_seed(3))
    return pipe


def generate(pipe, **kwargs):
    return pipe(prompt_embeds=pipe.embeds, negative_prompt_embeds=pipe.embeds[:, :4],
                generator=torch.Generator().manual_seed(0), **CALL, **kwargs).images


def test_adapters_switch_per_call_without_reloading(pipe, lora_file):
    base = generate(pipe)
    pipe.load_lora(lora_file, "a")
    pipe.load_lora(lora_file, "b")
    try:
        full = generate(pipe, lora={"a": 1.0})
        assert (full - base).abs().max().item() > 0.05  # the adapter acts
        assert torch.equal(generate(pipe), base)  # and is gone in the next call without lora=
        half = generate(pipe, lora={"a": 0.5})
        split = generate(pipe, lora={"a": 0.3, "b": 0.2})  # two adapters at once add up
        assert (half - split).abs().max().item() <= 1e-5
        assert (half - full).abs().max().item() > 0.01
        assert torch.equal(generate(pipe, lora={"a": 0.0}), base)
        with pytest.raises(ValueError, match="no adapter named"):
            generate(pipe, lora={"c": 1.0})
        assert torch.equal(generate(pipe), base)
    finally:
        pipe.unload_lora("a")
        pipe.unload_lora("b")


def test_alpha_in_the_file_is_honoured(pipe, lora_file, tmp_path):
    """The official loader ignores an alpha; ours scales by alpha / rank."""
    tensors = load_file(str(lora_file))
    layers = read_lora_file(lora_file)
    with_alpha = dict(tensors)
    for module, layer in layers.items():
        with_alpha[f"transformer.{module}.alpha"] = torch.tensor(layer.rank / 2)
    save_file(with_alpha, str(tmp_path / "alpha.safetensors"))
    pipe.load_lora(lora_file, "plain")
    pipe.load_lora(tmp_path / "alpha.safetensors", "alpha")
    try:
        assert (generate(pipe, lora={"alpha": 1.0}) - generate(pipe, lora={"plain": 0.5})).abs().max() <= 1e-6
    finally:
        pipe.unload_lora("plain")
        pipe.unload_lora("alpha")


def test_file_targets_and_ranks_are_read_from_the_file(lora_file):
    layers = read_lora_file(lora_file)
    keys = load_file(str(lora_file))
    assert len(layers) * 2 == len(keys)
    for module, layer in layers.items():
        assert torch.equal(layer.down, keys[f"transformer.{module}.lora_A.weight"])
        assert torch.equal(layer.up, keys[f"transformer.{module}.lora_B.weight"])
        assert layer.scaling == 1.0


@pytest.mark.parametrize("tensors, message", [
    ({"transformer.layers.0.attn.to_q.lora_A.weight": torch.zeros(4, 3)}, "needs both"),
    ({"transformer.layers.0.attn.to_q.weight": torch.zeros(4, 3)}, "not in the PEFT format"),
    ({"transformer.layers.9.attn.to_q.lora_A.weight": torch.zeros(4, 48),
      "transformer.layers.9.attn.to_q.lora_B.weight": torch.zeros(48, 4)}, "no module"),
    ({"transformer.layers.0.attn.to_q.lora_A.weight": torch.zeros(4, 7),
      "transformer.layers.0.attn.to_q.lora_B.weight": torch.zeros(48, 4)}, "expects"),
])
def test_bad_files_are_refused_with_the_reason(pipe, tmp_path, tensors, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=message):
        pipe.load_lora(path, "bad")
    assert "bad" not in pipe.loras.names
