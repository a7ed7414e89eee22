"""[scaling]: where the per-task work runs (the one section that never changes the answer: a
run's weights do not depend on it, so a resume may change any of it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from distributed_maml.config.values import (
    DEVICES,
    GPU_STEPS,
    MODES,
    PLACEMENTS,
    PRECISIONS,
    STORE_SHARING,
    TASK_MAPS,
    Device,
    GpuStep,
    Mode,
    Placement,
    Precision,
    StoreSharing,
    TaskMap,
    _require,
)


@dataclass(frozen=True)
class ScalingConfig:
    """[scaling]: where the per-task work runs."""

    device: Device = "auto"
    """Where the run computes: "auto" (CUDA when the machine has it, else the CPU), "cpu" or
    "cuda". Honoured by everything that adapts tasks: an in-process run (num_workers = 0, with
    the learner's weights and Adam's state on the device), validation, `eval`'s curves and
    baselines, `bench --eval`. Ray workers compute where their slice is: "cuda" gives each
    worker gpus_per_worker (1 when unset), "cpu" never a GPU. The run's first line says where
    each part runs."""
    precision: Precision = "fp32"
    """Arithmetic of the meta-gradient: "fp32" (exact float32, the default: TF32 off on GPUs),
    "tf32" (TF32 matmuls and convolutions on Ampere and newer GPUs; the same as fp32 on a CPU)
    or "bf16" (autocast to bfloat16, weights and Adam in float32). Their measured error against
    fp32 is in docs/benchmarks.md. Unlike the rest of [scaling], it changes the numbers."""
    num_workers: int = -1
    """Ray worker actors; 0 runs in-process without Ray, -1 sizes the pool to the cluster
    (one worker per GPU when there are GPUs, else one per cpus_per_worker CPUs). A range
    `[min, max]` sets min_workers = min and num_workers = max."""
    min_workers: int = 0
    """Elastic start: the run begins once this many workers are placed and grows to num_workers
    as room appears (0: all num_workers must be placed). A step's shards are always
    num_workers, so the weights do not depend on how many workers computed them."""
    shards_per_worker: int = 1
    """A step's tasks are cut into num_workers x shards_per_worker fixed shards (in-process:
    shards_per_worker shards), handed out to the workers by their measured speed: a slow
    worker computes fewer of them instead of holding the step up. The weights depend on the
    number of shards only (a run of 4 workers x 2 equals one of 8 x 1, bit for bit), never on
    who computed which; 1 is one shard per worker, as before."""
    pools: tuple[dict[str, Any], ...] = ()
    """Workers of different slices in one run (mixed hardware: a GPU worker beside CPU
    workers, whole and fractional GPUs): a list of tables such as
    `[{num_workers = 1, gpus_per_worker = 1}, {num_workers = 2, cpus_per_worker = 1}]`, each
    worker computing on its own device (cpus_per_worker and gpus_per_worker default to the
    section's). num_workers is their sum (leave it -1, or give the sum). Give shards_per_worker
    > 1 so that the faster workers take more shards. Driver mode."""
    cpus_per_worker: float = 1.0
    """CPUs each worker reserves; its torch thread count is set to match."""
    gpus_per_worker: float = 0.0
    """GPUs each worker reserves (fractions share a card); > 0 computes on cuda:0 in the actor."""
    placement: Placement = "pack"
    """"pack" keeps workers on as few nodes as possible, "spread" puts them on distinct nodes."""
    max_worker_failures: int = 3
    """Failed calls a worker may have before its shards move to the other workers."""
    worker_timeout_s: float = 60.0
    """How long a worker may go without answering a health check (its actor dead, restarting,
    or waiting for a node that will not come) before it counts as failed for good and its
    shards move to the live workers. A busy worker still answers: checks run beside its work."""
    task_map: TaskMap = "auto"
    """How a worker maps its shard's tasks: "vmap" (one batched computation), "loop" (one task
    at a time) or "auto": loop for conv nets on a CPU (vmap turns their convolutions into slow
    grouped ones there), vmap otherwise. Same gradients either way (tested)."""
    gpu_step: GpuStep = "graph"
    """How a GPU worker runs an unlogged step: "graph" (captured once per padded shard size as a
    CUDA graph and replayed: no per-kernel launch cost; checked against eager at capture, eager
    again if it differs) or "eager". CPU workers always run eagerly."""
    mode: Mode = "driver"
    """"driver": the driver calls every worker every step (the reference loop). "collective":
    the workers form a torch.distributed group (gloo on CPUs, NCCL on GPUs) and run the steps
    themselves, rank 0 the learner, handing the driver the state at each logged, checkpointed or
    evaluated step: no Ray call per step, which wins where a step is shorter than a Ray call.
    Same weights either way (tested); needs Ray workers."""
    store_sharing: StoreSharing = "auto"
    """How workers read the task store: "path" (memory-map the file; every node must see it),
    "object_store" (the file's bytes put into Ray's object store once) or "auto" (path when
    every worker's node sees the file, else object_store)."""
    interface: str = ""
    """The network interface a collective group's ranks talk over (gloo, NCCL). Empty: on each
    node, the interface that holds the address Ray knows the node by (a host name that resolves
    to 127.0.0.1 would otherwise send the other hosts to their own loopback). GLOO_SOCKET_IFNAME
    / NCCL_SOCKET_IFNAME in the workers' environment win over both."""

    def slices(self, num_workers: int) -> list[dict[str, float]]:
        """Each of `num_workers` workers' Ray resources, in worker order: the pools' in turn,
        else the section's cpus_per_worker and gpus_per_worker for every one."""
        if not self.pools:
            return [_bundle(self.cpus_per_worker, self.gpus_per_worker)] * num_workers
        return [
            _bundle(p.get("cpus_per_worker", self.cpus_per_worker), p.get("gpus_per_worker", self.gpus_per_worker))
            for p in self.pools
            for _ in range(p["num_workers"])
        ]

    def describe_slices(self) -> str:
        """'1 CPU each', '1 CPU, 0.5 GPU each', or each pool's count and slice: for first lines."""
        if not self.pools:
            return f"{_slice(self.cpus_per_worker, self.gpus_per_worker)} each"
        return "; ".join(
            f"{p['num_workers']} x "
            + _slice(p.get("cpus_per_worker", self.cpus_per_worker), p.get("gpus_per_worker", self.gpus_per_worker))
            for p in self.pools
        )

    def __post_init__(self) -> None:
        if self.pools:
            self._check_pools()
        _require(self.num_workers >= -1, f"scaling.num_workers must be >= 0, or -1 for auto, got {self.num_workers}")
        _require(
            self.min_workers == 0 or 1 <= self.min_workers <= self.num_workers,
            f"scaling.min_workers must be 0 (all) or between 1 and num_workers ({self.num_workers}), "
            f"got {self.min_workers}",
        )
        _require(
            isinstance(self.shards_per_worker, int) and self.shards_per_worker >= 1,
            f"scaling.shards_per_worker must be a whole number >= 1, got {self.shards_per_worker}",
        )
        _require(
            math.isfinite(self.cpus_per_worker) and self.cpus_per_worker > 0,
            f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}",
        )
        _require(
            math.isfinite(self.gpus_per_worker) and self.gpus_per_worker >= 0,
            f"scaling.gpus_per_worker must be >= 0, got {self.gpus_per_worker}",
        )
        _require(
            self.gpus_per_worker <= 1 or float(self.gpus_per_worker).is_integer(),
            f"scaling.gpus_per_worker above 1 must be a whole number, got {self.gpus_per_worker}",
        )
        _require(
            self.placement in PLACEMENTS,
            f"scaling.placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}",
        )
        _require(
            self.gpu_step in GPU_STEPS,
            f"scaling.gpu_step must be one of {', '.join(GPU_STEPS)}, got {self.gpu_step!r}",
        )
        _require(self.device in DEVICES, f"scaling.device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        _require(
            self.device != "cpu" or self.gpus_per_worker == 0,
            f"scaling.device = 'cpu' contradicts scaling.gpus_per_worker = {self.gpus_per_worker:g}; "
            "set one of them (device = 'auto' follows gpus_per_worker)",
        )
        _require(
            self.precision in PRECISIONS,
            f"scaling.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        _require(self.mode in MODES, f"scaling.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        _require(
            self.mode == "driver" or self.num_workers != 0,
            "scaling.mode = 'collective' needs Ray workers: set scaling.num_workers >= 1 (or -1 for auto)",
        )
        _require(
            self.store_sharing in STORE_SHARING,
            f"scaling.store_sharing must be one of {', '.join(STORE_SHARING)}, got {self.store_sharing!r}",
        )
        _require(
            self.task_map in TASK_MAPS,
            f"scaling.task_map must be one of {', '.join(TASK_MAPS)}, got {self.task_map!r}",
        )
        _require(
            self.max_worker_failures >= 1,
            f"scaling.max_worker_failures must be >= 1, got {self.max_worker_failures}",
        )
        _require(
            math.isfinite(self.worker_timeout_s) and self.worker_timeout_s > 0,
            f"scaling.worker_timeout_s must be a number of seconds > 0, got {self.worker_timeout_s}",
        )

    def _check_pools(self) -> None:
        """scaling.pools, each table checked, and num_workers set to their sum."""
        keys = ("num_workers", "cpus_per_worker", "gpus_per_worker")
        total = 0
        for i, p in enumerate(self.pools):
            where = f"scaling.pools[{i}]"
            _require(isinstance(p, dict), f"{where} must be a table {{num_workers = N, ...}}, got {p!r}")
            unknown = sorted(set(p) - set(keys))
            _require(
                not unknown, f"{where} has unknown key {unknown[0] if unknown else ''}; a pool takes {', '.join(keys)}"
            )
            n = p.get("num_workers")
            _require(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1,
                f"{where}.num_workers must be a whole number >= 1, got {n!r}",
            )
            cpus, gpus = p.get("cpus_per_worker", self.cpus_per_worker), p.get("gpus_per_worker", self.gpus_per_worker)
            _require(
                isinstance(cpus, (int, float)) and math.isfinite(cpus) and cpus > 0,
                f"{where}.cpus_per_worker must be > 0, got {cpus!r}",
            )
            _require(
                isinstance(gpus, (int, float))
                and math.isfinite(gpus)
                and gpus >= 0
                and (gpus <= 1 or float(gpus).is_integer()),
                f"{where}.gpus_per_worker must be >= 0 (a whole number above 1), got {gpus!r}",
            )
            _require(
                self.device != "cpu" or gpus == 0,
                f"scaling.device = 'cpu' contradicts {where}.gpus_per_worker = {gpus:g}",
            )
            total += n
        _require(
            self.num_workers in (-1, total),
            f"scaling.num_workers ({self.num_workers}) must be -1 or the pools' sum ({total}) when scaling.pools is set",
        )
        _require(
            self.mode == "driver",
            "scaling.pools runs in driver mode (a collective group needs one backend); set scaling.mode = 'driver'",
        )
        object.__setattr__(self, "num_workers", total)  # frozen: the one place the sum is set


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}


def _slice(cpus: float, gpus: float) -> str:
    return f"{cpus:g} CPU" + (f", {gpus:g} GPU" if gpus else "")
