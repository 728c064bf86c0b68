"""Engine overhead per job, with a generator that returns a fixed image instantly.

What is left when the model costs nothing: planning the recipe, dispatching micro-batches
(DAG bookkeeping, the worker's ladder), encoding the PNG with its metadata, writing it
(temp file, fsync, rename) and committing the manifest rows. Then the resume scan: how long a
second `run` of a finished 10,000-job run takes to find out there is nothing to do.

    python evaluation/bench_engine.py                   # 1,000 and 10,000 jobs, 64x64 images
    python evaluation/bench_engine.py --jobs 500 --size 256 --batch-size 8

Runs in a temp dir on the same disk as --tmp (default: the system temp dir).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from PIL import Image

from omnigen2_batch.config import RunConfig
from omnigen2_batch.executors.base import Stop
from omnigen2_batch.executors.driver import Driver
from omnigen2_batch.executors.local import LocalExecutor
from omnigen2_batch.plan import build_plan
from omnigen2_batch.recipe import load_recipe
from omnigen2_batch.store import RunStore
from omnigen2_batch.worker import Worker


class FixedGenerator:
    """Stands in for the pipeline: the same image for every request, at no cost."""

    def __init__(self) -> None:
        self.by_size: dict[tuple[int, int], Image.Image] = {}

    def generate(self, requests: list) -> list:
        return [self._image(r.width, r.height) for r in requests]

    def critique(self, image, prompt: str) -> None:
        return None

    def _image(self, width: int, height: int) -> Image.Image:
        if (width, height) not in self.by_size:
            self.by_size[width, height] = Image.radial_gradient("L").resize((width, height)).convert("RGB")
        return self.by_size[width, height]


def _timed(method, total: str):
    """`method`, adding its wall time to the instance attribute `total`."""
    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            setattr(self, total, getattr(self, total) + time.perf_counter() - start)
    return timed


class TimedStore(RunStore):
    """A RunStore that adds up where commit time goes."""

    encode = write = committing = 0.0
    _result_files = _timed(RunStore._result_files, "encode")
    _write_files = _timed(RunStore._write_files, "write")
    commit = _timed(RunStore.commit, "committing")


def write_recipe(folder: Path, jobs: int, size: int) -> Path:
    values = ", ".join(f'"v{n}"' for n in range(jobs))
    path = folder / "bench.yaml"
    path.write_text(f"""name: bench
model: tiny
defaults:
  size: [{size}, {size}]
  steps: 1
  scoring: {{enabled: false}}
prompts:
  - name: bench
    prompt: "a scene number {{n}}"
    matrix: {{n: [{values}]}}
""")
    return path


def bench(jobs: int, args: argparse.Namespace, tmp: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix=f"bench{jobs}-", dir=tmp))
    start = time.perf_counter()
    plan = build_plan(load_recipe(write_recipe(folder, jobs, args.size)))
    planned = time.perf_counter() - start

    worker = Worker(FixedGenerator(), scorer=None)
    generating = [0.0]
    run = worker.run

    def timed_run(*a):
        begin = time.perf_counter()
        try:
            return run(*a)
        finally:
            generating[0] += time.perf_counter() - begin

    worker.run = timed_run
    with TimedStore.open(folder / "run") as store:
        start = time.perf_counter()
        store.add_jobs(plan.jobs)
        driver = Driver(plan.jobs, store)
        config = RunConfig(model="tiny", score=False, batch_size=args.batch_size)
        LocalExecutor(config, worker=worker).run(driver, Stop())
        summary = driver.summary()
        ran = time.perf_counter() - start
        assert summary.kept == jobs, summary
        dispatch = ran - store.committing - generating[0]
        manifest = store.committing - store.encode - store.write
        per = 1000 / jobs
        print(f"{jobs:>6} jobs: plan {planned * per:.3f} ms/job, run {ran * per:.3f} ms/job = "
              f"worker {generating[0] * per:.3f} + dispatch {dispatch * per:.3f} + "
              f"png encode {store.encode * per:.3f} + write {store.write * per:.3f} + "
              f"manifest {manifest * per:.3f}   ({jobs / ran:.0f} jobs/s)", flush=True)

    rerun_bookkeeping(plan.jobs, folder / "run")
    with RunStore.open(folder / "run") as store:
        start = time.perf_counter()
        store.add_jobs(plan.jobs)
        Driver(plan.jobs, store)
        scan = time.perf_counter() - start
    start = time.perf_counter()
    with RunStore.open(folder / "run") as store:
        LocalExecutor(RunConfig(model="tiny", score=False)).run(Driver(plan.jobs, store), Stop())
    rerun = time.perf_counter() - start
    print(f"{'':>6}       resume scan of the finished run: {scan * 1000:.1f} ms "
          f"(add_jobs + done set + DAG); whole no-op rerun incl. open and temp sweep "
          f"{rerun * 1000:.1f} ms; re-plan {planned * 1000:.1f} ms", flush=True)


def rerun_bookkeeping(jobs: list, run_dir: Path) -> None:
    """What every rerun does before it generates anything (run.execute): set aside jobs the
    recipe dropped, bring stored thresholds up to date, check every kept file, re-decide."""
    from omnigen2_batch.rescore import redecide

    ids = [job.id for job in jobs]
    with RunStore.open(run_dir) as store:
        steps = [("supersede scan", lambda: store.supersede(ids)),
                 ("update_scoring", lambda: store.update_scoring(jobs)),
                 ("verify_files", store.verify_files),
                 ("redecide", lambda: redecide(store, jobs)),
                 ("supersede half", lambda: store.supersede(ids[::2])),
                 ("restore half", lambda: store.supersede(ids))]
        timings = []
        for name, step in steps:
            start = time.perf_counter()
            step()
            timings.append(f"{name} {1000 * (time.perf_counter() - start):.0f} ms")
    print(f"{'':>6}       rerun bookkeeping of {len(jobs)} finished jobs: " + ", ".join(timings),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    print(f"fixed {args.size}x{args.size} image, batch size {args.batch_size}, unscored, "
          f"run dir under {args.tmp}")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for jobs in args.jobs:
            bench(jobs, args, Path(tmp))


if __name__ == "__main__":
    main()
