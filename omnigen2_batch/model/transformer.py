"""OmniGen2's diffusion transformer, batched.

Per sample the joint sequence is [valid text][ref image 1]...[ref image k][noisy image], right-padded
to the longest sample and masked (see layout.py). Before the joint layers, three refiners work on
the parts alone: the context refiner on the text, the noise refiner on the noisy image, the
ref-image refiner on each reference image as its own sequence.

The forward never reads a tensor's values back to the host when the caller passes `text_lens`
(the pipeline does): every shape decision comes from Python ints, so the accelerator never stalls.
An optional `step_cache` (cache.py) may replace the joint layers by a cached estimate.

Config keys, parameter names and the forward call follow the released checkpoint and the reference
code (see tests/fixtures/parity/README.md for the architecture in words).
"""
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import LuminaLayerNormContinuous
from torch import nn

from .blocks import OmniGen2TransformerBlock, TimestepCaptionEmbedding, conditioning_width
from .layout import RotaryEmbeddings, SequenceLayout, patchify, unpatchify
from .lora import make_adaptable
from .rope import cos_sin_tables, gather_rotary, rope_tables

MAX_REF_IMAGES = 5  # rows of image_index_embedding
LAYOUT_CACHE_SIZE = 16  # batch shapes remembered (a call uses one or two)


class OmniGen2Transformer2DModel(ModelMixin, ConfigMixin):
    _no_split_modules = ["OmniGen2TransformerBlock"]
    _repeated_blocks = ["OmniGen2TransformerBlock"]  # what compile_repeated_blocks compiles
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
        self._layouts = {}  # (shape key, device) -> (SequenceLayout, RotaryEmbeddings | None)
        # Run the joint layers per group of equally long samples, without a mask: fused attention
        # kernels (flash) take no mask. Same values as the padded path, more (smaller) launches.
        self.bucket_by_length = False
        make_adaptable(self)  # every Linear can carry LoRA terms (lora.py); no parameter changes


    # -- rotary tables and layouts --------------------------------------------------------------

    def rope_tables(self, device=None) -> list[torch.Tensor]:
        """The three complex128 `freqs_cis` tables of this config (the official argument form)."""
        return rope_tables(self.config.axes_dim_rope, self.config.axes_lens)

    def cos_sin_tables(self, device=None) -> list[torch.Tensor]:
        """This config's rotary tables as real (cos, sin) float64 [len, dim/2, 2], cached per device."""
        key = torch.device(device or "cpu")
        if key not in self._rope_tables:
            self._rope_tables[key] = [t.to(key) for t in cos_sin_tables(self.rope_tables())]
        return self._rope_tables[key]

    def sequence_layout(self, text_attention_mask, images, ref_images, text_lens=None) -> SequenceLayout:
        """Layout of a batch: images are [C,H,W] latents, ref_images[b] a list of them or None.

        text_lens: valid text tokens per sample as Python ints; None reads them from the mask
        (one host sync, and a check that the mask is right-padded).
        """
        return self._layout(text_attention_mask, images, ref_images, text_lens, None)[0]

    def _layout(self, text_mask, images, ref_images, text_lens, freqs_cis):
        """(layout, rotary), both cached per batch shape when the model's own tables are used."""
        if text_lens is None:
            text_lens = _right_padded_lengths(text_mask)
        p = self.config.patch_size
        ref_images = [refs or [] for refs in ref_images]
        if any(len(refs) > MAX_REF_IMAGES for refs in ref_images):
            raise ValueError(f"ref_image_hidden_states: at most {MAX_REF_IMAGES} reference images per sample")
        ref_grids = tuple(tuple((r.shape[-2] // p, r.shape[-1] // p) for r in refs) for refs in ref_images)
        image_grids = tuple((img.shape[-2] // p, img.shape[-1] // p) for img in images)
        device = text_mask.device
        key = (tuple(text_lens), text_mask.shape[1], ref_grids, image_grids, device)
        if freqs_cis is None and key in self._layouts:
            return self._layouts[key]
        layout = SequenceLayout.build(list(text_lens), text_mask.shape[1], ref_grids, image_grids, device=device)
        tables = self.cos_sin_tables(device) if freqs_cis is None else cos_sin_tables(freqs_cis)
        rotary = self.rotary_embeddings(tables, layout)
        if freqs_cis is None:
            if len(self._layouts) >= LAYOUT_CACHE_SIZE:
                self._layouts.clear()
            self._layouts[key] = (layout, rotary)
        return layout, rotary

    def rotary_embeddings(self, tables, layout: SequenceLayout) -> RotaryEmbeddings:
        """tables: `cos_sin_tables` (or complex `freqs_cis`, converted)."""
        if tables[0].is_complex():
            tables = cos_sin_tables(tables)
        joint = gather_rotary([table.to(layout.position_ids.device) for table in tables], layout.position_ids)
        return RotaryEmbeddings(
            text=layout.split(joint, layout.text),
            refs=layout.split(joint, layout.refs),
            image=layout.split(joint, layout.image),
            joint=joint,
        )

    # -- the parts before the joint layers ------------------------------------------------------

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

    def _refined_joint(self, text, hidden_states, ref_images, layout, rotary, temb) -> torch.Tensor:
        """The joint input [B, S, D]: refined text, ref images and noisy image, padded."""
        for block in self.context_refiner:
            text = block(text, layout.text.mask, rotary.text)
        image = layout.image.scatter(self.x_embedder(self._patch_tokens(hidden_states)))
        for block in self.noise_refiner:
            image = block(image, layout.image.mask, rotary.image, temb)
        refs = self._refine_refs(ref_images, layout, temb, rotary.refs) if layout.refs.rows else None
        return layout.join(text, refs, image)

    # -- the joint layers -------------------------------------------------------------------------

    def joint_layers(self, joint, layout: SequenceLayout, rotary, temb, rows=None) -> torch.Tensor:
        """The joint layers applied to `rows` (Python ints; None: all) of the padded joint batch.

        Rows not listed come back unchanged. Each group of rows runs at its own longest length, so
        a group without padding needs no mask (see `bucket_by_length`).
        """
        rows = list(range(layout.batch)) if rows is None else list(rows)
        out = joint
        for group in self._row_groups(layout, rows):
            length = max(layout.seq_lens[r] for r in group)
            whole = len(group) == layout.batch and length == layout.length
            if whole:
                x, rot, t, mask = joint, rotary, temb, layout.joint_mask
            else:
                index = torch.tensor(group, device=joint.device)
                x, rot, t = joint[index, :length], rotary[index, :length], temb[index]
                padded = any(layout.seq_lens[r] < length for r in group)
                mask = layout.joint_mask[index, :length] if padded else None
            for block in self.layers:
                x = block(x, mask, rot, t)
            if whole:
                out = x
            else:
                out = joint.clone() if out is joint else out
                out[index, :length] = x
        return out

    def _row_groups(self, layout: SequenceLayout, rows: list[int]) -> list[list[int]]:
        if not self.bucket_by_length or layout.joint_mask is None:
            return [rows] if rows else []
        groups: dict[int, list[int]] = {}
        for r in rows:
            groups.setdefault(layout.seq_lens[r], []).append(r)
        return list(groups.values())

    def forward(
        self,
        hidden_states,
        timestep: torch.Tensor,
        text_hidden_states: torch.Tensor,
        freqs_cis,
        text_attention_mask: torch.Tensor,
        ref_image_hidden_states=None,
        return_dict: bool = False,
        text_lens: list[int] | None = None,
        step_cache=None,
    ):
        """Velocity for noisy latents `hidden_states` ([B,C,H,W], or a list of [C,H_i,W_i] giving a list back).

        timestep [B] in [0, 1] (1 = clean); text_hidden_states [B,L,text_feat_dim] with a right-padded
        text_attention_mask [B,L]; freqs_cis the 3 rope tables (None: this model's own);
        ref_image_hidden_states None or, per sample, None or a list of [C,h,w] latents.
        text_lens: the mask's row sums as Python ints (saves a host sync). step_cache: a per-call
        cache (cache.py) bound to this call's rows, or None for the exact computation.
        """
        # 1. Shapes, from Python ints only.
        is_tensor = isinstance(hidden_states, torch.Tensor)
        images = [hidden_states[0]] * hidden_states.shape[0] if is_tensor else list(hidden_states)
        batch = len(images)
        ref_images = ref_image_hidden_states or [None] * batch
        if len(ref_images) != batch:
            raise ValueError(
                f"ref_image_hidden_states has {len(ref_images)} entries for a batch of {batch}: "
                "give one per sample (None for a sample without refs)"
            )
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        layout, rotary = self._layout(text_attention_mask, images, ref_images, text_lens, freqs_cis)

        # 2. Embeddings, refiners and the joint sequence (not needed when the cache predicts every row).
        temb, text = self.time_caption_embed(timestep, text_hidden_states, images[0].dtype)
        joint = None
        if step_cache is None or not step_cache.skip_refiners():
            joint = self._refined_joint(text, hidden_states, ref_images, layout, rotary, temb)

        # 3. Joint layers: computed, or estimated by the step cache.
        if step_cache is None:
            joint = self.joint_layers(joint, layout, rotary.joint, temb)
        else:
            joint = step_cache.run(self, joint, layout, rotary.joint, temb)

        # 4. Output norm and projection on the noisy image's tokens, back to latents.
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


def _right_padded_lengths(text_mask: torch.Tensor) -> list[int]:
    """Valid tokens per row of a right-padded mask (reads the mask on the host, once)."""
    mask = text_mask.bool()
    lengths = mask.sum(dim=1)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device)[None] < lengths[:, None]):
        raise ValueError("text_attention_mask must be right-padded: each row's valid tokens first, then padding")
    return lengths.tolist()
