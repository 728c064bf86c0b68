"""load_pipeline: the tiny model, the released folder layout, hub ids from the cache, and the
errors a broken folder gives (they name the folder and the file)."""
import shutil

import pytest
import torch

from omnigen2_batch.model import ModelLoadError, load_pipeline

CALL = dict(height=32, width=48, num_inference_steps=2, output_type="pt")


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "omnigen2-tiny"
    tiny.save_pretrained(folder)
    return folder


def generate(pipe, seed=7):
    return pipe(["a red fox"], generator=torch.Generator().manual_seed(seed), **CALL).images


@pytest.fixture
def broken(saved, tmp_path):
    """A private copy of the saved folder for a test to damage."""
    return shutil.copytree(saved, tmp_path / "model")


def test_tiny_is_seeded_and_labelled(tiny):
    again = load_pipeline("tiny")
    assert tiny.is_tiny and again.is_tiny
    for (name, a), b in zip(tiny.transformer.state_dict().items(), again.transformer.state_dict().values()):
        assert torch.equal(a, b), name
    assert tiny.transformer.dtype == torch.float32 and tiny.device.type == "cpu"


def test_save_writes_the_released_layout(saved):
    for component, filename in [("transformer", "diffusion_pytorch_model.safetensors"),
                                ("vae", "diffusion_pytorch_model.safetensors"), ("mllm", "model.safetensors"),
                                ("scheduler", "scheduler_config.json"), ("processor", "tokenizer.json")]:
        assert (saved / component / filename).is_file(), f"{component}/{filename}"
    assert not list(saved.rglob("*.bin")) and not list(saved.rglob("*.pt"))


def test_round_trip_gives_identical_images(tiny, saved):
    loaded = load_pipeline(saved)
    assert loaded.is_tiny
    assert type(loaded.scheduler) is type(tiny.scheduler)
    assert torch.equal(generate(tiny), generate(loaded))


def test_hub_id_resolves_from_the_cache_offline(saved, tmp_path, monkeypatch):
    """A hub snapshot laid out as huggingface_hub caches it; HF_HUB_OFFLINE=1 (conftest)."""
    import huggingface_hub.constants as constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--omnigen2-tiny"
    shutil.copytree(saved, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert load_pipeline("someone/omnigen2-tiny").is_tiny
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_pipeline("someone/not-cached")


@pytest.mark.parametrize("damage, names", [
    (lambda d: (d / "vae" / "config.json").unlink(), ["vae", "config.json"]),
    (lambda d: (d / "transformer" / "diffusion_pytorch_model.safetensors").unlink(),
     ["transformer", "diffusion_pytorch_model.safetensors"]),
    (lambda d: shutil.rmtree(d / "processor"), ["processor/"]),
    (lambda d: (d / "scheduler" / "scheduler_config.json").write_text("{not json"), ["scheduler_config.json"]),
])
def test_missing_or_broken_files_are_named(broken, damage, names):
    damage(broken)
    with pytest.raises(ModelLoadError) as error:
        load_pipeline(broken)
    for name in names:
        assert name in str(error.value)


def test_truncated_safetensors_is_named(broken):
    weights = broken / "mllm" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"mllm.model\.safetensors.*truncated"):
        load_pipeline(broken)


def test_not_a_model_spec(tmp_path):
    with pytest.raises(ModelLoadError, match="not a folder"):
        load_pipeline(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="missing component folder 'transformer/'"):
        load_pipeline(tmp_path)


def test_dtype_and_offload_options(saved):
    half = load_pipeline(saved, dtype="bf16")
    assert {half.transformer.dtype, half.vae.dtype, half.mllm.dtype} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline("tiny", dtype="int4")
    assert load_pipeline("tiny", offload=True).device.type == "cpu"  # True = "model", the CPU as the device
    with pytest.raises(ValueError, match="offload"):
        load_pipeline("tiny", offload="disk")


def test_fixture_folder_loads_with_its_processor(parity_dir):
    pipe = load_pipeline(parity_dir / "tiny")
    assert not pipe.is_tiny  # no model_index.json: nothing says it is our tiny model
    assert hasattr(pipe.processor, "image_processor") and pipe.tokenizer.pad_token_id == 600
