"""The only module that talks to Ray: connecting, placing worker actors, sharing the task
store, running a step's shards, and recomputing the shards of workers that died.

Per step only task ids and the weights (inside each call when under 64 KiB, else one
object-store reference for all) travel to the workers; each returns its
shard's summed meta-gradient as one flat float32 numpy array (which Ray hands back without a
copy). The store is read where the work runs: memory-mapped from a path every node sees, or,
when some node cannot see it, from one copy of the file's bytes in Ray's object store.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import MamlConfig, ModelConfig, ScalingConfig, is_import_path
from .errors import ConfigError, TrainingError
from .learner import Learner
from .sampler import Sampler
from .stepping import OnStep, Steps, drive
from .userimport import search_path
from .worker import ShardResult

PLACEMENT_TIMEOUT_S = 60.0  # a pool that cannot be placed by then never will be, on a fixed cluster
INLINE_BYTES = 64 * 1024  # weights up to this size ride in each call (below Ray's 100 KB inlining limit)
POLL_S = 1.0  # how often a step that is still waiting checks its workers' health


def connect() -> bool:
    """Joins the cluster named by RAY_ADDRESS (as under `ray job submit`), or starts a local
    Ray when there is none. Token authentication stays as Ray configures it (on by default);
    a local instance keeps its dashboard off, so nothing listens beyond what Ray needs.
    True when this call connected (the caller owns the connection)."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)
    return True


def resolve_num_workers(scaling: ScalingConfig) -> int:
    """num_workers = -1: one worker per GPU slice when the cluster has GPUs and the config asks
    for none explicitly, else one per `cpus_per_worker` CPUs."""
    if scaling.num_workers > 0:
        return scaling.num_workers
    res = ray.cluster_resources()
    if scaling.gpus_per_worker > 0:
        return max(1, int(res.get("GPU", 0) / scaling.gpus_per_worker))
    return max(1, int(res.get("CPU", 1) / scaling.cpus_per_worker))


def auto_gpus(scaling: ScalingConfig) -> ScalingConfig:
    """With num_workers = -1 and no GPU asked for, a cluster with GPUs gets one worker per GPU."""
    if scaling.num_workers == -1 and scaling.gpus_per_worker == 0 and ray.cluster_resources().get("GPU", 0) >= 1:
        return replace(scaling, gpus_per_worker=1.0)
    return scaling


@dataclass(frozen=True)
class StoreSource:
    """How a worker finds the task store: a path it memory-maps, or the file's bytes in the
    object store (`blob` is resolved by Ray to a zero-copy uint8 array before the actor starts)."""

    path: str
    size: int


@ray.remote(max_restarts=-1, max_task_retries=0, concurrency_groups={"health": 1})
class WorkerActor:
    """Owns a CPU or GPU slice; computes shards with the Ray-free ShardComputer."""

    def __init__(
        self,
        source: StoreSource,
        blob: Any,
        model_cfg: ModelConfig,
        maml_cfg: MamlConfig,
        cpus: float,
        gpus: float,
        index: int,
        task_map: str = "auto",
        code_paths: tuple[str, ...] = (),
        gpu_step: str = "graph",
    ) -> None:
        import torch

        from .store import TaskStore
        from .userimport import ensure_on_path
        from .worker import ShardComputer

        for folder in code_paths:  # where the driver imported user models from, if this node has it
            ensure_on_path(folder)
        torch.set_num_threads(max(1, int(cpus)))  # no oversubscription: threads = the CPU slice
        # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPU, so it is always cuda:0.
        device = "cuda:0" if gpus > 0 else "cpu"
        if blob is not None:
            store, self.store_mode = TaskStore.from_buffer(blob, name=f"{source.path} (object store)"), "object_store"
        else:
            store, self.store_mode = TaskStore.open(source.path), "path"
        self.name = f"worker-{index}"
        self.computer = ShardComputer(
            store, model_cfg, maml_cfg, device=device, name=self.name, task_map=task_map, gpu_step=gpu_step
        )
        self.version = -1

    def compute(self, weights: np.ndarray, version: int, ids: np.ndarray, before: bool = True) -> ShardResult:
        # The weights arrive with the call that uses them, so a worker can never compute on
        # stale weights; a lower version than seen before means a driver bug, not a race.
        if version < self.version:
            raise RuntimeError(f"{self.name} got weights version {version} after {self.version}")
        self.version = version
        return self.computer.compute(weights, ids, before, version)

    def curve(self, weights: np.ndarray, ids: np.ndarray, max_steps: int, lr: float) -> Any:
        return self.computer.curve(weights, ids, max_steps, lr)

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address for the group: this node's IP and a port free on it now."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join_group(self, address: str, port: int, rank: int, world: int, timeout_s: float) -> str:
        """Joins the torch.distributed group (gloo on a CPU, NCCL on a GPU); blocks until all
        `world` ranks have joined, so the driver calls every rank at once."""
        import datetime

        import torch.distributed as dist

        backend = "nccl" if self.computer.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self.rank, self.world = rank, world
        return backend

    def run_steps(
        self,
        state: tuple[dict[str, Any], dict[str, Any], int] | None,
        sampler: Any,
        steps: Any,
    ) -> tuple[list[Any], tuple[dict[str, Any], dict[str, Any], int] | None]:
        """The collective loop over steps first..last (stepping.collective_chunk). Rank 0 gets
        the learner's state (weights, Adam moments, version) and returns it advanced, with the
        steps' outcomes; the other ranks get and return None."""
        import torch.distributed as dist

        from .learner import Learner
        from .stepping import collective_chunk

        if not dist.is_initialized():  # restarted by Ray since the group formed: the group must form again
            raise RuntimeError(f"{self.name} is not in the collective group (it was restarted)")
        learner = None
        if state is not None:
            flat = self.computer.spec.flatten(state[0])
            learner = Learner.of(self.computer.spec, flat, self.computer.maml_cfg, lr=0.0)  # lr: in the state
            learner.load(*state)
        outcomes = collective_chunk(self.computer, learner, sampler, steps, self.rank, self.world)
        if learner is None:
            return outcomes, None
        return outcomes, (learner.state_dict(), learner.optimizer.state_dict(), learner.version)

    @ray.method(concurrency_group="health")
    def ping(self) -> int:
        """Answers while `compute` runs (its own thread): silence means dead, restarting or unplaced."""
        return os.getpid()

    def info(self) -> dict[str, Any]:
        import torch

        return {
            "name": self.name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "device": str(self.computer.device),
            "store_mode": self.store_mode,
            "task_map": self.computer.task_map,
            "step": self.computer.step_kind,
            "torch_threads": torch.get_num_threads(),
            "gpu_ids": ray.get_runtime_context().get_accelerator_ids().get("GPU", []),
            "peak_rss_mib": _peak_rss_mib(),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        }


@ray.remote(num_cpus=0)
def _sees_store(path: str, size: int) -> bool:
    p = Path(path)
    return p.is_file() and p.stat().st_size == size


class RayExecutor:
    """A pool of worker actors in one placement group; `compute` runs one step's shards."""

    def __init__(
        self, store: Path | np.ndarray, model_cfg: ModelConfig, maml_cfg: MamlConfig, scaling: ScalingConfig
    ) -> None:
        """`store` is the path of a store file, or the bytes of an in-memory store (which then
        always travels through the object store)."""
        self.owns_ray = connect()
        self._closed = threading.Event()
        self._raylet: Any = None  # set by watch(): the local raylet this process started
        self._on_lost: Callable[[str], None] = lambda why: None
        self._lost = threading.Lock()  # one report: the other thread waits here while it is written
        scaling = auto_gpus(scaling)
        self.scaling = scaling
        self.num_shards = n = resolve_num_workers(scaling)
        bundle = {
            "CPU": scaling.cpus_per_worker,
            **({"GPU": scaling.gpus_per_worker} if scaling.gpus_per_worker else {}),
        }
        self.pg = placement_group([bundle] * n, strategy=scaling.placement.upper())
        try:
            ray.get(self.pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except GetTimeoutError:
            remove_placement_group(self.pg)
            raise ConfigError(
                f"cannot place {n} workers of {bundle} on this cluster (it has {_free(ray.cluster_resources())}); "
                "lower scaling.num_workers, cpus_per_worker or gpus_per_worker, or add nodes"
            ) from None
        in_memory = isinstance(store, np.ndarray)
        path = "<in-memory store>" if in_memory else str(Path(store).resolve())
        source = StoreSource(path, store.nbytes if in_memory else Path(path).stat().st_size)
        mode = "object_store" if in_memory else scaling.store_sharing
        if mode == "auto":
            seen = ray.get(
                [_sees_store.options(scheduling_strategy=self._bundle(i)).remote(path, source.size) for i in range(n)]
            )
            mode = "path" if all(seen) else "object_store"
        # One copy of the store's bytes in the object store, shared by every worker of a node.
        if mode == "object_store":
            self.blob = ray.put(store if in_memory else np.fromfile(path, dtype=np.uint8))
        else:
            self.blob = None
        self.store_mode = mode
        code = tuple(p for p in [search_path(model_cfg.name)] if p) if is_import_path(model_cfg.name) else ()
        self.workers = [
            WorkerActor.options(
                num_cpus=scaling.cpus_per_worker, num_gpus=scaling.gpus_per_worker, scheduling_strategy=self._bundle(i)
            ).remote(
                source,
                self.blob,
                model_cfg,
                maml_cfg,
                scaling.cpus_per_worker,
                scaling.gpus_per_worker,
                i,
                scaling.task_map,
                code,
                scaling.gpu_step,
            )
            for i in range(n)
        ]
        self._how: str | None = None
        self.failures = [0] * n
        self.max_failures = scaling.max_worker_failures

    def _bundle(self, i: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=i)

    def healthy(self) -> list[int]:
        return [i for i, f in enumerate(self.failures) if f < self.max_failures]

    def compute(
        self, weights: np.ndarray, version: int, shards: list[np.ndarray], before: bool = True
    ) -> list[ShardResult]:
        """Every shard's result, in shard order (see _map: nothing lost, nothing doubled)."""
        ref = self._share(weights)
        return self._map(lambda worker, ids: worker.compute.remote(ref, version, ids, before), shards)

    def curves(self, weights: np.ndarray, shards: list[np.ndarray], max_steps: int, lr: float) -> list[Any]:
        """Adaptation curves of each shard's tasks (evaluation), in shard order."""
        ref = self._share(weights)
        return self._map(lambda worker, ids: worker.curve.remote(ref, ids, max_steps, lr), shards)

    def _share(self, weights: np.ndarray) -> Any:
        """The weights as a call argument. Small ones travel inside each call (Ray inlines
        arguments under 100 KB): no object-store put per step, and none to free at the next,
        each an IPC to the raylet that ends this process from C++ if the raylet is gone. Large
        ones go into the object store once per step, the same ref for every worker."""
        self._check_raylet()
        return weights if weights.nbytes <= INLINE_BYTES else ray.put(weights)

    def run_steps(
        self,
        learner: Learner,
        sampler: Sampler,
        steps: Steps,
        on_step: OnStep,
    ) -> int:
        return drive(self, learner, sampler, steps, on_step)

    def _map(self, call: Callable[[Any, np.ndarray], Any], shards: list[np.ndarray]) -> list[Any]:
        """Shard i goes to worker i while it is healthy (the fixed partition; a retired worker's
        shards go to healthy ones); results come back in shard order. A shard whose worker died,
        or went silent for `worker_timeout_s` (a lost node whose actor has nowhere to restart
        waits forever otherwise), is computed again elsewhere: a step never goes on with a
        shard missing, and never waits without bound."""
        healthy = self.healthy()
        owners = [i if i in healthy else healthy[i % len(healthy)] for i in range(len(shards))]
        pending = {call(self.workers[w], ids): (i, w) for i, (w, ids) in enumerate(zip(owners, shards))}
        results: list[Any] = [None] * len(shards)
        watch = _Watch(self.workers, self.scaling.worker_timeout_s)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            if not done:
                for w in watch.silent({w for _, w in pending.values()}):
                    self.failures[w] = self.max_failures  # retired: it may come back, but not in this run
                    for ref in [ref for ref, (_, owner) in pending.items() if owner == w]:
                        i = pending.pop(ref)[0]
                        target = self._next_healthy(w, i, "went silent")
                        pending[call(self.workers[target], shards[i])] = (i, target)
                continue
            i, w = pending.pop(done[0])
            try:
                results[i] = ray.get(done[0])
            except RayActorError:
                target = self._reassign(w, i)
                pending[call(self.workers[target], shards[i])] = (i, target)
        return results

    def _reassign(self, w: int, shard: int) -> int:
        """Counts one failure of worker w and picks who computes its shard again: w itself once
        Ray has restarted it, else (after max_worker_failures, or if it does not come back) a
        healthy worker."""
        self.failures[w] += 1
        if self.failures[w] < self.max_failures and not self._back(w):
            self.failures[w] = self.max_failures
        return self._next_healthy(w, shard, "failed")

    def _next_healthy(self, w: int, shard: int, what: str) -> int:
        """w if it is still healthy, else a healthy worker; none left is the end of the run."""
        healthy = self.healthy()
        if not healthy:
            raise TrainingError(
                f"no healthy worker left (last: worker-{w} {what} on shard {shard}; each may fail "
                f"{self.max_failures} times or be silent {self.scaling.worker_timeout_s:g} s); "
                "see the Ray logs for why, then continue with --resume"
            )
        return w if w in healthy else healthy[shard % len(healthy)]

    def _back(self, w: int) -> bool:
        """Whether worker w answers again within worker_timeout_s (Ray restarts dead actors;
        calls sent while it restarts would fail again and count as more failures)."""
        deadline = time.monotonic() + self.scaling.worker_timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get(self.workers[w].ping.remote(), timeout=max(0.1, deadline - time.monotonic()))
                return True
            except (RayActorError, GetTimeoutError):
                time.sleep(0.2)
        return False

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Calls `on_lost(why)` if the local Ray this process started stops under it (its raylet
        exits: killed, out of memory, or fate-shared with a dead agent): from a daemon thread
        while a step waits, and from the step itself before it puts the weights, because a put
        into a dead raylet's object store ends this process from C++ at once ("connection to the
        plasma store is failed"), printing only Ray's log lines. `on_lost` is the moment to say,
        in one line of ours, what is safe and how to go on. A driver that joined an existing
        cluster has no raylet of its own to watch."""
        self._raylet = _own_raylet() if self.owns_ray else None
        self._on_lost = on_lost
        if self._raylet is None:
            return

        def loop() -> None:
            while not self._closed.wait(0.1):  # closed: Ray's own shutdown follows, not a loss
                self._check_raylet()

        threading.Thread(target=loop, name="raylet-watch", daemon=True).start()

    def _check_raylet(self) -> None:
        raylet = self._raylet
        if raylet is None:
            return
        with self._lost:
            if raylet.poll() is not None and not self._closed.is_set():
                self._on_lost(
                    f"the local Ray instance stopped (its raylet, pid {raylet.pid}, exited with {raylet.returncode})"
                )

    def worker_info(self) -> list[dict[str, Any]]:
        return ray.get([w.info.remote() for w in self.workers])

    def describe(self) -> str:
        s = self.scaling
        gpus = f", {s.gpus_per_worker:g} GPU" if s.gpus_per_worker else ""
        if self._how is None:  # the workers decide (their device); ask once
            info = self.worker_info()
            self._how = "/".join(sorted({i["task_map"] for i in info}))
            self._how += ", " + "/".join(sorted({i["step"] for i in info}))
        return (
            f"{self.num_shards} Ray workers ({s.cpus_per_worker:g} CPU{gpus} each, {s.placement}, "
            f"store via {self.store_mode}, tasks by {self._how})"
        )

    def close(self) -> None:
        self._closed.set()
        for w in self.workers:
            ray.kill(w, no_restart=True)
        remove_placement_group(self.pg)
        self.blob = None


class CollectiveExecutor(RayExecutor):
    """scaling.mode = "collective": the same workers form one torch.distributed group and run
    the step loop themselves (stepping.collective_chunk), rank 0 the central learner. The driver
    hands rank 0 the learner's state at a chunk's start and takes it back at its end, so a
    checkpoint, a held-out score or a stop sees the same state as in driver mode. A rank that
    dies or goes silent ends the chunk for all: every worker is restarted, the group formed
    again, and the chunk run again from the state at its start (the last one the driver holds),
    so the final weights equal an undisturbed run's. Evaluation (`curves`) is driver mode's."""

    def __init__(
        self, store: Path | np.ndarray, model_cfg: ModelConfig, maml_cfg: MamlConfig, scaling: ScalingConfig
    ) -> None:
        super().__init__(store, model_cfg, maml_cfg, scaling)
        self.restarts = 0
        self.backend = self._form_group()

    def _form_group(self) -> str:
        address, port = ray.get(self.workers[0].rendezvous.remote())
        n, timeout = self.num_shards, self.scaling.worker_timeout_s
        joins = [w.join_group.remote(address, port, i, n, timeout) for i, w in enumerate(self.workers)]
        return ray.get(joins, timeout=PLACEMENT_TIMEOUT_S + timeout)[0]

    def run_steps(
        self,
        learner: Learner,
        sampler: Sampler,
        steps: Steps,
        on_step: OnStep,
    ) -> int:
        if sampler.meta_batch < self.num_shards:
            raise ConfigError(
                f"task.meta_batch ({sampler.meta_batch}) must be >= the {self.num_shards} workers of a collective "
                "group (every rank computes a shard); raise it, or lower scaling.num_workers"
            )
        failures = 0
        while True:
            self._check_raylet()
            state = (learner.state_dict(), learner.optimizer.state_dict(), learner.version)
            calls = [w.run_steps.remote(state if i == 0 else None, sampler, steps) for i, w in enumerate(self.workers)]
            try:
                outcomes, end_state = self._all(calls)[0]
                break
            except (RayActorError, RayTaskError, _GroupLost) as e:  # a rank died, broke, or was restarted
                failures += 1
                if failures >= self.max_failures:
                    raise TrainingError(
                        f"the collective group failed {failures} times running steps {steps.first}..{steps.last} (last: "
                        f"{_first_line(e)}); see the worker logs above; the last checkpoint is intact"
                    ) from None
                self._restart()
        learner.load(*end_state)
        for outcome in outcomes:
            on_step(outcome)
        return outcomes[-1].step if outcomes else steps.first - 1

    def _all(self, calls: list[Any]) -> list[Any]:
        """Every rank's answer; raises as soon as one rank fails or goes silent (the others then
        wait in a collective that will never complete: they are restarted, not awaited)."""
        watch = _Watch(self.workers, self.scaling.worker_timeout_s)
        pending = dict(zip(calls, range(len(calls)), strict=True))
        answers: list[Any] = [None] * len(calls)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            if not done:
                silent = watch.silent(set(pending.values()))
                if silent:
                    raise _GroupLost(f"worker-{silent[0]} went silent for {self.scaling.worker_timeout_s:g} s")
                continue
            answers[pending.pop(done[0])] = ray.get(done[0])
        return answers

    def _restart(self) -> None:
        """Every worker killed and restarted by Ray (max_restarts), then the group formed again."""
        self.restarts += 1
        for w in self.workers:
            ray.kill(w, no_restart=False)
        for attempt in range(3):  # a worker still dying when called fails the forming: once more
            for i in range(self.num_shards):
                if not self._back(i):
                    raise TrainingError(f"worker-{i} did not come back within {self.scaling.worker_timeout_s:g} s")
            try:
                self.backend = self._form_group()
                return
            except RayActorError:
                if attempt == 2:
                    raise

    def describe(self) -> str:
        return super().describe()[:-1] + f", collective {self.backend} group)"


def _first_line(e: BaseException) -> str:
    """Ray's errors carry whole tracebacks; a one-line message takes the cause's first line."""
    text = str(getattr(e, "cause", None) or e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:200]


class _GroupLost(Exception):
    """A rank of the collective group went silent."""


class _Watch:
    """Health checks of the workers a step waits on: one ping in flight per worker; a worker
    whose ping has gone unanswered for `timeout_s` is silent."""

    def __init__(self, workers: list[Any], timeout_s: float) -> None:
        self.workers, self.timeout_s = workers, timeout_s
        self.inflight: dict[int, tuple[Any, float]] = {}

    def silent(self, waited_on: set[int]) -> list[int]:
        now, out = time.monotonic(), []
        for w in waited_on:
            if w not in self.inflight:
                self.inflight[w] = (self.workers[w].ping.remote(), now)
                continue
            ref, sent = self.inflight[w]
            ready, _ = ray.wait([ref], timeout=0)
            if ready:  # it answered: alive (a dead actor's ping raises instead; then its call fails too)
                del self.inflight[w]
            elif now - sent > self.timeout_s:
                del self.inflight[w]
                out.append(w)
        return out


def _peak_rss_mib() -> float | None:
    """This process's peak resident memory (VmHWM), where /proc has it."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _own_raylet() -> Any:
    """The raylet process of the local Ray this process started (a Popen), or None. Ray keeps
    it on its private Node object; if that ever moves, watching is skipped, nothing breaks."""
    try:
        node = ray._private.worker.global_worker.node
        return node.all_processes["raylet"][0].process
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def _free(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {resources[k]:g}" for k in ("CPU", "GPU") if k in resources)
