"""The tiny OmniGen2: the real architecture at toy widths, random weights from a fixed seed.

It runs the very same pipeline code on a CPU in well under a second per image, so the quickstart
and every test work offline. Its images are noise (nothing was trained); `pipeline.is_tiny` says
so, and callers label what they show. The sizes match the parity fixture's tiny models.
"""
from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"
SEED = 20250627

TRANSFORMER_CONFIG = dict(
    patch_size=2, in_channels=16, out_channels=None, hidden_size=48, num_layers=2,
    num_refiner_layers=2, num_attention_heads=3, num_kv_heads=1, multiple_of=40,
    ffn_dim_multiplier=None, norm_eps=1e-5, axes_dim_rope=[8, 4, 4], axes_lens=[512, 128, 128],
    text_feat_dim=32, timestep_scale=1000.0,
)

# FLUX.1 VAE layout (16 latent channels, no quant convs, scale 8) at toy widths.
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 16, 16, 16],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=1, norm_num_groups=4, act_fn="silu", sample_size=64,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    mid_block_add_attention=True, force_upcast=True,
)

# Qwen2.5-VL special-token ids of the tiny tokenizer (600 BPE tokens come first).
PAD_ID, IM_END_ID, VISION_START_ID, VISION_END_ID, VISION_PAD_ID, IMAGE_ID, VIDEO_ID = (
    600, 602, 609, 610, 611, 612, 613)


def mllm_config():
    """A Qwen2.5-VL with text width 32 (= the transformer's text_feat_dim) and a 1-block vision tower."""
    from transformers import Qwen2_5_VLConfig

    text = dict(
        vocab_size=614, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True,
        # 2 * sum(mrope_section) must equal the head dim (16).
        rope_scaling={"type": "default", "rope_type": "default", "mrope_section": [2, 3, 3]},
        bos_token_id=PAD_ID, eos_token_id=IM_END_ID, pad_token_id=PAD_ID,
    )
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[0], in_channels=3,
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
        vision_token_id=VISION_PAD_ID, tie_word_embeddings=True,
    )


def _redraw(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter a non-trivial seeded value.

    Default inits zero the modulation gates and output layers, which would make the transformer
    an identity; random values everywhere exercise every path (and every padding mask).
    """
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and param.ndim == 1:
                param.copy_(1 + 0.2 * noise)
            elif param.ndim >= 2:
                param.copy_(noise / param.shape[-1] ** 0.5)
            else:
                param.copy_(0.02 * noise)


def build_components(seed: int = SEED) -> dict:
    """transformer, vae, scheduler, mllm, processor (a tokenizer): all tiny, all float32, CPU."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from .scheduler import FlowMatchEulerDiscreteScheduler
    from .transformer import OmniGen2Transformer2DModel

    # fork_rng: building must neither depend on nor disturb the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = OmniGen2Transformer2DModel(**TRANSFORMER_CONFIG)
        _redraw(transformer, torch.Generator().manual_seed(seed))
        vae = AutoencoderKL(**VAE_CONFIG)
        mllm = Qwen2_5_VLForConditionalGeneration(mllm_config())
    return dict(
        transformer=transformer.eval(), vae=vae.eval(), mllm=mllm.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, dynamic_time_shift=True),
        processor=AutoTokenizer.from_pretrained(TOKENIZER_DIR),
    )


def build_tiny_pipeline(seed: int = SEED):
    from .pipeline import OmniGen2Pipeline

    return OmniGen2Pipeline(**build_components(seed), is_tiny=True)
