"""Building blocks of the OmniGen2 transformer: attention, modulated norm, block, embeddings.

Module and parameter names follow the released checkpoint (diffusers' `Attention` gives
to_q/to_k/to_v/to_out.0/norm_q/norm_k, diffusers' `LuminaFeedForward` gives linear_1/2/3).
"""
import torch
import torch.nn.functional as F
from diffusers.models.attention import LuminaFeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from .rope import apply_rotary

FREQUENCY_CHANNELS = 256  # sinusoidal timestep features
QK_NORM_EPS = 1e-5  # fixed in the reference, independent of norm_eps


def conditioning_width(hidden_size: int) -> int:
    """Width of the timestep embedding that drives every modulation."""
    return min(hidden_size, 1024)


class RotarySdpaAttnProcessor:
    """Self-attention with per-head RMS-normalised q/k, Omni-RoPE, grouped kv heads and a key mask."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        head_dim = query.shape[-1]
        key = attn.to_k(context).unflatten(-1, (-1, head_dim))
        value = attn.to_v(context).unflatten(-1, (-1, head_dim))
        dtype = query.dtype

        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary(query, image_rotary_emb)
            key = apply_rotary(key, image_rotary_emb)
        query, key, value = (t.to(dtype).transpose(1, 2) for t in (query, key, value))

        # Explicit kv repetition (head h reads kv head h // group) rather than enable_gqa, which
        # forces SDPA's slow math backend together with a mask.
        group = attn.heads // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return attn.to_out[1](attn.to_out[0](out))


class ModulatedRMSNorm(nn.Module):
    """RMSNorm whose output is scaled by (1 + scale) from the timestep embedding; also returns the
    gates and the FFN scale of the same block (one Linear produces all four)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_width(dim), 4 * dim)
        self.norm = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.linear(self.silu(temb)).chunk(4, dim=1)
        return self.norm(x) * (1 + scale_msa[:, None]), gate_msa, scale_mlp, gate_mlp


class OmniGen2TransformerBlock(nn.Module):
    """Pre- and post-normed attention + SwiGLU FFN; with `modulation` the residual branches are
    gated (tanh) and their inputs scaled by the timestep embedding."""

    def __init__(self, dim, num_attention_heads, num_kv_heads, multiple_of, ffn_dim_multiplier, norm_eps, modulation):
        super().__init__()
        self.modulation = modulation
        self.attn = Attention(
            query_dim=dim,
            dim_head=dim // num_attention_heads,
            heads=num_attention_heads,
            kv_heads=num_kv_heads,
            qk_norm="rms_norm",
            eps=QK_NORM_EPS,
            bias=False,
            out_bias=False,
            processor=RotarySdpaAttnProcessor(),
        )
        self.feed_forward = LuminaFeedForward(dim, 4 * dim, multiple_of, ffn_dim_multiplier)
        self.norm1 = ModulatedRMSNorm(dim, norm_eps) if modulation else nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=norm_eps)
        self.norm2 = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=norm_eps)

    def forward(self, x, attention_mask, rotary, temb=None) -> torch.Tensor:
        if self.modulation:
            normed, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb)
        else:
            normed = self.norm1(x)
        attn_out = self.norm2(self.attn(normed, attention_mask=attention_mask, image_rotary_emb=rotary))
        x = x + (gate_msa.unsqueeze(1).tanh() * attn_out if self.modulation else attn_out)

        ffn_in = self.ffn_norm1(x)
        if self.modulation:
            ffn_in = ffn_in * (1 + scale_mlp.unsqueeze(1))
        ffn_out = self.ffn_norm2(self.feed_forward(ffn_in))
        return x + (gate_mlp.unsqueeze(1).tanh() * ffn_out if self.modulation else ffn_out)


class TimestepCaptionEmbedding(nn.Module):
    """temb = MLP(sinusoid(timestep_scale * t)); caption = Linear(RMSNorm(text features))."""

    def __init__(self, hidden_size: int, text_feat_dim: int, norm_eps: float, timestep_scale: float):
        super().__init__()
        self.time_proj = Timesteps(
            FREQUENCY_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0.0, scale=timestep_scale
        )
        self.timestep_embedder = TimestepEmbedding(FREQUENCY_CHANNELS, conditioning_width(hidden_size))
        self.caption_embedder = nn.Sequential(
            nn.RMSNorm(text_feat_dim, eps=norm_eps), nn.Linear(text_feat_dim, hidden_size)
        )

    def forward(self, timestep, text_hidden_states, dtype):
        temb = self.timestep_embedder(self.time_proj(timestep).to(dtype))
        return temb, self.caption_embedder(text_hidden_states)
