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
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError

from . import raywait
from .config import MamlConfig, ModelConfig, ScalingConfig, is_import_path
from .errors import TrainingError
from .failover import Action, Failover
from .learner import Learner
from .placement import Slots
from .sampler import Sampler
from .stepping import OnStep, Steps, drive
from .userimport import search_path
from .worker import ShardResult

START_GRACE_S = 30.0  # beyond worker_timeout_s: a worker's start (torch import, store open) on a loaded node
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

    def compute(
        self, weights: np.ndarray, version: int, shards: list[np.ndarray], before: bool = True
    ) -> list[ShardResult]:
        """Each of `shards`' summed meta-gradient, computed one shard at a time (so a worker
        holding two shards after a loss returns exactly what two workers would), in one call."""
        # The weights arrive with the call that uses them, so a worker can never compute on
        # stale weights; a lower version than seen before means a driver bug, not a race.
        if version < self.version:
            raise RuntimeError(f"{self.name} got weights version {version} after {self.version}")
        self.version = version
        return [self.computer.compute(weights, ids, before, version) for ids in shards]

    def curve(self, weights: np.ndarray, shards: list[np.ndarray], max_steps: int, lr: float) -> list[Any]:
        return [self.computer.curve(weights, ids, max_steps, lr) for ids in shards]

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address for the group: this node's IP and a port free on it now."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join_group(
        self, address: str, port: int, rank: int, world: int, timeout_s: float, interface: str = ""
    ) -> tuple[str, str]:
        """Joins the torch.distributed group (gloo on a CPU, NCCL on a GPU); blocks until all
        `world` ranks have joined, so the driver calls every rank at once. Gloo and NCCL pick the
        address they advertise from the host name unless told an interface, and a host name
        often resolves to 127.0.0.1: the other hosts would then dial their own loopback. So
        each rank uses `interface`, or else the one that holds the address Ray knows its node
        by (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME set in the workers' environment win).
        Returns (backend, interface)."""
        import datetime

        import torch.distributed as dist

        ifname = interface or _interface_of(ray.util.get_node_ip_address())
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if ifname and not os.environ.get(var):
                os.environ[var] = ifname
        backend = "nccl" if self.computer.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self.rank, self.world = rank, world
        return backend, os.environ.get("GLOO_SOCKET_IFNAME" if backend == "gloo" else "NCCL_SOCKET_IFNAME", "")

    def leave_group(self) -> None:
        """Leaves the group (a worker came back or left: the group forms again around the living)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def run_steps(
        self,
        state: tuple[dict[str, Any], dict[str, Any], int] | None,
        sampler: Any,
        steps: Any,
        assignment: list[list[int]],
        num_shards: int,
    ) -> tuple[list[Any], tuple[dict[str, Any], dict[str, Any], int] | None]:
        """The collective loop over steps first..last (stepping.collective_chunk): this rank
        computes shards assignment[rank] of each step's num_shards. Rank 0 gets the learner's
        state (weights, Adam moments, version) and returns it advanced, with the steps'
        outcomes; the other ranks get and return None."""
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
        outcomes = collective_chunk(self.computer, learner, sampler, steps, self.rank, assignment, num_shards)
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
            "ip": ray.util.get_node_ip_address(),
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


def _interface_of(ip: str) -> str | None:
    """The network interface that holds `ip` on this host (psutil comes with Ray)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addresses):
            return name
    return None


@dataclass
class _Comeback:
    """A retired slot asking for its place again: its group's ready() ref, then the new
    actor's first answer; both polled without blocking at step boundaries."""

    placed: Any
    since: float = field(default_factory=time.monotonic)
    probe: Any = None


class RayExecutor:
    """A pool of worker actors, one placement group per slot (placement.Slots); `compute` runs
    one step's shards. Which worker computes which shard, and what a failure means, is the
    failover policy's (failover.Failover); every wait is bounded (raywait)."""

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
        first = scaling.min_workers or n  # elastic: the rest join as room appears (take_back)
        self.slots = Slots(n, bundle, scaling.placement, placed=first)
        self.policy = Failover(n, scaling.max_worker_failures, scaling.worker_timeout_s)
        for w in range(first, n):
            self.policy.retire(w)
        try:
            self._share_store(store)
        except BaseException:
            self.slots.close()
            raise
        code = tuple(p for p in [search_path(model_cfg.name)] if p) if is_import_path(model_cfg.name) else ()
        self._args = (model_cfg, maml_cfg, scaling.cpus_per_worker, scaling.gpus_per_worker)
        self._opts = (scaling.task_map, code, scaling.gpu_step)
        self.workers: list[Any] = [self._spawn(i) if i < first else None for i in range(n)]
        self._info: list[dict[str, Any] | None] = [None] * n
        self._started = False
        self._comebacks: dict[int, _Comeback] = {}
        self._returns = [0] * n

    @property
    def failures(self) -> list[int]:
        return self.policy.failures

    def healthy(self) -> list[int]:
        return self.policy.healthy()

    def _share_store(self, store: Path | np.ndarray) -> None:
        """How workers read the store: by path where every slot's node sees the file, else one
        copy of its bytes in the object store. A slot that does not answer within the bound
        (its node lost while the run starts) counts as not seeing it: the object store works
        on any node."""
        in_memory = isinstance(store, np.ndarray)
        path = "<in-memory store>" if in_memory else str(Path(store).resolve())
        self.source = StoreSource(path, store.nbytes if in_memory else Path(path).stat().st_size)
        mode = "object_store" if in_memory else self.scaling.store_sharing
        if mode == "auto" and self.scaling.min_workers:  # a node that joins later may not see the path
            mode = "object_store"
        if mode == "auto":
            placed = self.healthy()
            refs = [
                _sees_store.options(scheduling_strategy=self.slots.strategy(i)).remote(path, self.source.size)
                for i in placed
            ]
            deadline, answered = time.monotonic() + self.scaling.worker_timeout_s, set()
            while len(answered) < len(refs) and time.monotonic() < deadline:
                answered.update(raywait.done([r for r in refs if r not in answered], _poll(deadline)))
            seen = len(answered) == len(refs) and all(raywait.result(r) for r in refs)
            mode = "path" if seen else "object_store"
        # One copy of the store's bytes in the object store, shared by every worker of a node.
        self.blob = (
            ray.put(store if in_memory else np.fromfile(path, dtype=np.uint8)) if mode == "object_store" else None
        )
        self.store_mode = mode

    def _spawn(self, i: int) -> Any:
        s = self.scaling
        return WorkerActor.options(
            num_cpus=s.cpus_per_worker, num_gpus=s.gpus_per_worker, scheduling_strategy=self.slots.strategy(i)
        ).remote(self.source, self.blob, *self._args, i, *self._opts)

    def start(self) -> None:
        """Waits, bounded, until every worker has started (its store open, its model built). A
        slot whose worker does not start within worker_timeout_s + START_GRACE_S (its node lost
        or cut off while the run starts) is retired and its shards go to the others; a worker
        whose constructor raised is a one-line error (the same would fail on every node)."""
        if self._started:
            return
        self._started = True
        pending = {self.workers[i].info.remote(): i for i in self.healthy()}
        deadline = time.monotonic() + self.scaling.worker_timeout_s + START_GRACE_S
        while pending and time.monotonic() < deadline:
            for i in self.slots.lost() & set(pending.values()):
                pending = {r: j for r, j in pending.items() if j != i}
                self._retire(i, "was lost while starting (Ray declared its node dead)")
            for ref in raywait.done(list(pending), _poll(deadline)):
                i = pending.pop(ref)
                try:
                    self._info[i] = raywait.result(ref)
                except RayActorError as e:
                    if e.actor_init_failed:
                        raise TrainingError(f"worker-{i} could not start: {_first_line(e)}") from None
                    self._retire(i, f"was lost while starting ({_first_line(e)})")
        for i in pending.values():
            self._retire(i, f"did not start within {self.scaling.worker_timeout_s + START_GRACE_S:g} s")
        if not self.healthy():
            raise TrainingError(
                "no worker started (see the lines above); check that the cluster's nodes are reachable, "
                "then continue with --resume"
            )

    def _retire(self, w: int, why: str) -> None:
        """Worker w leaves the pool: its actor killed, its slot's placement group removed (a
        group left to Ray after its node died is rescheduled in a tight loop: see placement.py)."""
        self.policy.retire(w)
        if self.slots.groups[w] is None:
            return  # already out of the pool
        ray.kill(self.workers[w], no_restart=True)
        self.slots.release(w)
        self._comebacks.pop(w, None)
        left = len(self.healthy())
        print(f"distributed-maml: worker-{w} {why}; retired, its shards move to the other {left}", file=sys.stderr)

    def take_back(self) -> list[int]:
        """Elastic workers, at a step boundary: a retired slot asks for a new place (a fresh
        placement group: its node returned, or another has room), a new actor starts there,
        and once it answers it takes its shards back. Never blocks; each slot comes back at
        most max_worker_failures times; a worker retired for failing stays out. Returns the
        slots that came back now."""
        back = []
        for w in self.policy.may_return():
            c = self._comebacks.get(w)
            if c is None:
                if self._returns[w] < self.scaling.max_worker_failures:
                    self._comebacks[w] = _Comeback(self.slots.request(w))
                    self._returns[w] += 1
                continue
            if c.probe is None and raywait.done([c.placed], 0):
                self.workers[w] = self._spawn(w)
                c.probe = self.workers[w].info.remote()
            elif c.probe is not None and raywait.done([c.probe], 0):
                del self._comebacks[w]
                first = self._info[w] is None  # an elastic run's slot joining for the first time
                try:
                    self._info[w] = raywait.result(c.probe)
                except RayActorError as e:
                    self.slots.release(w)
                    print(f"distributed-maml: worker-{w} could not come back: {_first_line(e)}", file=sys.stderr)
                    continue
                self.policy.back(w)
                back.append(w)
                what = "joined" if first else "is back"
                print(f"distributed-maml: worker-{w} {what} (node {self._info[w]['ip']})", file=sys.stderr)
            elif c.probe is not None and time.monotonic() - c.since > self.scaling.worker_timeout_s + START_GRACE_S:
                del self._comebacks[w]  # placed on a node that went away again: ask again later
                ray.kill(self.workers[w], no_restart=True)
                self.slots.release(w)
        return back

    def compute(
        self, weights: np.ndarray, version: int, shards: list[np.ndarray], before: bool = True
    ) -> list[ShardResult]:
        """Every shard's result, in shard order (see _map: nothing lost, nothing doubled)."""
        ref = self._share(weights)
        return self._map(lambda worker, mine: worker.compute.remote(ref, version, mine, before), shards)

    def curves(self, weights: np.ndarray, shards: list[np.ndarray], max_steps: int, lr: float) -> list[Any]:
        """Adaptation curves of each shard's tasks (evaluation), in shard order."""
        ref = self._share(weights)
        return self._map(lambda worker, mine: worker.curve.remote(ref, mine, max_steps, lr), shards)

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

    def _map(self, call: Callable[[Any, list[np.ndarray]], Any], shards: list[np.ndarray]) -> list[Any]:
        """Each worker gets its shards (failover.Failover.owner) in one call; results come back
        in shard order. The shards of a worker that died, or went silent for `worker_timeout_s`
        (a lost node whose actor has nowhere to restart waits forever otherwise), are computed
        again where the policy says: a step never goes on with a shard missing, and never waits
        without bound."""
        self.start()
        self.take_back()
        results: list[Any] = [None] * len(shards)
        pending: dict[Any, tuple[list[int], int]] = {}

        def send(idx: list[int]) -> None:
            by_owner: dict[int, list[int]] = {}
            for i in idx:
                by_owner.setdefault(self.policy.owner(i), []).append(i)
            for w, mine in by_owner.items():
                pending[call(self.workers[w], [shards[i] for i in mine])] = (mine, w)

        send(list(range(len(shards))))
        watch = _Watch(self.workers, self.scaling.worker_timeout_s)
        while pending:
            ready = raywait.done(list(pending), POLL_S)
            if not ready:
                for w in watch.silent({w for _, w in pending.values()}):
                    self._retire(w, f"went silent for {self.scaling.worker_timeout_s:g} s")
                    lost = [i for ref, (idx, owner) in list(pending.items()) if owner == w for i in pending.pop(ref)[0]]
                    self.policy.silent(w, lost[0])
                    send(lost)
                continue
            for ref in ready:
                idx, w = pending.pop(ref)
                try:
                    for i, r in zip(idx, raywait.result(ref), strict=True):
                        results[i] = r
                except RayActorError as e:
                    decision = self.policy.failed(w, idx[0], restarted=self._back(w))
                    if decision.action is Action.MOVE:
                        self._retire(w, f"failed {self.policy.failures[w]} time(s) ({_first_line(e)})")
                    send(idx)
        return results

    def _back(self, w: int) -> bool:
        """Whether worker w, whose call just failed, answers again within worker_timeout_s (Ray
        restarts dead actors; calls sent while it restarts would fail again and count as more
        failures). Not asked on its last allowed failure: it retires whatever the answer."""
        if self.policy.failures[w] + 1 >= self.policy.max_failures:
            return False
        return self._answers(w, self.scaling.worker_timeout_s)

    def _answers(self, w: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ping = self.workers[w].ping.remote()
            try:
                if raywait.done([ping], max(0.1, deadline - time.monotonic())):
                    raywait.result(ping)
                    return True
            except RayActorError:
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
        """Every worker's description, asked now (a retired one: its last, with "retired")."""
        self.start()
        live = {i: self.workers[i].info.remote() for i in self.healthy()}
        answers = raywait.get(list(live.values()), self.scaling.worker_timeout_s, "the workers' descriptions")
        for i, info in zip(live, answers, strict=True):
            self._info[i] = info
        return [{**(self._info[i] or {}), "retired": i in self.policy.retired} for i in range(self.num_shards)]

    def describe(self) -> str:
        s = self.scaling
        self.start()
        info = [self._info[i] for i in self.healthy() if self._info[i] is not None]
        how = "/".join(sorted({i["task_map"] for i in info})) + ", " + "/".join(sorted({i["step"] for i in info}))
        gpus = f", {s.gpus_per_worker:g} GPU" if s.gpus_per_worker else ""
        width = f"{len(info)} of {self.num_shards}" if len(info) < self.num_shards else f"{self.num_shards}"
        return (
            f"{width} Ray workers ({s.cpus_per_worker:g} CPU{gpus} each, {s.placement}, "
            f"store via {self.store_mode}, tasks by {how})"
        )

    def close(self) -> None:
        self._closed.set()
        for w in self.workers:
            if w is not None:
                ray.kill(w, no_restart=True)
        self.slots.close()
        self.blob = None


def _poll(deadline: float) -> float:
    """How long one wait may take before a deadline: at most POLL_S, never negative."""
    return max(0.0, min(POLL_S, deadline - time.monotonic()))


def _first_line(e: BaseException) -> str:
    """Ray's errors carry whole tracebacks; a one-line message takes the cause's first line."""
    text = str(getattr(e, "cause", None) or e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:200]


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
            if raywait.done(
                [ref], 0
            ):  # it answered: alive (a dead actor's ping raises instead; then its call fails too)
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
