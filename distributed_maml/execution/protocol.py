"""The executor seam: what the training loop and evaluation ask of whoever computes shards.

An executor holds `num_shards` workers; `compute` returns every shard's summed meta-gradient
(a core.shards.ShardResult) in shard order, `curves` the adaptation curves of held-out tasks.
`run_steps` advances the learner by a run of steps (steps.Steps), reporting each step's outcome
(steps.StepOutcome) to `on_step`, and returns the last step done.

Implementations: inprocess.InProcessExecutor (num_workers = 0), driver.RayExecutor (scaling.mode
= "driver": the driver calls every worker every step) and collective.CollectiveExecutor
("collective": the workers run the steps as one torch.distributed group, rank 0 the learner).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from distributed_maml.core.learner import Learner
from distributed_maml.core.shards import ShardResult
from distributed_maml.data.sampler import Sampler
from distributed_maml.execution.steps import OnStep, Steps


class Executor(Protocol):
    num_shards: int
    learner_device: str  # where the training loop keeps the learner: "cpu" unless in-process on a GPU

    def compute(
        self, weights: np.ndarray, version: int, shards: list[np.ndarray], before: bool = True
    ) -> list[ShardResult]: ...
    def curves(self, weights: np.ndarray, shards: list[np.ndarray], steps: Sequence[int], lr: float) -> list[Any]: ...
    def run_steps(self, learner: Learner, sampler: Sampler, steps: Steps, on_step: OnStep) -> int: ...
    def watch(self, on_lost: Callable[[str], None]) -> None: ...
    def describe(self) -> str: ...
    def close(self) -> None: ...
