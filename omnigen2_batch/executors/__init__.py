"""Executors run micro-batches somewhere: in this process (local) or on a Ray cluster (ray)."""
from __future__ import annotations

from ..config import RunConfig
from .base import Executor


def executor_for(config: RunConfig, **options) -> Executor:
    """The executor the config names; `options` go to its constructor (tests, benchmarks)."""
    if config.executor == "ray":
        from .ray import RayExecutor

        return RayExecutor(config, **options)
    from .local import LocalExecutor

    return LocalExecutor(config, **options)
