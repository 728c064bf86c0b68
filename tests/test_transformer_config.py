"""The transformer's config and state dict are exactly the released checkpoint's; save/load round-trips."""
import inspect
import json

import torch

from omnigen2_batch.model.transformer import OmniGen2Transformer2DModel

# The released OmniGen2 transformer/config.json (see the parity README, "Full-size transformer config").
FULL_SIZE_CONFIG = dict(
    patch_size=2, in_channels=16, out_channels=None, hidden_size=2520, num_layers=32, num_refiner_layers=2,
    num_attention_heads=21, num_kv_heads=7, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5,
    axes_dim_rope=[40, 40, 40], axes_lens=[10000, 10000, 10000], text_feat_dim=2048, timestep_scale=1000.0,
)


def read_key_table(path):
    """{key: shape} and the total parameter count from full_size_transformer_keys.tsv."""
    shapes, total = {}, None
    for line in path.read_text().splitlines()[1:]:
        key, shape, numel = line.split("\t")
        if key.startswith("# total"):
            total = int(numel)
        else:
            shapes[key] = tuple(int(d) for d in shape.split(","))
            assert torch.Size(shapes[key]).numel() == int(numel), key
    return shapes, total


def test_config_keys_are_the_official_ones(parity_dir):
    official = json.loads((parity_dir / "tiny" / "transformer" / "config.json").read_text())
    official_keys = {k for k in official if not k.startswith("_")}
    init_keys = set(inspect.signature(OmniGen2Transformer2DModel.__init__).parameters) - {"self"}
    assert init_keys == official_keys == set(FULL_SIZE_CONFIG)
    model = OmniGen2Transformer2DModel.from_config(official)
    assert {k: model.config[k] for k in official_keys} == {k: official[k] for k in official_keys}


def test_full_size_state_dict_matches_the_released_checkpoint(parity_dir):
    expected, total = read_key_table(parity_dir / "full_size_transformer_keys.tsv")
    with torch.device("meta"):
        model = OmniGen2Transformer2DModel(**FULL_SIZE_CONFIG)
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert list(state) == list(expected), "state-dict order differs from the released checkpoint"
    assert sum(p.numel() for p in model.parameters()) == total == 3_967_161_400
    assert not list(model.buffers())


def public_config(model):
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


def _tiny_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 16, 6, 8, generator=g)
    refs = [[torch.randn(16, 4, 6, generator=g), torch.randn(16, 8, 4, generator=g)], None]
    text = torch.randn(2, 5, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return latents, torch.tensor([0.3, 0.8]), text, mask, refs


def test_save_and_load_round_trip_is_bit_identical(parity_dir, tmp_path):
    config = json.loads((parity_dir / "tiny" / "transformer" / "config.json").read_text())
    torch.manual_seed(0)
    model = OmniGen2Transformer2DModel.from_config(config).eval()
    model.save_pretrained(tmp_path)
    loaded = OmniGen2Transformer2DModel.from_pretrained(tmp_path).eval()

    assert public_config(loaded) == public_config(model)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    latents, timestep, text, mask, refs = _tiny_inputs()
    with torch.no_grad():
        before = model(latents, timestep, text, None, mask, ref_image_hidden_states=refs)
        after = loaded(latents, timestep, text, None, mask, ref_image_hidden_states=refs)
    assert before.shape == latents.shape
    assert torch.equal(before, after)
