"""Classifier-free guidance: which transformer passes a step needs, how they share one forward.

Branches, as in the reference: cond = prompt + input images; ref = negative prompt + input images;
uncond = negative prompt WITHOUT input images. Both scales > 1: three branches combined as
uncond + s_img (ref - uncond) + s_txt (cond - ref); only text guidance: uncond + s_txt (cond - uncond);
no guidance: cond alone.

All branches of a step can run as ONE transformer batch (rows cond..., ref..., uncond...): the
text of every row is padded to the longest and masked, so each row sees exactly what its own
forward would (equal within float rounding), with one launch per layer instead of three.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

COND, REF, UNCOND = "cond", "ref", "uncond"


@dataclass
class TextRows:
    """Embeddings + right-padded masks, one row per output image, and the valid lengths as ints."""

    embeds: torch.Tensor
    mask: torch.Tensor
    lengths: list[int]


@dataclass
class BranchBatch:
    """The transformer inputs of some branches stacked row-wise, in `branches` order."""

    branches: tuple[str, ...]
    rows: int  # output images per branch
    text: TextRows
    refs: list | None  # per row: None or a list of ref latents; None for the whole batch: no ref list

    def row_keys(self) -> list[tuple[str, int]]:
        """(branch, image index) of every row: the key of its step-cache state."""
        return [(branch, i) for branch in self.branches for i in range(self.rows)]


def active_branches(text_scale: float, image_scale: float, has_negative: bool) -> tuple[str, ...]:
    if text_scale <= 1.0 or not has_negative:
        return (COND,)
    return (COND, REF, UNCOND) if image_scale > 1.0 else (COND, UNCOND)


def branch_inputs(branch: str, cond: TextRows, uncond: TextRows | None, refs: list) -> tuple[TextRows, list | None]:
    """(text, refs) of one branch. cond passes the per-image ref list even when it holds only None
    (as the reference does); uncond passes no list."""
    if branch == COND:
        return cond, refs
    return uncond, (refs if branch == REF else None)


def stack_branches(branches, cond: TextRows, uncond: TextRows | None, refs: list) -> BranchBatch:
    """One batch holding every branch's rows; text padded to the longest branch."""
    parts = [branch_inputs(b, cond, uncond, refs) for b in branches]
    width = max(text.embeds.shape[1] for text, _ in parts)
    embeds = torch.cat([_pad(text.embeds, width) for text, _ in parts])
    mask = torch.cat([_pad(text.mask, width) for text, _ in parts])
    lengths = [n for text, _ in parts for n in text.lengths]
    rows = cond.embeds.shape[0]
    stacked_refs = None
    if any(r is not None for _, r in parts):
        stacked_refs = [item for _, r in parts for item in (r if r is not None else [None] * rows)]
    return BranchBatch(tuple(branches), rows, TextRows(embeds, mask, lengths), stacked_refs)


def _pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad dim 1 with zeros (masked out) to `width`."""
    extra = width - tensor.shape[1]
    if extra == 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], extra, *tensor.shape[2:])], dim=1)


def combine(velocities: dict[str, torch.Tensor], text_scale: float, image_scale: float) -> torch.Tensor:
    """The guided velocity from the branches' velocities (see the module docstring)."""
    cond = velocities[COND]
    if UNCOND not in velocities:
        return cond
    uncond = velocities[UNCOND]
    if REF in velocities:
        ref = velocities[REF]
        return uncond + image_scale * (ref - uncond) + text_scale * (cond - ref)
    return uncond + text_scale * (cond - uncond)
