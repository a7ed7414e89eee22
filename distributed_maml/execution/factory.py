"""The one factory of executors: in-process for scaling.num_workers = 0, else Ray workers in
driver or collective mode. Ray loads only when workers are asked for (in-process runs and
held-out evaluation on one machine start without it)."""

from __future__ import annotations

from pathlib import Path

from distributed_maml.config import MamlConfig, ModelConfig, ScalingConfig
from distributed_maml.data.store import TaskStore
from distributed_maml.execution import devices
from distributed_maml.execution.computer import ShardComputer
from distributed_maml.execution.protocol import Executor


def local_computer(
    store: TaskStore, model: ModelConfig, maml: MamlConfig, scaling: ScalingConfig, name: str = "in-process"
) -> ShardComputer:
    """The ShardComputer of this process on scaling.device (resolved here: "cuda" without CUDA
    is a one-line error): what an in-process run, validation, `eval`'s curves and baselines
    and `bench --eval` compute with."""
    compute = devices.resolve(scaling)
    return ShardComputer(
        store,
        model,
        maml,
        device=str(compute.device),
        name=name,
        task_map=scaling.task_map,
        gpu_step=scaling.gpu_step,
        precision=compute.precision,
    )


def make(store: TaskStore, model: ModelConfig, maml: MamlConfig, scaling: ScalingConfig) -> Executor:
    """In-process for scaling.num_workers = 0, else Ray workers (driven, or a collective group). A store on disk is read where
    the work runs (by path, or its file's bytes in the object store); an in-memory one (held-out
    tasks) travels as its bytes."""
    # Imports here are deferred for start-up time, not to dodge a circle (tests/test_layers.py counts them).
    if scaling.num_workers == 0:
        from distributed_maml.execution.inprocess import InProcessExecutor

        return InProcessExecutor(local_computer(store, model, maml, scaling), num_shards=scaling.shards_per_worker)
    from distributed_maml.execution.collective import CollectiveExecutor
    from distributed_maml.execution.driver import RayExecutor

    kind = CollectiveExecutor if scaling.mode == "collective" else RayExecutor
    return kind(store.buffer() if store.in_memory else Path(store.name), model, maml, scaling)
