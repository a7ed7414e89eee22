"""scaling.num_workers = 0: the shards computed here, one after another, without Ray (the
reference every distributed run is held against)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from distributed_maml.core.shards import ShardResult
from distributed_maml.execution.computer import ShardComputer
from distributed_maml.execution.stepping import Driven


class InProcessExecutor(Driven):
    """num_workers = 0: the shards are computed here, one after another, without Ray. This is
    the reference every distributed run is held against."""

    num_shards = 1

    def __init__(self, computer: ShardComputer) -> None:
        self.computer = computer

    def compute(
        self, weights: np.ndarray, version: int, shards: list[np.ndarray], before: bool = True
    ) -> list[ShardResult]:
        return [self.computer.compute(weights, ids, before, version) for ids in shards]

    def curves(
        self, weights: np.ndarray, shards: list[np.ndarray], steps: Sequence[int], lr: float
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        return [self.computer.curve(weights, ids, steps, lr) for ids in shards]

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Nothing to watch: in-process work has no cluster to lose."""

    def describe(self) -> str:
        c = self.computer
        return f"in-process ({torch.get_num_threads()} torch threads, tasks by {c.task_map}, {c.step_kind})"

    def close(self) -> None:
        pass
