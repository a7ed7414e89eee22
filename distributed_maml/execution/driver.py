"""Ray driver mode: the driver calls every worker every step (`RayExecutor`).

Per step only task ids and the weights (inside each call when under 64 KiB, else one
object-store reference for all) travel to the workers; each returns its shard's summed
meta-gradient as one flat float32 numpy array (which Ray hands back without a copy). Workers
are placed one placement group per slot (execution/placement.py); a worker that dies or goes
silent has its shards moved by the failover policy (execution/failover.py), and every wait on
the cluster is bounded (execution/raywait.py).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from distributed_maml.config import MamlConfig, ModelConfig, ScalingConfig, is_import_path
from distributed_maml.core.shards import ShardResult
from distributed_maml.errors import TrainingError
from distributed_maml.execution import raywait
from distributed_maml.execution.actor import StoreSource, WorkerActor, WorkerInfo, _sees_store
from distributed_maml.execution.failover import Action, Failover
from distributed_maml.execution.health import POLL_S, _first_line, _own_raylet, _poll, _Watch
from distributed_maml.execution.placement import Slots
from distributed_maml.execution.stepping import Driven
from distributed_maml.userimport import search_path

START_GRACE_S = 30.0  # beyond worker_timeout_s: a worker's start (torch import, store open) on a loaded node
INLINE_BYTES = 64 * 1024  # weights up to this size ride in each call (below Ray's 100 KB inlining limit)


def connect() -> bool:
    """Joins the cluster named by RAY_ADDRESS (as under `ray job submit`), or starts a local
    Ray when there is none (or RAY_ADDRESS=local: never join a `ray start` head found on this
    machine). Token authentication stays as Ray configures it (on by default);
    a local instance keeps its dashboard off, so nothing listens beyond what Ray needs.
    True when this call connected (the caller owns the connection)."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS", "local") != "local":  # "local": Ray's own word for "start one here"
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
    """Workers' GPUs when none is asked for: scaling.device = "cuda" gives each one GPU; "auto"
    with num_workers = -1 on a cluster with GPUs, one worker per GPU; "cpu" none."""
    if scaling.device == "cpu" or scaling.gpus_per_worker > 0:
        return scaling
    auto = scaling.num_workers == -1 and ray.cluster_resources().get("GPU", 0) >= 1
    if scaling.device == "cuda" or auto:
        return replace(scaling, gpus_per_worker=1.0)
    return scaling


@dataclass
class _Comeback:
    """A retired slot asking for its place again: its group's ready() ref, then the new
    actor's first answer; both polled without blocking at step boundaries."""

    placed: Any
    since: float = field(default_factory=time.monotonic)
    probe: Any = None


class RayExecutor(Driven):
    """A pool of worker actors, one placement group per slot (placement.Slots); `compute` runs
    one step's shards. Which worker computes which shard, and what a failure means, is the
    failover policy's (failover.Failover); every wait is bounded (raywait)."""

    learner_device = "cpu"  # Ray carries the weights: the learner is where ray.put takes them from

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
        self.num_workers = n = resolve_num_workers(scaling)
        self.num_shards = n * scaling.shards_per_worker  # fixed: the weights depend on this, not on who computes
        first = scaling.min_workers or n  # elastic: the rest join as room appears (take_back)
        self.slots = Slots(scaling.slices(n), scaling.placement, placed=first)  # one slice a worker (pools: mixed)
        self.policy = Failover(n, scaling.max_worker_failures, scaling.worker_timeout_s)
        for w in range(first, n):
            self.policy.retire(w)
        try:
            self._share_store(store)
        except BaseException:
            self.slots.close()
            raise
        code = tuple(p for p in [search_path(model_cfg.name)] if p) if is_import_path(model_cfg.name) else ()
        self._args = (model_cfg, maml_cfg)
        self._opts = (scaling.task_map, code, scaling.gpu_step, scaling.precision)
        self.workers: list[Any] = [self._spawn(i) if i < first else None for i in range(n)]
        self._info: list[WorkerInfo | None] = [None] * n
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
        cpus, gpus = self.slots.bundles[i]["CPU"], self.slots.bundles[i].get("GPU", 0.0)  # this slot's slice
        return WorkerActor.options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=self.slots.strategy(i)).remote(
            self.source, self.blob, *self._args, cpus, gpus, i, *self._opts
        )

    def start(self) -> None:
        """Waits, bounded, until every worker has started (its store open, its model built). A
        slot whose worker does not start within worker_timeout_s + START_GRACE_S (its node lost
        or cut off while the run starts) is retired and its shards go to the others; one that
        Ray is restarting (its process died) is asked again within the same bound; a worker
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
                except ActorUnavailableError:  # its process died and Ray is restarting it: ask again
                    time.sleep(0.2)
                    pending[self.workers[i].info.remote()] = i
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
                print(f"distributed-maml: worker-{w} {what} (node {self._info[w].ip})", file=sys.stderr)
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

    def curves(self, weights: np.ndarray, shards: list[np.ndarray], steps: Sequence[int], lr: float) -> list[Any]:
        """Adaptation curves of each shard's tasks (evaluation), in shard order."""
        ref = self._share(weights)
        return self._map(lambda worker, mine: worker.curve.remote(ref, mine, tuple(steps), lr), shards)

    def _share(self, weights: np.ndarray) -> Any:
        """The weights as a call argument. Small ones travel inside each call (Ray inlines
        arguments under 100 KB): no object-store put per step, and none to free at the next,
        each an IPC to the raylet that ends this process from C++ if the raylet is gone. Large
        ones go into the object store once per step, the same ref for every worker."""
        self._check_raylet()
        return weights if weights.nbytes <= INLINE_BYTES else ray.put(weights)

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
            owners = self.policy.owners(len(shards))  # by speed; again after a retirement
            by_owner: dict[int, list[int]] = {}
            for i in idx:
                by_owner.setdefault(owners[i], []).append(i)
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
                    got = raywait.result(ref)
                    for i, r in zip(idx, got, strict=True):
                        results[i] = r
                    if got and isinstance(got[0], ShardResult):  # a training step (not a curve): the worker's speed
                        self.policy.observe(w, sum(r.count for r in got), sum(r.compute_s for r in got))
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

    def worker_info(self) -> list[WorkerInfo | None]:
        """Every worker's description, asked now (a retired one: its last, marked retired; None
        for a slot that never started)."""
        self.start()
        live = {i: self.workers[i].info.remote() for i in self.healthy()}
        answers = raywait.get(list(live.values()), self.scaling.worker_timeout_s, "the workers' descriptions")
        for i, info in zip(live, answers, strict=True):
            self._info[i] = info
        return [
            None if info is None else replace(info, retired=i in self.policy.retired)
            for i, info in enumerate(self._info)
        ]

    def describe(self) -> str:
        s = self.scaling
        self.start()
        info = [self._info[i] for i in self.healthy() if self._info[i] is not None]
        how = "/".join(sorted({i.task_map for i in info})) + ", " + "/".join(sorted({i.step for i in info}))
        width = f"{len(info)} of {self.num_workers}" if len(info) < self.num_workers else f"{self.num_workers}"
        shards = f", {self.num_shards} shards a step by speed" if self.num_shards > self.num_workers else ""
        slices, where = s.describe_slices(), f"{s.placement}, store via {self.store_mode}"
        return f"{width} Ray workers ({slices}, {where}, tasks by {how}{shards})"

    def close(self) -> None:
        self._closed.set()
        for w in self.workers:
            if w is not None:
                ray.kill(w, no_restart=True)
        self.slots.close()
        self.blob = None
