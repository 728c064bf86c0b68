"""Ranked variants: a job with `variants: N` keeps up to N passing images, each its own file.

Rank 1 is the job's image (jobs.image, jobs.best); ranks 2..N lie beside it as
`<name>-<id8>-v<rank>.png`. jobs.variants holds the ranking as JSON, rank 1 included:
[{"rank": 1, "n": 0, "image": "kept/..."}, {"rank": 2, "n": 2, "image": "kept/...-v2.png"}]
(NULL for a job with one image). Picks (`omnigen2-batch pick`) are the meta key "picks": a JSON
list of "<job id>" (rank 1) and "<job id>:v<rank>" entries.
"""
from __future__ import annotations

import json
from typing import Any

from ..jobs import Job, JobResult
from ..rules import ranked_passing
from .png import encode_png

PICKS = "picks"


def variant_path(image_path: str, rank: int) -> str:
    return image_path if rank == 1 else f"{image_path[:-len('.png')]}-v{rank}.png"


def variant_files(job: Job, result: JobResult, image_path: str | None
                  ) -> tuple[list[tuple[str, bytes]], list[dict[str, Any]]]:
    """The files of ranks 2.. and the ranking (rank 1 included), for a kept job that asks for
    more than one variant; ([], []) otherwise."""
    if job.variants < 2 or result.status != "kept" or image_path is None:
        return [], []
    order = ranked_passing(result.attempts, result.best, job.scoring.thresholds, job.variants)
    files, ranking = [], []
    for rank, index in enumerate(order, start=1):
        attempt = result.attempts[index]
        rel = variant_path(image_path, rank)
        ranking.append({"rank": rank, "n": attempt.n, "image": rel})
        if rank > 1:
            files.append((rel, encode_png(attempt.image, job, attempt, f"kept variant {rank}")))
    return (files, ranking) if len(ranking) > 1 else ([], [])


def ranking_of(text: str | None) -> list[dict[str, Any]]:
    """jobs.variants decoded; [] for a job with one image."""
    return json.loads(text) if text else []


def pick_key(job_id: str, rank: int) -> str:
    return job_id if rank == 1 else f"{job_id}:v{rank}"


def parse_pick(key: str) -> tuple[str, int]:
    job_id, _, rank = key.partition(":v")
    return job_id, int(rank) if rank.isdigit() else 1
