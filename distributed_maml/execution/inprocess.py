"""scaling.num_workers = 0: the shards computed here, one after another, without Ray (the
reference every distributed run is held against)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from distributed_maml.core.learner import Learner
from distributed_maml.core.shards import ShardResult
from distributed_maml.data.sampler import Sampler
from distributed_maml.execution.computer import ShardComputer
from distributed_maml.execution.devicesteps import DeviceSteps, why_not_fused
from distributed_maml.execution.stepping import drive
from distributed_maml.execution.steps import OnStep, Steps


class InProcessExecutor:
    """num_workers = 0: the shards are computed here, one after another, without Ray. This is
    the reference every distributed run is held against. On a GPU the learner lives on the
    device too and the unlogged steps are fused (execution/devicesteps.py); on a CPU the
    driver loop runs every step."""

    learner_device: str

    def __init__(self, computer: ShardComputer, fused: bool | None = None, num_shards: int = 1) -> None:
        """`fused`: take fused steps when the learner is on this device (default: on CUDA, as CUDA
        graphs when scaling.gpu_step = "graph"); True on a CPU runs the same fused step eagerly
        (how its arithmetic is tested against the driver loop)."""
        self.computer = computer
        self.num_shards = num_shards  # scaling.shards_per_worker: the shards of an N-shard Ray run, one after another
        self.learner_device = str(computer.device)  # where the training loop keeps the learner
        on_cuda = computer.device.type == "cuda"
        self.device_steps = (
            DeviceSteps(computer, capture=on_cuda and computer.gpu_step == "graph")
            if (on_cuda if fused is None else fused)
            else None
        )

    def run_steps(self, learner: Learner, sampler: Sampler, steps: Steps, on_step: OnStep) -> int:
        fused = self.device_steps is not None and learner.device == self.computer.device and self.num_shards == 1
        if fused and why_not_fused(self.computer) is None:
            return self.device_steps.run_steps(self, learner, sampler, steps, on_step)  # type: ignore[union-attr]
        return drive(self, learner, sampler, steps, on_step)

    def compute(
        self, weights: np.ndarray | torch.Tensor, version: int, shards: list[np.ndarray], before: bool = True
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
        steps = c.step_kind
        if self.device_steps is not None:
            why = why_not_fused(c)
            steps = self.device_steps.describe() if why is None else f"{steps}, learner on {c.device} ({why})"
        return f"in-process on {c.where} ({torch.get_num_threads()} torch threads, tasks by {c.task_map}, {steps})"

    def close(self) -> None:
        pass
