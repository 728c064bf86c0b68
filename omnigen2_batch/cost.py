"""What a plan costs: transformer forwards and rough GPU-seconds, best and worst case.

Pure arithmetic over jobs: `plan` prints it before anything runs, so a sweep's price is known
before it is paid. No torch here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .jobs import Job

# Rough transformer cost, from the official pipeline on one H200, bf16, 50 steps
# (/work/shared/ENVIRONMENT.md): t2i 1024x1024 = 10.5 s for 100 forwards (2 per step with text
# CFG) -> 0.1 s per forward per megapixel of tokens; cfg_range (0, 0.6) 8.3 s for 81 forwards
# agrees; an edit with one 1024x1024 input (its tokens join the sequence, 3 forwards per step)
# 27.0 s for 150 forwards is 0.18 s (the model says 0.21). Small images are launch-bound:
# 512x512 batched 8 per call = 2.3 s per image, 0.023 s per forward, the floor used here.
SECONDS_PER_FORWARD_MEGAPIXEL = 0.10
MIN_SECONDS_PER_FORWARD = 0.023
COST_BASIS = ("rough H200 bf16 seconds from the official pipeline's timings; ignores the "
              "MLLM, VAE and scoring, and counts each input image as output-sized")


@dataclass(frozen=True)
class Estimate:
    jobs: int
    images: int  # one attempt per candidate, every job passing at once
    images_worst: int  # every job spends its attempt budget
    forwards: int  # transformer forward passes
    forwards_worst: int
    gpu_seconds: float
    gpu_seconds_worst: float
    basis: str = COST_BASIS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def forwards_per_image(job: Job) -> int:
    """Transformer forwards for one image: inside cfg_range 3 with text and image guidance,
    2 with text guidance only, else 1 (the official sampler's rule)."""
    start, end = job.cfg_range
    guided = sum(1 for i in range(job.steps) if start <= i / job.steps <= end)
    per_guided = 1 + (job.text_guidance > 1) + (job.text_guidance > 1 and job.image_guidance > 1
                                                 and bool(job.inputs))
    return guided * per_guided + (job.steps - guided)


def seconds_per_forward(job: Job) -> float:
    megapixels = job.width * job.height * (1 + len(job.inputs)) / 2**20
    return max(MIN_SECONDS_PER_FORWARD, SECONDS_PER_FORWARD_MEGAPIXEL * megapixels)


def estimate(jobs: list[Job]) -> Estimate:
    best = [job.candidates for job in jobs]
    worst = [job.max_attempts for job in jobs]
    forwards = [forwards_per_image(job) for job in jobs]
    cost = [f * seconds_per_forward(job) for f, job in zip(forwards, jobs)]
    return Estimate(
        jobs=len(jobs), images=sum(best), images_worst=sum(worst),
        forwards=sum(n * f for n, f in zip(best, forwards)),
        forwards_worst=sum(n * f for n, f in zip(worst, forwards)),
        gpu_seconds=round(sum(n * c for n, c in zip(best, cost)), 1),
        gpu_seconds_worst=round(sum(n * c for n, c in zip(worst, cost)), 1))
