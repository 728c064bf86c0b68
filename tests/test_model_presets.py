"""`mode: fast`: a preset of call options; explicit values win; it runs fewer full passes."""
import pytest
import torch

from omnigen2_batch.model import load_pipeline
from omnigen2_batch.model.presets import EXACT, FAST, preset


def test_explicit_values_override_the_preset():
    kwargs = FAST.call_kwargs(scheduler="euler", cfg_range=None)
    assert kwargs["scheduler"] == "euler" and kwargs["cfg_range"] == FAST.cfg_range
    assert kwargs["cache"] is FAST.cache and FAST.cache.kind == "taylorseer"
    assert EXACT.call_kwargs() == {"cfg_range": (0.0, 1.0), "cache": None, "scheduler": None}
    assert preset("fast") is FAST
    with pytest.raises(ValueError, match="mode"):
        preset("turbo")


def test_fast_runs_fewer_joint_passes_and_stays_close():
    pipe = load_pipeline("tiny")
    rows = {}
    for p in (EXACT, FAST):
        seen = []
        handle = pipe.transformer.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
        try:
            images = pipe(["a fox"], height=32, width=32, num_inference_steps=12, output_type="pt",
                          generator=torch.Generator().manual_seed(0), **p.call_kwargs()).images
        finally:
            handle.remove()
        rows[p.name] = (sum(seen), images)
    # exact: 12 steps x 2 rows = 24. fast: uncond only on the 8 guided steps, and TaylorSeer
    # predicts 5 cond and 2 uncond calls: 13 rows reach the joint layers.
    assert rows["fast"][0] < 0.6 * rows["exact"][0]
    diff = (rows["fast"][1] - rows["exact"][1]).abs()
    assert 0 < diff.mean().item() < 0.1
