"""The executor seam: what the training loop and evaluation ask of whoever computes shards,
and the one factory that picks it. Ray-free: Ray is imported only when workers are asked for.

An executor holds `num_shards` workers; `compute` returns every shard's summed meta-gradient
(a worker.ShardResult) in shard order, `curves` the adaptation curves of held-out tasks.
`run_steps` advances the learner by a run of steps (stepping.Steps), reporting each step's outcome
(stepping.StepOutcome) to `on_step`, and returns the last step done.

Implementations: worker.InProcessExecutor (num_workers = 0), runtime.RayExecutor (scaling.mode
= "driver": the driver calls every worker every step) and collective.CollectiveExecutor ("collective":
the workers run the steps as one torch.distributed group, rank 0 the learner).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .config import MamlConfig, ModelConfig, ScalingConfig
from .learner import Learner
from .sampler import Sampler
from .stepping import OnStep, Steps
from .store import TaskStore
from .worker import ShardResult


class Executor(Protocol):
    num_shards: int

    def compute(
        self, weights: np.ndarray, version: int, shards: list[np.ndarray], before: bool = True
    ) -> list[ShardResult]: ...
    def curves(self, weights: np.ndarray, shards: list[np.ndarray], max_steps: int, lr: float) -> list[Any]: ...
    def run_steps(
        self,
        learner: Learner,
        sampler: Sampler,
        steps: Steps,
        on_step: OnStep,
    ) -> int: ...
    def watch(self, on_lost: Callable[[str], None]) -> None: ...
    def describe(self) -> str: ...
    def close(self) -> None: ...


def make(store: TaskStore, model: ModelConfig, maml: MamlConfig, scaling: ScalingConfig) -> Executor:
    """In-process for scaling.num_workers = 0, else Ray workers (driven, or a collective group). A store on disk is read where
    the work runs (by path, or its file's bytes in the object store); an in-memory one (held-out
    tasks) travels as its bytes."""
    if scaling.num_workers == 0:
        from .worker import InProcessExecutor

        return InProcessExecutor(store, model, maml, scaling.task_map, scaling.gpu_step)
    from .collective import CollectiveExecutor
    from .runtime import RayExecutor

    kind = CollectiveExecutor if scaling.mode == "collective" else RayExecutor
    return kind(store.buffer() if store.in_memory else Path(store.name), model, maml, scaling)
