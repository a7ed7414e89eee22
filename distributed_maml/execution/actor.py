"""The Ray worker actor: one per GPU or CPU slice, wrapping a ShardComputer over the task store
it reads where it runs (memory-mapped from a path the node sees, or one copy of the file's
bytes from Ray's object store). Driver mode calls `compute` / `curve` with the shards of each
step; collective mode joins a torch.distributed group and runs steps itself (`run_steps`).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from distributed_maml.config import MamlConfig, ModelConfig
from distributed_maml.core.learner import Learner
from distributed_maml.core.shards import ShardResult
from distributed_maml.data.store import TaskStore
from distributed_maml.execution.computer import ShardComputer
from distributed_maml.execution.health import _peak_rss_mib
from distributed_maml.execution.stepping import collective_chunk
from distributed_maml.userimport import ensure_on_path


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker says about itself: where it runs (node, address, process, device), how it
    reads the store and computes (tasks by vmap or loop, CUDA graphs or eager), and its peak
    memory so far. `retired`: the run no longer uses it (its node was lost)."""

    name: str
    node_id: str
    ip: str
    pid: int
    device: str
    store_mode: str
    task_map: str
    step: str
    torch_threads: int
    gpu_ids: tuple[str, ...]
    peak_rss_mib: float | None
    peak_gpu_mib: float | None
    retired: bool = False


@dataclass(frozen=True)
class StoreSource:
    """How a worker finds the task store: a path it memory-maps, or the file's bytes in the
    object store (`blob` is resolved by Ray to a zero-copy uint8 array before the actor starts)."""

    path: str
    size: int


def slice_device(gpus: float, name: str) -> str:
    """Where a worker of this slice computes: its GPU when the slice has one (Ray narrows
    CUDA_VISIBLE_DEVICES to the actor's GPU, so it is always cuda:0), else the CPU. A slice with
    a GPU on a node whose torch sees none is an error, never a silent CPU worker: in a pool of
    mixed slices it would hold GPU shards at a CPU's pace."""
    if gpus <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{name} holds {gpus:g} GPU but torch {torch.__version__} on its node sees no CUDA device; "
            "install a CUDA build of PyTorch there, or give its pool gpus_per_worker = 0"
        )
    return "cuda:0"


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
        precision: str = "fp32",
    ) -> None:
        for folder in code_paths:  # where the driver imported user models from, if this node has it
            ensure_on_path(folder)
        torch.set_num_threads(max(1, int(cpus)))  # no oversubscription: threads = the CPU slice
        device = slice_device(gpus, f"worker-{index}")
        if blob is not None:
            store, self.store_mode = TaskStore.from_buffer(blob, name=f"{source.path} (object store)"), "object_store"
        else:
            store, self.store_mode = TaskStore.open(source.path), "path"
        self.name = f"worker-{index}"
        self.computer = ShardComputer(
            store,
            model_cfg,
            maml_cfg,
            device=device,
            name=self.name,
            task_map=task_map,
            gpu_step=gpu_step,
            precision=precision,
        )
        self.version = -1
        self.slowdown: tuple[float, float] | None = None

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
        results = [self.computer.compute(weights, ids, before, version) for ids in shards]
        if self.slowdown is not None:  # a test's or benchmark's straggler (slow_down)
            factor, per_task_s = self.slowdown
            for r in results:
                extra = (factor - 1.0) * r.compute_s + per_task_s * r.count
                time.sleep(extra)
                r.compute_s += extra
        return results

    def slow_down(self, factor: float = 1.0, per_task_s: float = 0.0) -> None:
        """Test and benchmark hook: from now on each shard takes `factor` times its compute time
        plus `per_task_s` a task (a slower card, a noisy neighbour; tests/test_ray.py,
        benchmarks/stragglers.py). Gone when Ray restarts the actor."""
        self.slowdown = (factor, per_task_s)

    def curve(self, weights: np.ndarray, shards: list[np.ndarray], steps: Sequence[int], lr: float) -> list[Any]:
        return [self.computer.curve(weights, ids, steps, lr) for ids in shards]

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
        if not dist.is_initialized():  # restarted by Ray since the group formed: the group must form again
            raise RuntimeError(f"{self.name} is not in the collective group (it was restarted)")
        learner = None
        if state is not None:
            flat = self.computer.spec.flatten(state[0])
            # NCCL: rank 0 holds the learner on its GPU (the broadcast reads its weights there)
            where = str(self.computer.device) if dist.get_backend() == "nccl" else "cpu"
            learner = Learner.of(
                self.computer.spec, flat, self.computer.maml_cfg, lr=0.0, device=where
            )  # lr: in the state
            learner.load(*state)
        outcomes = collective_chunk(self.computer, learner, sampler, steps, self.rank, assignment, num_shards)
        if learner is None:
            return outcomes, None
        return outcomes, (learner.state_dict(), learner.optimizer_state(), learner.version)

    @ray.method(concurrency_group="health")
    def ping(self) -> int:
        """Answers while `compute` runs (its own thread): silence means dead, restarting or unplaced."""
        return os.getpid()

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            name=self.name,
            node_id=ray.get_runtime_context().get_node_id(),
            ip=ray.util.get_node_ip_address(),
            pid=os.getpid(),
            device=str(self.computer.device),
            store_mode=self.store_mode,
            task_map=self.computer.task_map,
            step=self.computer.step_kind,
            torch_threads=torch.get_num_threads(),
            gpu_ids=tuple(ray.get_runtime_context().get_accelerator_ids().get("GPU", [])),
            peak_rss_mib=_peak_rss_mib(),
            peak_gpu_mib=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        )


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
