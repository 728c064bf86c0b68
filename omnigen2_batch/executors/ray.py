"""The Ray executor: one actor per GPU (or CPU slot), each holding its worker for the whole run.

The driver (this process) owns the Driver: it picks ready micro-batches, keeps at most
`in_flight` of them queued per actor, commits what comes back and releases dependants, so it is
the single writer of the store. Actors only run `Worker.run`.

Faults: an actor whose process or node dies takes nothing with it. Its queued micro-batches go
back to the queue; the one it was running (the oldest, since an actor runs its calls in order) is
blamed. Blame can fall on an innocent call: one that finished just before a crash whose reply was
lost with the process. So every blamed job becomes a *suspect* and is retried alone, on an idle
actor with nothing queued behind it: a second death there is its own. A job blamed for
`max_deaths` deaths is failed. Ray
restarts a dead actor (`max_restarts`); when it gives up, the driver starts a new one. Results of
abandoned calls are never read, so no job is committed twice.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

from ..config import RunConfig
from ..errors import UnavailableError
from ..jobs import JobResult
from ..preflight import ray_address_problems
from .base import Executor
from .driver import Driver, MicroBatch, failed_result, needed_refs, run_isolated

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE = 256 * 2**20  # a local Ray only carries a few images per micro-batch
PROBE_INTERVAL = 1.0  # seconds between readiness checks of a restarting actor
WAIT_TICK = 0.5  # longest the driver sleeps in ray.wait before looking at probes and timeouts


@dataclass
class RayOptions:
    """Tuning beyond RunConfig.ray (tests and benchmarks set these)."""

    actor_resources: dict[str, float] | None = None  # per actor; None = {"GPU": 1} or {"CPU": 1}
    in_flight: int = 2  # micro-batches queued per actor (one running, one ready to go)
    max_deaths: int = 3  # worker deaths a job may cause before it is failed
    max_restarts: int = 2  # Ray's restarts per actor before the driver replaces it
    startup_timeout: float = 900.0  # seconds with no usable actor before the run gives up
    worker_factory: Callable[[Any], Any] | None = None  # settings -> Worker; build_worker if None


class NoWorkers(UnavailableError):
    """No actor can run: none could be placed, or their construction failed."""


class WorkerActor:
    """Lives in a Ray worker process: builds the worker once, then runs micro-batches."""

    def __init__(self, config: RunConfig, worker_factory: Callable[[Any], Any] | None = None):
        if worker_factory is None:
            from ..worker import build_worker as worker_factory
        self.worker = worker_factory(_config_for_this_actor(config))

    def ready(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def run(self, batch: MicroBatch) -> list[JobResult]:
        return run_isolated(self.worker.run, batch)


def _config_for_this_actor(config: RunConfig) -> RunConfig:
    """The device follows what Ray gave the actor, not what the driver's machine has: its GPU
    (Ray sets CUDA_VISIBLE_DEVICES, so "cuda" is that GPU), else the CPU."""
    import ray

    return replace(config, device="cuda" if ray.get_gpu_ids() else "cpu")


@dataclass
class _Slot:
    """One actor and the calls it has queued, oldest first."""

    handle: Any
    index: int
    queue: deque = field(default_factory=deque)  # (ObjectRef, MicroBatch)
    probe: Any = None  # ObjectRef of ready() while the actor starts or restarts
    probe_at: float = 0.0  # when to send the next probe (after an "unavailable" answer)
    label: str = ""  # host:pid once up
    up_since: float | None = None
    done: int = 0  # jobs it finished in this run
    isolating: bool = False  # running a suspect alone: nothing may be queued behind it

    @property
    def up(self) -> bool:
        return self.up_since is not None


class RayPool:
    """Actors that each hold a worker, fed micro-batches by a Driver."""

    def __init__(self, config: RunConfig, options: RayOptions):
        import ray

        self.config, self.options = config, options
        resources = options.actor_resources or _default_resources(ray.cluster_resources())
        count = config.ray.workers or int(ray.cluster_resources().get("GPU", 0)) or 1
        self.actor_class = ray.remote(WorkerActor).options(
            num_cpus=resources.get("CPU", 0), num_gpus=resources.get("GPU", 0),
            resources={k: v for k, v in resources.items() if k not in ("CPU", "GPU")} or None,
            max_restarts=options.max_restarts, max_task_retries=0)
        self.replacements_left = 2 * count  # a crash loop in a constructor must end somewhere
        self.slots = [self._start(n) for n in range(count)]
        self.retry: deque[MicroBatch] = deque()  # untouched batches given back by dead actors
        self.suspects: deque[MicroBatch] = deque()  # one job each, running when an actor died
        self.deaths: Counter[str] = Counter()  # job id -> deaths it was running at
        self.last_progress = time.monotonic()

    def close(self) -> None:
        import ray

        for slot in self.slots:
            ray.kill(slot.handle, no_restart=True)

    # ------------------------------------------------------------------ the run loop
    def run(self, driver: Driver, batch_size: int, stop: threading.Event) -> None:
        """Feed the actors until every job is finished, or until `stop` (then the calls in
        flight still land and commit; a SIGTERM abandons them, see errors.Terminated)."""
        driver.progress.note = self.throughput  # per-worker rates beside the ETA
        while driver.unfinished and not (stop.is_set() and not self._calls()):
            if not stop.is_set():
                self._fill(driver, batch_size)
            self._step(driver)

    def wait_ready(self, timeout: float) -> None:
        """Block until every actor is up (benchmarks start their clocks after this)."""
        deadline = time.monotonic() + timeout
        while not all(slot.up for slot in self.slots) and time.monotonic() < deadline:
            self._step(driver=None)

    def throughput(self) -> str:
        now = time.monotonic()
        return " ".join(f"w{s.index} {60 * s.done / max(now - s.up_since, 1e-9):.1f}/min"
                        for s in self.slots if s.up)

    def _fill(self, driver: Driver, batch_size: int) -> None:
        """Suspects first, each alone on an idle actor. Then top every other live actor up to
        `in_flight` calls, one call per actor per pass so that scarce ready work (a DAG front)
        spreads over the actors; while suspects wait, only to one call, so actors fall idle."""
        for slot in self.slots:
            if self.suspects and slot.up and not slot.queue:
                self._send(slot, self.suspects.popleft(), isolating=True)
        for depth in range(1 if self.suspects else self.options.in_flight):
            for slot in self.slots:
                if not slot.up or slot.isolating or len(slot.queue) > depth:
                    continue
                batch = self.retry.popleft() if self.retry else driver.next_batch(batch_size)
                if batch is None:
                    return
                self._send(slot, batch)

    def _send(self, slot: _Slot, batch: MicroBatch, isolating: bool = False) -> None:
        slot.queue.append((slot.handle.run.remote(batch), batch))
        slot.isolating = isolating

    def _step(self, driver: Driver | None) -> None:
        import ray

        self._send_due_probes()
        waiting = {ref: slot for slot in self.slots for ref, _ in slot.queue}
        waiting.update({slot.probe: slot for slot in self.slots if slot.probe is not None})
        if not waiting:
            self._check_stalled()
            time.sleep(WAIT_TICK)
            return
        ready, _ = ray.wait(list(waiting), num_returns=1, timeout=WAIT_TICK)
        for ref in ready:
            slot = waiting[ref]
            if ref == slot.probe:
                self._probed(slot)
            elif any(ref == queued for queued, _ in slot.queue):  # not abandoned by _lost
                self._landed(slot, ref, driver)
        self._check_stalled()

    # ------------------------------------------------------------------ results and faults
    def _landed(self, slot: _Slot, ref: Any, driver: Driver) -> None:
        import ray

        batch = next(batch for queued, batch in slot.queue if queued == ref)
        try:
            results = _fetch(ref, batch)
        except ray.exceptions.RayError as exc:  # the actor, its node or the result is gone
            self._lost(slot, exc, driver)
            return
        self._take(slot, ref)
        self._commit(slot, batch, results, driver)

    def _commit(self, slot: _Slot, batch: MicroBatch, results: list[JobResult],
                driver: Driver) -> None:
        slot.done += len(batch.jobs)
        self.last_progress = time.monotonic()
        driver.complete(batch, results)

    def _lost(self, slot: _Slot, exc: Exception, driver: Driver) -> None:
        """The actor died (or cannot be reached). It ran its calls in order, so: commit the
        ones that finished before, blame the first that did not (it was running), give the
        rest back untouched, and wait for the actor to come back."""
        import ray

        log.warning("worker w%d lost: %s", slot.index, str(exc).splitlines()[0])
        calls = list(slot.queue)
        slot.queue.clear()
        slot.isolating = False
        finished, _ = ray.wait([ref for ref, _ in calls], num_returns=len(calls), timeout=0)
        landed = 0  # stops at the latest at the call whose error brought us here
        while (results := _fetch_if_finished(*calls[landed], finished)) is not None:
            self._commit(slot, calls[landed][1], results, driver)
            landed += 1
        self._blame(calls[landed][1], driver)
        self.retry.extend(batch for _, batch in calls[landed + 1:])
        slot.up_since, slot.probe_at = None, time.monotonic()

    def _blame(self, batch: MicroBatch, driver: Driver) -> None:
        for job in batch.jobs:
            self.deaths[job.id] += 1
        alone = [MicroBatch([job], {ref.key: batch.images[ref.key] for ref in needed_refs(job)},
                            {job.id: batch.earlier[job.id]} if job.id in batch.earlier else {})
                 for job in batch.jobs]
        for single in alone:
            job = single.jobs[0]
            if self.deaths[job.id] >= self.options.max_deaths:
                reason = f"worker died {self.deaths[job.id]} times while running this job"
                self._commit_failure(single, reason, driver)
            else:
                self.suspects.append(single)

    def _commit_failure(self, batch: MicroBatch, reason: str, driver: Driver) -> None:
        self.last_progress = time.monotonic()
        driver.complete(batch, [failed_result(job, reason) for job in batch.jobs])

    def _probed(self, slot: _Slot) -> None:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        probe, slot.probe = slot.probe, None
        try:
            slot.label = ray.get(probe)
        except ActorUnavailableError:  # restarting, or waiting for a place to run
            slot.probe_at = time.monotonic() + PROBE_INTERVAL
            return
        except ActorDiedError as exc:
            if exc.actor_init_failed:  # the worker cannot be built (bad model path, ...)
                log.debug("worker w%d failed to start: %s", slot.index, exc)
                cause = str(exc).strip().splitlines()[-1]  # the exception, below Ray's traceback
                raise NoWorkers(f"a Ray worker failed to start: {cause}") from None
            self._replace(slot, exc)
            return
        slot.up_since = self.last_progress = time.monotonic()
        log.info("worker w%d up on %s", slot.index, slot.label)

    def _replace(self, slot: _Slot, exc: Exception) -> None:
        """Ray gave up restarting this actor: start another one in its place."""
        if self.replacements_left <= 0:
            raise NoWorkers(f"Ray workers keep dying; the last one: {exc}")
        self.replacements_left -= 1
        log.warning("worker w%d is gone for good; starting a replacement", slot.index)
        self.slots[self.slots.index(slot)] = self._start(slot.index)

    def _start(self, index: int) -> _Slot:
        slot = _Slot(self.actor_class.remote(self.config, self.options.worker_factory), index)
        slot.probe = slot.handle.ready.remote()
        return slot

    def _send_due_probes(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if not slot.up and slot.probe is None and slot.probe_at <= now:
                slot.probe = slot.handle.ready.remote()

    def _calls(self) -> int:
        return sum(len(slot.queue) for slot in self.slots)

    def _take(self, slot: _Slot, ref: Any) -> MicroBatch:
        for n, (queued, batch) in enumerate(slot.queue):
            if queued == ref:
                del slot.queue[n]
                slot.isolating = False  # an isolating actor runs that one call only
                return batch
        raise KeyError(ref)

    def _check_stalled(self) -> None:
        if any(slot.up for slot in self.slots):
            return
        idle = time.monotonic() - self.last_progress
        if idle > self.options.startup_timeout:
            import ray

            raise NoWorkers(
                f"no Ray worker has been usable for {idle:.0f} s; each asks for "
                f"{self.options.actor_resources or 'one GPU (or CPU)'} and the cluster offers "
                f"{ray.available_resources()}; add nodes, or change --workers / --ray-address")


def _fetch(ref: Any, batch: MicroBatch) -> list[JobResult]:
    """A call's results. Raises ray's RayError when the actor, its node or the result is gone."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # run_isolated catches job errors: e.g. unpickling
        return [failed_result(job, exc) for job in batch.jobs]


def _fetch_if_finished(ref: Any, batch: MicroBatch, finished: list) -> list[JobResult] | None:
    """The results of a call that completed before its actor died, else None."""
    import ray

    if ref not in finished:
        return None
    try:
        return _fetch(ref, batch)
    except ray.exceptions.RayError:
        return None


def _default_resources(cluster: dict[str, float]) -> dict[str, float]:
    return {"GPU": 1} if cluster.get("GPU", 0) >= 1 else {"CPU": 1}


@contextmanager
def ray_session(address: str | None, num_cpus: int, dashboard: bool) -> Iterator[None]:
    """Join the cluster at `address` ("auto" or host:port), or start a private local Ray on
    127.0.0.1; leave it (and stop the local one) at the end. A process already connected to
    Ray (a notebook, a test) keeps its connection."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:  # read when ray is first imported: a local Ray binds loopback only
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        yield
        return
    problems = ray_address_problems(address)
    if problems:
        raise UnavailableError(problems[0])
    ours = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    # Worker output stays in Ray's logs: on our stdout it would corrupt --json.
    common = dict(logging_level=logging.WARNING, log_to_driver=False)
    try:
        if address:
            ray.init(address=address, **common)
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                     object_store_memory=LOCAL_OBJECT_STORE, _node_ip_address="127.0.0.1",
                     **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise UnavailableError(f"cannot start or join {where}: {exc}; check --ray-address "
                               "(a running head's address, or auto)") from None
    if threading.current_thread() is threading.main_thread():
        for signum, handler in ours.items():  # ray.init installs its own: put the run's back
            signal.signal(signum, handler)
    try:
        yield
    finally:
        ray.shutdown()


class RayExecutor(Executor):
    """Micro-batches spread over a pool of Ray actors (see the module docstring)."""

    def __init__(self, config: RunConfig, options: RayOptions | None = None):
        super().__init__(config)
        self.options = options or RayOptions()

    def run(self, driver: Driver, stop: threading.Event) -> None:
        if not driver.ready:
            return  # nothing to do: do not start Ray
        ray_config = self.config.ray
        with ray_session(ray_config.address, ray_config.workers or 1, ray_config.dashboard):
            pool = RayPool(self.config, self.options)
            try:
                pool.run(driver, self.config.batch_size, stop)
            finally:
                pool.close()
