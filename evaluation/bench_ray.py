"""How the Ray executor's throughput scales with the number of actors.

Each actor's generator sleeps a fixed time per image instead of running a model, so the figures
measure the executor itself: scheduling, shipping jobs and images, and the driver committing
every result to a real run store. Ideal throughput is workers / sleep; the ratio says how much of
it the executor delivers. CPU-slot actors ask for a fraction of a CPU so 8 fit on a small box.

    python evaluation/bench_ray.py                      # 1, 2, 4, 8 workers, 0.2 s per image
    python evaluation/bench_ray.py --workers 1 2 --sleep 0.5 --jobs-per-worker 20

Actor start-up (process launch, imports) happens before the clock starts.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from omnigen2_batch.executors.common import Driver  # noqa: E402
from omnigen2_batch.executors.ray import RayOptions, RayPool, ray_session  # noqa: E402
from omnigen2_batch.jobs import Job  # noqa: E402
from omnigen2_batch.store import RunStore  # noqa: E402
from omnigen2_batch.worker import Worker, WorkerSettings  # noqa: E402


class SleepGenerator:
    """Stands in for the pipeline: `seconds` per image, a flat grey image of the asked size."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def generate(self, requests: list) -> list:
        from PIL import Image

        time.sleep(self.seconds * len(requests))
        return [Image.new("RGB", (r.width, r.height), (128, 128, 128)) for r in requests]

    def critique(self, image, prompt: str) -> None:
        return None


def sleeping_worker_factory(seconds: float):
    """A worker_factory for RayOptions (this module is __main__, so Ray ships it by value)."""

    def build(settings: WorkerSettings) -> Worker:
        return Worker(SleepGenerator(seconds), scorer=None)

    return build


def bench_jobs(count: int, size: int) -> list[Job]:
    return [Job("bench", f"j{n:04d}", "t2i", f"bench image {n}", width=size, height=size,
                steps=1, seed=n, model="sleep") for n in range(count)]


def measure(workers: int, args: argparse.Namespace) -> float:
    """Jobs per second with `workers` actors, from all-actors-up to the last commit."""
    options = RayOptions(workers=workers, actor_resources={"CPU": args.cpus / 8},
                         worker_factory=sleeping_worker_factory(args.sleep))
    jobs = bench_jobs(workers * args.jobs_per_worker, args.size)
    with tempfile.TemporaryDirectory() as run_dir, RunStore.open(run_dir) as store:
        pool = RayPool(WorkerSettings(score=False), options)
        try:
            pool.wait_ready(timeout=300)
            driver = Driver(jobs, store, progress=False)
            start = time.perf_counter()
            pool.run(driver, args.batch_size, threading.Event())
            elapsed = time.perf_counter() - start
        finally:
            pool.close()
    return len(jobs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--sleep", type=float, default=0.2, help="seconds per image")
    parser.add_argument("--jobs-per-worker", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args()
    with ray_session(None, num_cpus=args.cpus, dashboard=False):
        print(f"sleep {args.sleep} s/image, batch size {args.batch_size}, "
              f"{args.jobs_per_worker} jobs per worker, {args.size}px images")
        print(f"{'workers':>7} {'images/s':>9} {'ideal':>7} {'ratio':>6}")
        for workers in args.workers:
            rate = measure(workers, args)
            ideal = workers / args.sleep
            print(f"{workers:>7} {rate:>9.2f} {ideal:>7.2f} {rate / ideal:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
