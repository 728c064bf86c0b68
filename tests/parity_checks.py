"""What every parity test compares: our tensor against the official one, within one tolerance."""
from __future__ import annotations

ATOL = 1e-4  # the parity contract: outputs and latents of the official pipeline, in float32


def assert_close(ours, theirs, what: str, atol: float = ATOL) -> None:
    ours, theirs = ours.detach().float().cpu(), theirs.float()
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    diff = (ours - theirs).abs().max().item()
    assert diff <= atol, f"{what}: max |diff| {diff:.3g} > {atol}"
