"""The keep/reject rules: metric names, thresholds, ranking and the decision. Pure functions.

The scorer measures, the ladder plans attempts, re-scoring and reruns re-decide; all of them
judge with these rules, so a job is decided the same way wherever it is decided.
- An attempt passes when every thresholded metric reaches its threshold; a thresholded metric
  that was not scored counts as failed.
- Best attempt = highest mean normalised score over the job's threshold metrics (all scored
  metrics when it has no thresholds; a missing metric counts 0; cosines map [-1,1] -> [0,1],
  clipscore [0,100] -> [0,1]); ties go to the earlier attempt.
- A job is kept with its best passing attempt if any passes, else rejected with its best one.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    from .jobs import Attempt

# Part of the manifest format: recipes set thresholds on these names, reports plot them.
METRICS = ("text", "clipscore", "consistency_mean", "consistency_min", "preservation", "direction")
LADDER_STEPS = ("new_seed", "stronger_guidance", "refine", "ask_mllm")  # also the default order


def judge(scores: Mapping[str, float], thresholds: Mapping[str, float]) -> tuple[bool, tuple[str, ...]]:
    """(passed, failed metric names)."""
    unknown = sorted(set(thresholds) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown} in scoring thresholds; known: {list(METRICS)}")
    failed = tuple(m for m, t in thresholds.items() if not scores.get(m, -math.inf) >= t)
    return not failed, failed


def normalised(metric: str, value: float) -> float:
    """A metric mapped onto [0, 1] so different metrics can be averaged."""
    return value / 100.0 if metric == "clipscore" else (value + 1.0) / 2.0


def rank(scores: Mapping[str, float], thresholds: Mapping[str, float]) -> float:
    """Mean normalised score over the threshold metrics (see the module docstring)."""
    metrics = list(thresholds) or list(scores)
    if not metrics:
        return 0.0
    return sum(normalised(m, scores[m]) if m in scores else 0.0 for m in metrics) / len(metrics)


def best_of(attempts: Sequence["Attempt"], indices: list[int], thresholds: Mapping[str, float]) -> int:
    """The highest-ranked of the given attempts; the earlier one on a tie."""
    return max(indices, key=lambda i: (rank(attempts[i].scores, thresholds), -i))


def decide(attempts: Sequence["Attempt"], thresholds: Mapping[str, float],
           made: list[int] | None = None) -> tuple[str, int]:
    """(status, best index) over the attempts that have an image (or the indices `made`):
    "kept" with the best passing attempt if any passes, else "rejected" with the best one."""
    made = [i for i, a in enumerate(attempts) if a.image is not None] if made is None else made
    passing = [i for i in made if attempts[i].passed]
    return ("kept" if passing else "rejected"), best_of(attempts, passing or made, thresholds)


def ranked_passing(attempts: Sequence["Attempt"], best: int, thresholds: Mapping[str, float],
                   count: int) -> list[int]:
    """Up to `count` passing attempts with an image, ranked: the job's `best` first, then the
    others by rank (the earlier one on a tie). These are a job's kept variants."""
    others = [i for i, a in enumerate(attempts)
              if a.passed and a.image is not None and i != best]
    others.sort(key=lambda i: (-rank(attempts[i].scores, thresholds), i))
    return ([best] + others)[:count]
