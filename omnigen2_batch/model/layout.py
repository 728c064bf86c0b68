"""Where every token of a batch sits: the joint sequence and its parts, built from sizes only.

Per sample the joint sequence is [valid text][ref image 1]...[ref image k][noisy image], right-padded
to the longest sample. Before the joint layers, three refiners work on the parts alone: the context
refiner on the text, the noise refiner on the noisy image, the ref-image refiner on each reference
image as its own sequence. `SequenceLayout` precomputes, once per batch shape, where every valid
token of each part sits in its own padded batch and in the joint batch, so moving tokens between
them is one index_select/index_copy per part instead of per-sample loops. It is built on the CPU
from Python ints, so building it never waits for the accelerator.
"""
from dataclasses import dataclass, fields, replace

import torch

from .rope import sample_position_ids

def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/p)*(W/p), p*p*C]: patches row-major, features (row, col, channel)."""
    n, c, h, w = latents.shape
    if h % p or w % p:
        raise ValueError(f"latent height and width must be multiples of patch_size {p}, got {h}x{w}")
    x = latents.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, rows: int, cols: int, p: int) -> torch.Tensor:
    """Inverse of `patchify` for a [N, rows*cols, p*p*C] token grid."""
    n = tokens.shape[0]
    x = tokens.reshape(n, rows, cols, p, p, -1).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, -1, rows * p, cols * p)


@dataclass
class Part:
    """The valid tokens of one part (text, ref images or noisy image) of a batch.

    `local` indexes them in the part's own padded batch flattened to [rows*width], `joint` in the
    joint batch flattened to [B*S]; both list the tokens in the same order.
    """

    rows: int
    width: int
    local: torch.Tensor
    joint: torch.Tensor
    mask: torch.Tensor | None  # [rows, width] bool, True on valid tokens; None: no padding

    def scatter(self, tokens: torch.Tensor) -> torch.Tensor:
        """Valid tokens [n, ...] -> this part's zero-padded batch [rows, width, ...]."""
        padded = tokens.new_zeros(self.rows * self.width, *tokens.shape[1:])
        return padded.index_copy(0, self.local, tokens).unflatten(0, (self.rows, self.width))

    def gather(self, padded: torch.Tensor) -> torch.Tensor:
        """This part's padded batch [rows, width, ...] -> valid tokens [n, ...]."""
        return padded.flatten(0, 1).index_select(0, self.local)

    def to(self, device) -> "Part":
        mask = None if self.mask is None else self.mask.to(device)
        return replace(self, local=self.local.to(device), joint=self.joint.to(device), mask=mask)


def _span_index(rows, starts, lengths, width) -> torch.Tensor:
    """Flat indices of the spans [start, start+length) of the given rows of a [*, width] grid."""
    spans = [torch.arange(s, s + n) + r * width for r, s, n in zip(rows, starts, lengths)]
    return torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)


def _prefix_mask(lengths, width) -> torch.Tensor | None:
    """Key-padding mask, or None when nothing is padded (one sample, or equal lengths): SDPA's
    fused kernels (flash attention on a GPU) take no mask, so the common case stays fast."""
    if all(n == width for n in lengths):
        return None
    return torch.arange(width)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]


def _part(lengths, width, joint_rows, joint_starts, joint_lengths, joint_width) -> Part:
    rows = len(lengths)
    return Part(
        rows=rows,
        width=width,
        local=_span_index(range(rows), [0] * rows, lengths, width),
        joint=_span_index(joint_rows, joint_starts, joint_lengths, joint_width),
        mask=_prefix_mask(lengths, width),
    )


@dataclass
class SequenceLayout:
    """Where every token of a batch goes; built on the CPU from sizes only, then moved once."""

    batch: int
    length: int  # S, the padded joint length
    text: Part  # rows = B, width = L (the text tensor's own padding)
    refs: Part  # rows = number of ref images in the batch, width = longest ref image
    image: Part  # rows = B, width = longest noisy image
    ref_owner: torch.Tensor  # [R] sample of each ref image
    ref_token_slot: torch.Tensor  # [sum ref tokens] index (0..4) of the ref image within its sample
    joint_mask: torch.Tensor | None  # [B, S] bool; None: no padding
    position_ids: torch.Tensor  # [B, S, 3] int32, zero on padding
    image_grids: list  # (rows, cols) token grid of each noisy image
    seq_lens: list  # valid joint tokens per sample (Python ints)

    @classmethod
    def build(cls, text_lens, text_width, ref_grids, image_grids, device=None) -> "SequenceLayout":
        """text_lens[b]: valid text tokens; ref_grids[b]: token grids of sample b's refs (maybe []);
        image_grids[b]: token grid of sample b's noisy image."""
        batch = len(text_lens)
        ref_lens = [[h * w for h, w in grids] for grids in ref_grids]
        image_lens = [h * w for h, w in image_grids]
        ref_totals = [sum(lens) for lens in ref_lens]
        seq_lens = [t + r + n for t, r, n in zip(text_lens, ref_totals, image_lens)]
        length = max(seq_lens)
        flat_ref_lens = [n for lens in ref_lens for n in lens]
        rows = range(batch)

        text = _part(text_lens, text_width, rows, [0] * batch, text_lens, length)
        refs = _part(flat_ref_lens, max(flat_ref_lens, default=0), rows, text_lens, ref_totals, length)
        image_starts = [t + r for t, r in zip(text_lens, ref_totals)]
        image = _part(image_lens, max(image_lens), rows, image_starts, image_lens, length)

        ids = [sample_position_ids(*sample) for sample in zip(text_lens, ref_grids, image_grids)]
        all_tokens = _span_index(rows, [0] * batch, seq_lens, length)
        position_ids = torch.zeros(batch * length, 3, dtype=torch.int32).index_copy(0, all_tokens, torch.cat(ids))
        return cls(
            batch=batch,
            length=length,
            text=text,
            refs=refs,
            image=image,
            ref_owner=torch.tensor([b for b, lens in enumerate(ref_lens) for _ in lens], dtype=torch.long),
            ref_token_slot=torch.tensor(
                [j for lens in ref_lens for j, n in enumerate(lens) for _ in range(n)], dtype=torch.long
            ),
            joint_mask=_prefix_mask(seq_lens, length),
            position_ids=position_ids.view(batch, length, 3),
            image_grids=list(image_grids),
            seq_lens=seq_lens,
        ).to(device)

    def to(self, device) -> "SequenceLayout":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: value.to(device) for name, value in moved.items() if hasattr(value, "to")})

    def join(self, text, refs, image) -> torch.Tensor:
        """Padded part batches -> the padded joint batch [B, S, ...]."""
        joint = text.new_zeros(self.batch * self.length, *text.shape[2:])
        for part, padded in ((self.text, text), (self.refs, refs), (self.image, image)):
            if padded is not None:
                joint = joint.index_copy(0, part.joint, part.gather(padded))
        return joint.unflatten(0, (self.batch, self.length))

    def tokens(self, joint: torch.Tensor, part: Part) -> torch.Tensor:
        """The valid tokens [n, ...] of one part taken from the joint batch."""
        return joint.flatten(0, 1).index_select(0, part.joint)

    def split(self, joint: torch.Tensor, part: Part) -> torch.Tensor:
        """The padded batch of one part taken from the joint batch."""
        return part.scatter(self.tokens(joint, part))


@dataclass
class RotaryEmbeddings:
    """Rotary (cos, sin) laid out like each attention input: text [B,L], refs [R,Nr], image [B,Ni],
    joint [B,S]; each [..., head_dim // 2, 2] float32."""

    text: torch.Tensor
    refs: torch.Tensor
    image: torch.Tensor
    joint: torch.Tensor
