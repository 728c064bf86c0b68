"""Flow-matching samplers with OmniGen2's conventions.

Time runs from t=0 (pure noise) to t=1 (the image), the opposite of diffusers' sigmas. The
schedule is k/N for k = 0..N-1, optionally warped by a resolution-dependent "dynamic time shift"
(larger images spend more steps near the noise end), with t=1 appended as the end point.

Two samplers share that schedule: the first-order Euler used by default, and DPM-Solver++
multistep on the data prediction x0 = x_t + (1 - t) * v. Both keep the class names of the
released checkpoint's scheduler_config.json, so that file loads as published.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


@dataclass
class FlowSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


def flow_timesteps(num_steps: int, num_tokens: int | None, dynamic_time_shift: bool) -> torch.Tensor:
    """The N sampling times in [0, 1), float32.

    m = sqrt(num_tokens) / 40 (num_tokens = latent height * width; m = 1 at 320x320 pixels), and
    t <- t / (m - m t + t). Computed in float64 from the float32 grid, then rounded to float32,
    which is what the reference schedule produces bit for bit.
    """
    grid = np.linspace(0, 1, num_steps + 1, dtype=np.float32)[:-1]
    times = grid.astype(np.float64)
    if dynamic_time_shift and num_tokens is not None:
        m = np.sqrt(num_tokens) / 40
        times = times / (m - m * times + times)
    return torch.from_numpy(times).to(torch.float32)


class _FlowSchedule:
    """State shared by both samplers: the time grid and a step counter."""

    order = 1
    init_noise_sigma = 1.0

    def set_timesteps(self, num_inference_steps: int, device=None, num_tokens: int | None = None):
        times = flow_timesteps(num_inference_steps, num_tokens, self.config.dynamic_time_shift)
        self.num_inference_steps = num_inference_steps
        self.timesteps = times.to(device)
        # Kept on the CPU: scalars indexed from here mix freely with tensors on any device.
        self.times_with_end = torch.cat([times, torch.ones(1)])
        self._step_index = 0
        self._reset_history()

    def _reset_history(self) -> None:
        pass

    @property
    def step_index(self) -> int:
        return self._step_index

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class FlowMatchEulerDiscreteScheduler(_FlowSchedule, SchedulerMixin, ConfigMixin):
    """x <- x + (t_next - t) * v, the sample upcast to float32 and cast back to v's dtype."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, dynamic_time_shift: bool = True):
        self.timesteps = None
        self._step_index = 0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        t = self.times_with_end[self._step_index]
        t_next = self.times_with_end[self._step_index + 1]
        prev = (sample.to(torch.float32) + (t_next - t) * model_output).to(model_output.dtype)
        self._step_index += 1
        return FlowSchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class DPMSolverMultistepScheduler(_FlowSchedule, SchedulerMixin, ConfigMixin):
    """DPM-Solver++ (multistep, orders 1-3) for a velocity-predicting flow model.

    In flow terms sigma = 1 - t and alpha = t, lambda = log(alpha / sigma); the model's velocity
    becomes a data prediction x0 = x + sigma * v. The first step (alpha = 0) and the last
    (sigma = 0) reduce to first order through infinite lambdas, as in the reference.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        solver_order: int = 2,
        prediction_type: str = "flow_prediction",
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
        dynamic_time_shift: bool = True,
    ):
        if algorithm_type != "dpmsolver++" or prediction_type != "flow_prediction":
            raise ValueError(
                f"DPMSolverMultistepScheduler here supports algorithm_type 'dpmsolver++' with "
                f"prediction_type 'flow_prediction' only, got {algorithm_type!r} / {prediction_type!r}")
        if solver_type not in ("midpoint", "heun") or solver_order not in (1, 2, 3):
            raise ValueError(f"solver_type must be midpoint|heun and solver_order 1-3, got "
                             f"{solver_type!r} / {solver_order}")
        self.timesteps = None
        self._step_index = 0
        self._reset_history()

    def _reset_history(self) -> None:
        self.data_predictions: list[torch.Tensor] = []

    def _sigma(self, index: int) -> torch.Tensor:
        return 1 - self.times_with_end[index]

    def _lambda(self, index: int) -> torch.Tensor:
        sigma = self._sigma(index)
        return torch.log(1 - sigma) - torch.log(sigma)

    def _order_now(self) -> int:
        n, i = self.num_inference_steps, self._step_index
        last = i == n - 1 and (self.config.euler_at_final or self.config.final_sigmas_type == "zero"
                               or (self.config.lower_order_final and n < 15))
        second_last = i == n - 2 and self.config.lower_order_final and n < 15
        order = min(self.config.solver_order, len(self.data_predictions))
        if last:
            return 1
        return min(order, 2) if second_last else order

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        x0 = sample + self._sigma(self._step_index) * model_output
        self.data_predictions = (self.data_predictions + [x0])[-self.config.solver_order:]
        update = (self._first_order, self._second_order, self._third_order)[self._order_now() - 1]
        prev = update(sample.to(torch.float32)).to(model_output.dtype)
        self._step_index += 1
        return FlowSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _coefficients(self):
        i = self._step_index
        sigma_t, sigma_s = self._sigma(i + 1), self._sigma(i)
        h = self._lambda(i + 1) - self._lambda(i)
        return sigma_t / sigma_s, 1 - sigma_t, h

    def _first_order(self, sample: torch.Tensor) -> torch.Tensor:
        ratio, alpha_t, h = self._coefficients()
        return ratio * sample - alpha_t * (torch.exp(-h) - 1.0) * self.data_predictions[-1]

    def _second_order(self, sample: torch.Tensor) -> torch.Tensor:
        ratio, alpha_t, h = self._coefficients()
        i = self._step_index
        m0, m1 = self.data_predictions[-1], self.data_predictions[-2]
        r0 = (self._lambda(i) - self._lambda(i - 1)) / h
        d1 = (1.0 / r0) * (m0 - m1)
        base = ratio * sample - alpha_t * (torch.exp(-h) - 1.0) * m0
        if self.config.solver_type == "midpoint":
            return base - 0.5 * alpha_t * (torch.exp(-h) - 1.0) * d1
        return base + alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) * d1

    def _third_order(self, sample: torch.Tensor) -> torch.Tensor:
        ratio, alpha_t, h = self._coefficients()
        i = self._step_index
        m0, m1, m2 = self.data_predictions[-1], self.data_predictions[-2], self.data_predictions[-3]
        r0 = (self._lambda(i) - self._lambda(i - 1)) / h
        r1 = (self._lambda(i - 1) - self._lambda(i - 2)) / h
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        eh = torch.exp(-h) - 1.0
        return (ratio * sample - alpha_t * eh * m0 + alpha_t * (eh / h + 1.0) * d1
                - alpha_t * ((eh + h) / h ** 2 - 0.5) * d2)


SCHEDULERS = {"euler": FlowMatchEulerDiscreteScheduler, "dpmsolver++": DPMSolverMultistepScheduler}


def make_scheduler(name: str, dynamic_time_shift: bool = True):
    """A fresh sampler by its recipe name ("euler" | "dpmsolver++"); state is per call."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    return SCHEDULERS[name](dynamic_time_shift=dynamic_time_shift)
