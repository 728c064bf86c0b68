"""Step caches: skip or predict the joint layers on some denoising steps (TeaCache, TaylorSeer).

Both follow the official OmniGen2 inference options (tests/fixtures/parity/feature_cases/README.md
states their rules in words) with three deliberate differences:
- every row of a transformer batch (one guidance branch of one output image) has its own state
  and takes its own decision, so an image never depends on what it was batched with (the
  official TeaCache averages its distance over the whole batch, padding included);
- the state lives in a `StepCache` made fresh for each pipeline call and dropped after it, so
  nothing leaks from one call to the next (official TaylorSeer stays switched on and stale);
- TaylorSeer skips the embedders and refiners when every row of a call is predicted (official
  runs them and discards the result).

The pipeline binds the cache to a transformer call with `begin(step, rows)`, rows being keys
(branch, image index); the transformer then calls `skip_refiners()` and `run(...)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it runs: CacheConfig (and the presets built on it)
    import torch   # must stay importable by the torch-free plan layer, which applies `mode`

# TeaCache's rescale polynomial, highest power first, calibrated by the official code on the
# real model (f(0) < 0: a near-zero change lowers the accumulator).
TEACACHE_COEFFICIENTS = (-5.48259225, 11.48772289, -4.47407401, 2.47730926, -0.03316487)
FULL, SKIP, TAYLOR = "F", "S", "T"  # per-row modes, the letters of the fixtures' patterns


@dataclass(frozen=True)
class CacheConfig:
    """Which step cache a pipeline call uses.

    kind "none": exact. "teacache": skip the joint layers while the accumulated, rescaled relative
    change of the first layer's modulated input stays below `threshold` (official default 0.05;
    larger skips more). "taylorseer": run the joint layers on the first `first_enhance` calls of a
    branch and then every `fresh_threshold`-th call, and predict the others from a Taylor
    expansion of up to `max_order` finite differences (official defaults 5 / 3 / 4).
    """

    kind: str = "none"
    threshold: float = 0.05
    coefficients: tuple[float, ...] = TEACACHE_COEFFICIENTS
    first_enhance: int = 5
    fresh_threshold: int = 3
    max_order: int = 4

    def __post_init__(self):
        if self.kind not in ("none", "teacache", "taylorseer"):
            raise ValueError(f"cache: kind must be none | teacache | taylorseer, got {self.kind!r}")
        if self.threshold < 0 or self.first_enhance < 1 or self.fresh_threshold < 1 or self.max_order < 0:
            raise ValueError(f"cache: invalid settings {self}")

    def make(self, num_steps: int) -> StepCache | None:
        """A fresh per-call state (None for kind "none")."""
        if self.kind == "teacache":
            return TeaCache(self, num_steps)
        if self.kind == "taylorseer":
            return TaylorSeer(self, num_steps)
        return None


class StepCache:
    """Per-call state shared by both caches: the current step and the rows of the current call."""

    def __init__(self, config: CacheConfig, num_steps: int):
        self.config = config
        self.num_steps = num_steps
        self.step = 0
        self.rows: list = []
        self.modes: dict = {}  # row key -> mode letter of the latest call

    def begin(self, step: int, rows: list) -> None:
        """Bind to the next transformer call: denoising step index and one key per batch row."""
        self.step, self.rows = step, list(rows)

    def skip_refiners(self) -> bool:
        return False

    def run(self, model, joint, layout, rotary, temb) -> torch.Tensor:
        raise NotImplementedError


def _valid(tensor: torch.Tensor, layout, row: int) -> torch.Tensor:
    """One row's valid tokens [n, D] of a padded [B, S, D] tensor."""
    return tensor[row, : layout.seq_lens[row]]


@dataclass
class _TeaState:
    accumulated: float = 0.0
    previous: torch.Tensor | None = None  # modulated input of the previous call
    residual: torch.Tensor | None = None  # joint output - joint input of the last computed call


class TeaCache(StepCache):
    """Skip the joint layers of a row while its input has changed little since the last full call."""

    def __init__(self, config: CacheConfig, num_steps: int):
        super().__init__(config, num_steps)
        self.states: dict = {}

    def _rescale(self, distance: float) -> float:
        value = 0.0
        for coefficient in self.config.coefficients:  # Horner, float64 like numpy.poly1d
            value = value * distance + coefficient
        return value

    def _distances(self, modulated, layout, states) -> list[float | None]:
        """Relative L1 change per row (None where there is nothing to compare), one host sync."""
        values, rows = [], []
        for row, state in enumerate(states):
            if state.previous is not None and state.previous.shape == _valid(modulated, layout, row).shape:
                current = _valid(modulated, layout, row)
                values.append((current - state.previous).abs().mean() / state.previous.abs().mean())
                rows.append(row)
        import torch

        found = torch.stack(values).float().tolist() if values else []
        distances = [None] * len(states)
        for row, value in zip(rows, found):
            distances[row] = value
        return distances

    def run(self, model, joint, layout, rotary, temb) -> torch.Tensor:
        states = [self.states.setdefault(key, _TeaState()) for key in self.rows]
        modulated = model.layers[0].norm1(joint, temb)[0]
        edge = self.step == 0 or self.step == self.num_steps - 1
        compute = []
        for row, (state, distance) in enumerate(zip(states, self._distances(modulated, layout, states))):
            if edge or distance is None or state.residual is None:
                compute.append(row)
            else:
                state.accumulated += self._rescale(distance)
                if state.accumulated >= self.config.threshold:
                    compute.append(row)
            state.previous = _valid(modulated, layout, row).clone()
        out = model.joint_layers(joint, layout, rotary, temb, rows=compute) if compute else joint.clone()
        for row, state in enumerate(states):
            key = self.rows[row]
            if row in compute:
                state.accumulated = 0.0
                state.residual = _valid(out, layout, row) - _valid(joint, layout, row)
                self.modes[key] = FULL
            else:
                out[row, : layout.seq_lens[row]] = _valid(joint, layout, row) + state.residual
                self.modes[key] = SKIP
        return out


@dataclass
class _TaylorState:
    calls: int = 0  # this branch's own call counter
    since_full: int = 0  # Taylor calls since the last full call
    full_calls: list = field(default_factory=list)  # counters of the full calls
    factors: list = field(default_factory=list)  # D0..Dk of the last joint layer's output, [n, D]
    mode: str = FULL


class TaylorSeer(StepCache):
    """Predict the joint layers' output from finite differences of earlier full calls.

    Only the last joint layer's output is kept: on a predicted call every layer's output would be
    replaced by its own prediction, so only the last one reaches the output norm.
    """

    def __init__(self, config: CacheConfig, num_steps: int):
        super().__init__(config, num_steps)
        self.states: dict = {}

    def begin(self, step: int, rows: list) -> None:
        super().begin(step, rows)
        for key in self.rows:  # decide now: the decision needs no data, so refiners may be skipped
            state = self.states.setdefault(key, _TaylorState())
            state.mode = self._mode(state)
            self.modes[key] = state.mode

    def _mode(self, state: _TaylorState) -> str:
        c = self.config
        warming_up = state.calls < c.first_enhance
        if warming_up or state.since_full == c.fresh_threshold - 1 or not state.factors:
            state.since_full = 0
            return FULL
        state.since_full += 1
        return TAYLOR

    def skip_refiners(self) -> bool:
        return all(self.states[key].mode == TAYLOR for key in self.rows)

    def run(self, model, joint, layout, rotary, temb) -> torch.Tensor:
        states = [self.states[key] for key in self.rows]
        compute = [row for row, state in enumerate(states) if state.mode == FULL]
        if joint is None:
            joint = temb.new_zeros(layout.batch, layout.length, model.config.hidden_size)
        out = model.joint_layers(joint, layout, rotary, temb, rows=compute) if compute else joint.clone()
        for row, state in enumerate(states):
            if state.mode == FULL:
                self._refresh(state, _valid(out, layout, row))
            else:
                out[row, : layout.seq_lens[row]] = self._predict(state)
            state.calls += 1
        return out

    def _refresh(self, state: _TaylorState, output: torch.Tensor) -> None:
        """New D0 = output; D(i+1) = (new Di - old Di) / distance once past the warm-up."""
        s = state.calls
        if s == 0:
            state.factors, state.full_calls = [], [0]
        state.full_calls.append(s)
        distance = state.full_calls[-1] - state.full_calls[-2]
        new = [output]
        if s > self.config.first_enhance - 2:
            for i, old in enumerate(state.factors[: self.config.max_order]):
                new.append((new[i] - old) / distance)
        state.factors = new

    @staticmethod
    def _predict(state: _TaylorState) -> torch.Tensor:
        x = state.calls - state.full_calls[-1]
        return sum((1 / math.factorial(i)) * d * (x**i) for i, d in enumerate(state.factors))
