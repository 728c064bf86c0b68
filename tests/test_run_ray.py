"""The Ray executor's faults on a real (loopback) Ray cluster: a node lost mid-run, a job that
kills its worker every time, a worker that cannot be built. The tiny model runs in the actors.
That Ray makes the same pixels as the local executor is a contract in test_run_local.py."""
from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest

from omnigen2_batch.config import RayConfig, RunConfig
from omnigen2_batch.executors.ray import NoWorkers, RayExecutor, RayOptions
from omnigen2_batch.jobs import Job
from omnigen2_batch.run import run_jobs
from omnigen2_batch.store import RunStore
from ray_cluster import GPU_SLOT
from test_run_local import manifest, result_files

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CRASH_MARKER = "<<test hook: this prompt kills its worker>>"


# ---------------------------------------------------------------------------- test-only worker
class CrashOnMarker:
    """Test hook: a generator that kills its own process when a prompt carries CRASH_MARKER,
    the way a segfault or the kernel's OOM killer would."""

    def __init__(self, inner):
        self.inner = inner

    def generate(self, requests: list) -> list:
        if any(CRASH_MARKER in request.prompt for request in requests):
            os._exit(1)
        return self.inner.generate(requests)

    def critique(self, image, prompt: str):
        return self.inner.critique(image, prompt)


def crashing_worker(config: RunConfig):
    """A worker_factory: the real tiny worker, behind CrashOnMarker."""
    from omnigen2_batch.worker import build_worker

    worker = build_worker(config)
    worker.generator = CrashOnMarker(worker.generator)
    return worker


class Gate:
    """A Ray actor on the head node that holds the first generation entering it until the test
    opens it; later ones pass. The test learns on which node the held call runs, so it can kill
    that node while a call is known to be running there. It counts the prompts that entered."""

    def __init__(self):
        self.entered, self.opened = asyncio.Event(), asyncio.Event()
        self.node: str | None = None
        self.held: list[str] = []
        self.generated: Counter[str] = Counter()

    async def enter(self, node_id: str, prompts: list[str]) -> None:
        self.generated.update(prompts)
        if self.entered.is_set():
            return
        self.node, self.held = node_id, prompts
        self.entered.set()
        await self.opened.wait()

    def record(self) -> tuple[list[str], Counter]:
        return self.held, self.generated

    async def held_on(self) -> str:
        await self.entered.wait()
        return self.node

    def open(self) -> None:
        self.opened.set()


class HeldAtGate:
    """Test hook: a generator that passes the gate before each generation."""

    def __init__(self, inner, gate):
        self.inner, self.gate = inner, gate

    def generate(self, requests: list) -> list:
        import ray

        node = ray.get_runtime_context().get_node_id()
        ray.get(self.gate.enter.remote(node, [request.prompt for request in requests]))
        return self.inner.generate(requests)

    def critique(self, image, prompt: str):
        return self.inner.critique(image, prompt)


def gated_worker(config: RunConfig, gate):
    """A worker_factory (bind `gate` with functools.partial): the real tiny worker, gated."""
    from omnigen2_batch.worker import build_worker

    worker = build_worker(config)
    worker.generator = HeldAtGate(worker.generator, gate)
    return worker


def unbuildable_worker(config: RunConfig):
    """A worker_factory that fails the way a wrong model path does."""
    raise FileNotFoundError(f"no model folder at /nowhere/{config.model}")


def _ship_this_module_by_value() -> None:
    """Ray workers cannot import test modules; send this module's functions with the call."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------------- helpers
def t2i_jobs(count: int, *prompts_first: str) -> list[Job]:
    prompts = [*prompts_first, *(f"a small tin toy number {n}" for n in range(count))]
    return [Job("toys", f"toy{n}", "t2i", prompt, width=64, height=64, steps=2, seed=n,
                model="tiny") for n, prompt in enumerate(prompts)]


class CountingStore(RunStore):
    """The real store, counting commits per job: a job committed twice would otherwise leave
    the same final row and file as one committed once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commits: Counter[str] = Counter()

    def commit(self, job: Job, result, **kwargs) -> None:
        self.commits[job.id] += 1
        super().commit(job, result, **kwargs)


def run_on_ray(jobs, store, address: str, options: RayOptions, batch_size: int = 4):
    """The jobs on two actors of the cluster at `address`, as `run --executor ray` runs them."""
    config = RunConfig(model="tiny", device="cpu", score=False, executor="ray",
                       batch_size=batch_size, ray=RayConfig(address=address, workers=2))
    return run_jobs(jobs, store, config, executor=RayExecutor(config, options))


# ---------------------------------------------------------------------------- tests
def test_a_job_that_kills_its_worker_fails_and_the_rest_complete(tmp_path, slot_cluster):
    _ship_this_module_by_value()
    jobs = t2i_jobs(3, f"a tin robot {CRASH_MARKER}")  # the crasher shares a micro-batch first
    crasher = jobs[0].id
    options = RayOptions(actor_resources={GPU_SLOT: 1}, worker_factory=crashing_worker,
                         max_deaths=2)  # each death costs a worker restart (~10 s here)
    with CountingStore.open(tmp_path / "run") as store:
        store.add_jobs(jobs)
        summary = run_on_ray(jobs, store, slot_cluster.address, options, batch_size=2)

    rows = manifest(tmp_path / "run")
    assert summary.failed == 1 and summary.kept == len(jobs) - 1 and summary.pending == 0
    assert rows[crasher][0] == "failed"
    assert rows[crasher][2] == "worker died 2 times while running this job"
    assert all(rows[job.id][0] == "kept" for job in jobs[1:])  # its batch-mate included
    assert store.commits == Counter({job.id: 1 for job in jobs})


@pytest.fixture
def ray_driver(slot_cluster):
    """This process connected to the slot cluster (run_ray keeps a connection it finds)."""
    import ray

    ray.init(address=slot_cluster.address, logging_level="WARNING")
    yield slot_cluster
    ray.shutdown()


def start_gate(cluster):
    """A Gate on the head node, which the test never kills."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    on_head = NodeAffinitySchedulingStrategy(cluster.cluster.head_node.node_id, soft=False)
    return ray.remote(Gate).options(num_cpus=0, scheduling_strategy=on_head).remote()


def ray_get(ref):
    import ray

    return ray.get(ref, timeout=60)


def kill_the_node_holding_the_gate(cluster, gate) -> str:
    import ray

    node = ray.get(gate.held_on.remote(), timeout=300)
    cluster.kill_node(node)
    return node


def test_a_node_lost_mid_run_loses_and_duplicates_nothing(tmp_path, ray_driver):
    _ship_this_module_by_value()
    jobs = t2i_jobs(24)
    gate = start_gate(ray_driver)
    options = RayOptions(actor_resources={GPU_SLOT: 1},
                         worker_factory=partial(gated_worker, gate=gate))
    with ThreadPoolExecutor(1) as killer, CountingStore.open(tmp_path / "run") as store:
        store.add_jobs(jobs)
        killed = killer.submit(kill_the_node_holding_the_gate, ray_driver, gate)
        try:
            summary = run_on_ray(jobs, store, ray_driver.address, options, batch_size=2)
        finally:
            gate.open.remote()  # never leave a call held, whatever failed
        killed_node = killed.result(timeout=60)
        held, generated = ray_get(gate.record.remote())

    # The first generation was held on its node until that node died, so the run lost a call in
    # flight (and any queued behind it, which never started: an actor runs its calls in order).
    # Whatever the timing: the held jobs were generated again, every other job once, and every
    # job was committed exactly once.
    assert killed_node not in {node.node_id for node in ray_driver.cluster.worker_nodes}
    assert held and generated == Counter({job.prompt: 1 for job in jobs}) + Counter(held)
    assert summary.kept == len(jobs) and summary.pending == 0 and summary.failed == 0
    assert store.commits == Counter({job.id: 1 for job in jobs})
    rows = manifest(tmp_path / "run")
    assert sorted(rows) == sorted(job.id for job in jobs)
    assert all(status == "kept" for status, _, _ in rows.values())
    files = result_files(tmp_path / "run")
    assert len(files) == len(jobs)  # one image per job: nothing lost, nothing written twice
    assert sorted(image for _, image, _ in rows.values()) == files


def test_a_worker_that_cannot_be_built_stops_the_run_with_the_reason(tmp_path, slot_cluster):
    _ship_this_module_by_value()
    jobs = t2i_jobs(2)
    options = RayOptions(actor_resources={GPU_SLOT: 1}, worker_factory=unbuildable_worker)
    with RunStore.open(tmp_path / "run") as store:
        store.add_jobs(jobs)
        with pytest.raises(NoWorkers) as raised:
            run_on_ray(jobs, store, slot_cluster.address, options)
        assert set(store.statuses().values()) == {"pending"}  # nothing blamed on the jobs
    assert str(raised.value) == ("a Ray worker failed to start: "
                                 "FileNotFoundError: no model folder at /nowhere/tiny")
    assert raised.value.exit_code == 3
