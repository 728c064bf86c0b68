"""Omni-RoPE: OmniGen2's three-axis rotary position embedding.

Every token of the joint sequence gets a position id (a0, a1, a2):
- text token i: (i, i, i);
- each image (reference images first, then the noisy image): a0 is a per-image "shift" that starts
  at the text length and grows by max(rows, cols) of every preceding image, a1 = row, a2 = col.
So images share row/col coordinates but are told apart on axis 0, and text stays on the diagonal.

Axis k owns axes_dim[k] channels of each attention head; adjacent channel pairs (x0, x1) are
rotated by the angle of their position: (x0 cos - x1 sin, x0 sin + x1 cos). The reference does
this as a complex128 product; here the rotation is real-valued (cos/sin tables, float32 math) so
that torch.compile can trace it, and it agrees with the complex product to float32 rounding.
"""
import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed

ROPE_THETA = 10000.0


def rope_tables(axes_dim, axes_lens, theta: float = ROPE_THETA) -> list[torch.Tensor]:
    """One complex128 table per axis, shape [axes_lens[k], axes_dim[k] // 2] (the official `freqs_cis`).

    float64 phases as in the reference: float32 phases drift visibly at positions in the thousands.
    """
    return [
        get_1d_rotary_pos_embed(dim, length, theta=theta, freqs_dtype=torch.float64)
        for dim, length in zip(axes_dim, axes_lens)
    ]


def cos_sin_tables(freqs_cis: list[torch.Tensor]) -> list[torch.Tensor]:
    """Real tables [len, dim/2, 2] = (cos, sin), float64, in freshly allocated memory.

    Accepts complex tables or their float64 `view_as_real` form [len, dim/2, 2] (as stored in a
    safetensors file). Never views a float buffer as complex: complex128 needs 16-byte alignment
    that a tensor memory-mapped from a file does not guarantee.
    """
    tables = []
    for table in freqs_cis:
        if table.is_complex():
            table = torch.stack([table.real, table.imag], dim=-1)
        tables.append(table.to(torch.float64).clone())
    return tables


def _grid_position_ids(axis0: int, rows: int, cols: int) -> torch.Tensor:
    """[rows * cols, 3] ids of an image's tokens in row-major order."""
    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.full_like(row, axis0), row, col], dim=-1).reshape(-1, 3)


def sample_position_ids(text_len: int, ref_grids, image_grid) -> torch.Tensor:
    """int32 [text_len + sum(ref tokens) + image tokens, 3] ids of one sample's joint sequence.

    ref_grids: the (rows, cols) token grid of each reference image, in order; image_grid: the noisy
    image's (rows, cols).
    """
    parts = [torch.arange(text_len).unsqueeze(1).expand(-1, 3)]
    shift = text_len
    for rows, cols in [*ref_grids, image_grid]:
        parts.append(_grid_position_ids(shift, rows, cols))
        shift += max(rows, cols)
    return torch.cat(parts).to(torch.int32)


def gather_rotary(tables: list[torch.Tensor], position_ids: torch.Tensor) -> torch.Tensor:
    """float32 (cos, sin) [..., sum(axes_dim) // 2, 2] for position ids [..., 3], axes in order.

    `tables` are `cos_sin_tables`; the angles are looked up in float64 and rounded once.
    """
    ids = position_ids.long()
    return torch.cat([table[ids[..., axis]] for axis, table in enumerate(tables)], dim=-2).to(torch.float32)


def apply_rotary(x: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, heads, head_dim] by (cos, sin) [B, S, head_dim // 2, 2]; float32 math, cast back."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = rotary[:, :, None, :, 0], rotary[:, :, None, :, 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
