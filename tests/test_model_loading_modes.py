"""load_pipeline's memory modes, transformer swap and compile option on the tiny model (CPU).

Offload hooks only decide where weights wait between uses, so every mode must give the very same
pixels; on a CPU-only machine the execution device is the CPU and the hooks move weights from the
CPU to the CPU, which still runs every hook.
"""
import pytest
import torch
from safetensors.torch import save_file

from omnigen2_batch.model import ModelLoadError, load_pipeline
from omnigen2_batch.model.loading import compile_transformer

CALL = dict(height=32, width=32, num_inference_steps=2, output_type="pt")


def generate_with(pipe, **kwargs):
    return pipe(["a red fox", "a small cat on a mat"], generator=[torch.Generator().manual_seed(i) for i in (1, 2)],
                **CALL, **kwargs).images


def generate(pipe):
    return generate_with(pipe)


@pytest.fixture(scope="module")
def exact():
    return generate(load_pipeline("tiny"))


def _hooked(module) -> bool:
    """accelerate (model offload) or diffusers (group offload) hooks on this module or a child."""
    return any(hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook") for m in module.modules())


@pytest.mark.parametrize("mode", ["model", "sequential", "group"])
def test_offload_modes_hook_every_model_and_keep_the_pixels(exact, mode):
    pipe = load_pipeline("tiny", offload=mode)
    for name in ("transformer", "vae", "mllm"):
        assert _hooked(getattr(pipe, name)), f"{name} has no offload hook"
    assert pipe._execution_device.type == "cpu"
    assert torch.equal(generate(pipe), exact)
    assert torch.equal(generate(pipe), exact)  # and again, after the hooks moved everything back


def test_transformer_from_another_folder(tmp_path, exact):
    other = load_pipeline("tiny")
    with torch.no_grad():
        for p in other.transformer.parameters():
            p.mul_(0.9)
    other.transformer.save_pretrained(tmp_path / "ft")
    changed = generate(load_pipeline("tiny", transformer=tmp_path / "ft"))
    assert (changed - exact).abs().max().item() > 1e-3
    assert torch.equal(changed, generate(other))
    # The same weights as one safetensors state dict, on the spec's own config.
    save_file(other.transformer.state_dict(), str(tmp_path / "ft.safetensors"))
    assert torch.equal(generate(load_pipeline("tiny", transformer=tmp_path / "ft.safetensors")), changed)


def test_bad_transformer_sources_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_pipeline("tiny", transformer=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_pipeline("tiny", transformer=tmp_path / "empty")
    save_file({"x_embedder.weight": torch.zeros(2, 2)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ModelLoadError, match="keys do not fit"):
        load_pipeline("tiny", transformer=tmp_path / "partial.safetensors")
    (tmp_path / "w.bin").write_bytes(b"0")
    with pytest.raises(ModelLoadError, match="only .safetensors"):
        load_pipeline("tiny", transformer=tmp_path / "w.bin")


def test_compile_with_offload_that_hooks_inside_blocks_is_refused():
    with pytest.raises(ValueError, match="compile"):
        load_pipeline("tiny", offload="group", compile=True)


@pytest.mark.slow  # ~50 s on 2 shared cores (dynamo tracing of 8 block variants)
def test_blocks_trace_without_graph_breaks_and_see_lora_switches(exact, parity_dir):
    """fullgraph=True: dynamo must take each block whole (real-valued RoPE, no host sync); the
    'aot_eager' backend skips code generation so this stays fast. Inductor: evaluation/bench_model.py --compile.
    LoRA adapters switched after compiling must act (a hook added later would be ignored)."""
    lora_file = parity_dir / "feature_cases" / "lora_tiny.safetensors"
    eager = load_pipeline("tiny")
    eager.load_lora(lora_file, "a")
    with_lora = {s: generate_with(eager, lora={"a": s}) for s in (1.0, 0.5)}
    pipe = load_pipeline("tiny")
    compile_transformer(pipe.transformer, backend="aot_eager")
    pipe.load_lora(lora_file, "a")
    assert (generate(pipe) - exact).abs().max().item() <= 1e-5
    for scale, expected in with_lora.items():
        assert (expected - exact).abs().max().item() > 1e-2
        assert (generate_with(pipe, lora={"a": scale}) - expected).abs().max().item() <= 1e-5, scale
    assert (generate(pipe) - exact).abs().max().item() <= 1e-5
