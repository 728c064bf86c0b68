"""OmniGen2's diffusion transformer, batched.

Per sample the joint sequence is [valid text][ref image 1]...[ref image k][noisy image], right-padded
to the longest sample and masked. Before the joint layers, three refiners work on the parts alone:
the context refiner on the text, the noise refiner on the noisy image, the ref-image refiner on each
reference image as its own sequence. `SequenceLayout` precomputes, once per call, where every valid
token of each part sits in its own padded batch and in the joint batch, so moving tokens between
them is one index_select/index_copy per part instead of per-sample loops.

Config keys, parameter names and the forward call follow the released checkpoint and the reference
code (see tests/fixtures/parity/README.md for the architecture in words).
"""
from dataclasses import dataclass, fields, replace

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import LuminaLayerNormContinuous
from torch import nn

from .blocks import OmniGen2TransformerBlock, TimestepCaptionEmbedding, conditioning_width
from .rope import gather_rotary, rope_tables, sample_position_ids

MAX_REF_IMAGES = 5  # rows of image_index_embedding


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
    """Rotary phasors laid out like each attention input: text [B,L], refs [R,Nr], image [B,Ni], joint [B,S]."""

    text: torch.Tensor
    refs: torch.Tensor
    image: torch.Tensor
    joint: torch.Tensor


class OmniGen2Transformer2DModel(ModelMixin, ConfigMixin):
    _no_split_modules = ["OmniGen2TransformerBlock"]
    _skip_layerwise_casting_patterns = ["x_embedder", "norm"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 16,
        out_channels: int | None = None,
        hidden_size: int = 2304,
        num_layers: int = 26,
        num_refiner_layers: int = 2,
        num_attention_heads: int = 24,
        num_kv_heads: int = 8,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        norm_eps: float = 1e-5,
        axes_dim_rope: tuple[int, int, int] = (32, 32, 32),
        axes_lens: tuple[int, int, int] = (300, 512, 512),
        text_feat_dim: int = 1024,
        timestep_scale: float = 1.0,
    ):
        super().__init__()
        if hidden_size // num_attention_heads != sum(axes_dim_rope):
            raise ValueError(
                f"transformer config: hidden_size // num_attention_heads ({hidden_size // num_attention_heads}) "
                f"must equal sum(axes_dim_rope) ({sum(axes_dim_rope)})"
            )
        patch_features = patch_size * patch_size * in_channels
        out_features = patch_size * patch_size * (out_channels or in_channels)

        shape = (hidden_size, num_attention_heads, num_kv_heads, multiple_of, ffn_dim_multiplier, norm_eps)

        def blocks(count, modulation):
            return nn.ModuleList(OmniGen2TransformerBlock(*shape, modulation) for _ in range(count))

        self.x_embedder = nn.Linear(patch_features, hidden_size)
        self.ref_image_patch_embedder = nn.Linear(patch_features, hidden_size)
        self.time_caption_embed = TimestepCaptionEmbedding(hidden_size, text_feat_dim, norm_eps, timestep_scale)
        self.noise_refiner = blocks(num_refiner_layers, modulation=True)
        self.ref_image_refiner = blocks(num_refiner_layers, modulation=True)
        self.context_refiner = blocks(num_refiner_layers, modulation=False)
        self.layers = blocks(num_layers, modulation=True)
        self.norm_out = LuminaLayerNormContinuous(
            hidden_size, conditioning_width(hidden_size), elementwise_affine=False, eps=1e-6, out_dim=out_features
        )
        # Added to every token of the j-th reference image so the model can tell them apart.
        self.image_index_embedding = nn.Parameter(torch.randn(MAX_REF_IMAGES, hidden_size) * 0.02)
        self._rope_tables = {}

    def rope_tables(self, device=None) -> list[torch.Tensor]:
        """The three complex128 `freqs_cis` tables of this config (cached per device)."""
        key = torch.device(device or "cpu")
        if key not in self._rope_tables:
            tables = rope_tables(self.config.axes_dim_rope, self.config.axes_lens)
            self._rope_tables[key] = [table.to(key) for table in tables]
        return self._rope_tables[key]

    def sequence_layout(self, text_attention_mask, images, ref_images) -> SequenceLayout:
        """Layout of a batch: images are [C,H,W] latents, ref_images[b] a list of them or None."""
        mask = text_attention_mask.bool()
        text_lens = mask.sum(dim=1)
        if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device)[None] < text_lens[:, None]):
            raise ValueError("text_attention_mask must be right-padded: each row's valid tokens first, then padding")
        p = self.config.patch_size
        ref_images = [refs or [] for refs in ref_images]
        if any(len(refs) > MAX_REF_IMAGES for refs in ref_images):
            raise ValueError(f"ref_image_hidden_states: at most {MAX_REF_IMAGES} reference images per sample")
        return SequenceLayout.build(
            text_lens.tolist(),
            mask.shape[1],
            [[(r.shape[-2] // p, r.shape[-1] // p) for r in refs] for refs in ref_images],
            [(img.shape[-2] // p, img.shape[-1] // p) for img in images],
            device=mask.device,
        )

    def rotary_embeddings(self, freqs_cis, layout: SequenceLayout) -> RotaryEmbeddings:
        joint = gather_rotary([table.to(layout.position_ids.device) for table in freqs_cis], layout.position_ids)
        return RotaryEmbeddings(
            text=layout.split(joint, layout.text),
            refs=layout.split(joint, layout.refs),
            image=layout.split(joint, layout.image),
            joint=joint,
        )

    def _patch_tokens(self, latents) -> torch.Tensor:
        """All patches [sum of tokens, p*p*C] of a [N,C,H,W] tensor or a list of [C,H,W] latents, in order."""
        p = self.config.patch_size
        if isinstance(latents, torch.Tensor):
            return patchify(latents, p).flatten(0, 1)
        return torch.cat([patchify(x.unsqueeze(0), p)[0] for x in latents])

    def _refine_refs(self, ref_images, layout: SequenceLayout, temb, rotary) -> torch.Tensor:
        """Embedded, index-tagged and refined ref images [R, Nr, D], each its own sequence."""
        tokens = self._patch_tokens([ref for refs in ref_images if refs for ref in refs])
        tokens = self.ref_image_patch_embedder(tokens) + self.image_index_embedding[layout.ref_token_slot]
        refs, ref_temb = layout.refs.scatter(tokens), temb[layout.ref_owner]
        for block in self.ref_image_refiner:
            refs = block(refs, layout.refs.mask, rotary, ref_temb)
        return refs

    def forward(
        self,
        hidden_states,
        timestep: torch.Tensor,
        text_hidden_states: torch.Tensor,
        freqs_cis,
        text_attention_mask: torch.Tensor,
        ref_image_hidden_states=None,
        return_dict: bool = False,
    ):
        """Velocity for noisy latents `hidden_states` ([B,C,H,W], or a list of [C,H_i,W_i] giving a list back).

        timestep [B] in [0, 1] (1 = clean); text_hidden_states [B,L,text_feat_dim] with a right-padded
        text_attention_mask [B,L]; freqs_cis the 3 rope tables (None: this model's own
        `rope_tables()`); ref_image_hidden_states None or, per sample, None or a list of [C,h,w] latents.
        """
        is_tensor = isinstance(hidden_states, torch.Tensor)
        images = list(hidden_states)
        batch = len(images)
        ref_images = ref_image_hidden_states or [None] * batch
        if len(ref_images) != batch:
            raise ValueError(
                f"ref_image_hidden_states has {len(ref_images)} entries for a batch of {batch}: "
                "give one per sample (None for a sample without refs)"
            )
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        freqs_cis = self.rope_tables(images[0].device) if freqs_cis is None else freqs_cis

        temb, text = self.time_caption_embed(timestep, text_hidden_states, images[0].dtype)
        layout = self.sequence_layout(text_attention_mask, images, ref_images)
        rotary = self.rotary_embeddings(freqs_cis, layout)

        for block in self.context_refiner:
            text = block(text, layout.text.mask, rotary.text)

        image = layout.image.scatter(self.x_embedder(self._patch_tokens(hidden_states)))
        for block in self.noise_refiner:
            image = block(image, layout.image.mask, rotary.image, temb)
        refs = self._refine_refs(ref_images, layout, temb, rotary.refs) if layout.refs.rows else None

        joint = layout.join(text, refs, image)
        for block in self.layers:
            joint = block(joint, layout.joint_mask, rotary.joint, temb)
        out_tokens = layout.tokens(self.norm_out(joint, temb), layout.image)

        output = self._unpatchify_images(out_tokens, layout, stack=is_tensor)
        return Transformer2DModelOutput(sample=output) if return_dict else output

    def _unpatchify_images(self, tokens, layout: SequenceLayout, stack: bool):
        p = self.config.patch_size
        if stack:  # one shared size: a single reshape
            rows, cols = layout.image_grids[0]
            return unpatchify(tokens.unflatten(0, (layout.batch, -1)), rows, cols, p)
        chunks = tokens.split([rows * cols for rows, cols in layout.image_grids])
        return [unpatchify(chunk[None], rows, cols, p)[0] for chunk, (rows, cols) in zip(chunks, layout.image_grids)]
