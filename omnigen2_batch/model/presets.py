"""Named sets of pipeline options: `mode: exact` (the default) and `mode: fast`.

A preset only fills call options the recipe left unset; explicit recipe values win.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .cache import CacheConfig


@dataclass(frozen=True)
class SpeedPreset:
    """Pipeline call options that trade fidelity for speed.

    cfg_range: the fraction of the schedule where guidance runs; outside it only the cond branch
    runs (1 transformer row per image instead of 2-3). cache: the step cache. scheduler: the
    sampler (None: the model's own Euler).
    """

    name: str
    cfg_range: tuple[float, float] = (0.0, 1.0)
    cache: CacheConfig | None = None
    scheduler: str | None = None

    def call_kwargs(self, **explicit) -> dict:
        """Pipeline kwargs of this preset, with the caller's explicit (non-None) values on top."""
        kwargs = {"cfg_range": self.cfg_range, "cache": self.cache, "scheduler": self.scheduler}
        kwargs.update({k: v for k, v in explicit.items() if v is not None})
        return kwargs

    def describe(self) -> dict:
        return asdict(self)


EXACT = SpeedPreset(name="exact")

FAST = SpeedPreset(name="fast", cfg_range=(0.0, 0.6), cache=CacheConfig("taylorseer"), scheduler="dpmsolver++")
"""`mode: fast`: roughly 2x fewer transformer rows than exact, at a small cost in fidelity.

- cfg_range (0, 0.6): guidance only on the first 60% of the steps, where the layout and content
  are decided; the last 40% refine details from the cond branch alone (halves or thirds those
  steps' work). Prompt adherence of fine details and the effect of the negative prompt are what
  it trades.
- TaylorSeer (official settings 5 / 3 / 4): after five full steps, two of every three steps'
  joint layers are predicted from finite differences instead of computed. It trades small detail
  drift (the fixtures show max pixel changes of ~0.1 on the tiny model) for ~40% fewer full passes
  at 28-50 steps. TaylorSeer rather than TeaCache: its schedule is fixed, so the cost per image is
  predictable and independent of the content, and it needs no threshold calibrated per model.
- DPM-Solver++ (2nd order): keeps quality at lower step counts than Euler, so a recipe can cut
  `steps` further; with the same step count it costs the same.
Images differ from exact mode's; evaluation/bench_model.py measures by how much (PSNR) and the
time saved. Use exact mode for parity and final renders, fast mode for drafts and large sweeps.
"""

PRESETS = {"exact": EXACT, "fast": FAST}


def preset(name: str) -> SpeedPreset:
    if name not in PRESETS:
        raise ValueError(f"mode: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]
