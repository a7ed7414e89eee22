"""Shard computation without Ray: a task store, a model template and a device.

`ShardComputer.compute` is what the in-process loop calls directly and what every Ray actor
wraps; keeping it Ray-free keeps it testable and identical at every scale.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .config import MamlConfig, ModelConfig
from .learner import ShardResult
from .maml import TaskBatch, adaptation_curve, meta_gradient
from .models import ParamSpec, build, functional
from .store import COLUMNS, TaskStore

CURVE_CHUNK = 1000  # tasks per vmap call when evaluating: bounds memory, not results


class ShardComputer:
    def __init__(
        self,
        store: TaskStore,
        model_cfg: ModelConfig,
        maml_cfg: MamlConfig,
        device: str = "cpu",
        name: str = "in-process",
    ) -> None:
        self.store = store
        self.maml_cfg = maml_cfg
        self.device = torch.device(device)
        # The module is only a template for functional_call: its own parameters are never used.
        self.model = build(model_cfg, store.info, seed=0).to(self.device)
        self.spec = ParamSpec.of(self.model)
        self.forward = functional(self.model)
        self.name = name
        self.resident = _resident_columns(store, self.device)

    def batch(self, ids: np.ndarray) -> TaskBatch:
        """The shard's rows as tensors on the device. On a GPU that holds the whole store, a
        gather there; otherwise a gather from the memory-mapped store and one host-to-device copy."""
        if self.resident is not None:
            index = torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.device)
            return TaskBatch(*(col.index_select(0, index) for col in self.resident))
        return TaskBatch.from_numpy(self.store.rows(ids), self.device)

    def compute(self, weights: np.ndarray, ids: np.ndarray) -> ShardResult:
        """The summed meta-gradient of tasks `ids` at `weights` (flat float32)."""
        start = time.perf_counter()
        # A copy: arrays from Ray's object store are read-only, and the copy is tiny.
        flat = torch.tensor(np.asarray(weights), dtype=torch.float32, device=self.device)
        params = self.spec.unflatten(flat)
        batch = self.batch(ids)
        grads, metrics = meta_gradient(self.forward, self.store.info.kind, params, batch, self.maml_cfg)
        grad_sum = self.spec.flatten(grads).detach().to("cpu", torch.float32).numpy()
        return ShardResult(grad_sum, len(ids), metrics, time.perf_counter() - start, self.name)

    def curve(
        self, weights: np.ndarray, ids: np.ndarray, max_steps: int, lr: float
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-task query loss (and accuracy) after 0..max_steps inner steps of size lr, for
        tasks `ids` from `weights`: [len(ids), max_steps + 1] (vmap over chunks of CURVE_CHUNK)."""
        params = self.spec.unflatten(torch.tensor(np.asarray(weights), dtype=torch.float32, device=self.device))
        losses, accs = [], []
        for lo in range(0, len(ids), CURVE_CHUNK):
            loss, acc = adaptation_curve(
                self.forward, self.store.info.kind, params, self.batch(ids[lo : lo + CURVE_CHUNK]), max_steps, lr
            )
            losses.append(loss.cpu().numpy())
            accs.append(None if acc is None else acc.cpu().numpy())
        return np.concatenate(losses), (None if accs[0] is None else np.concatenate(accs))


def _resident_columns(store: TaskStore, device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """A GPU worker copies the store to the device once when it takes under a quarter of the
    free memory: per step it then moves only task ids, not rows (at meta-batch 65,536 of the
    seed family that is 118 MB a step otherwise, which would dominate the step)."""
    if device.type != "cuda":
        return None
    nbytes = sum(a.nbytes for c in COLUMNS[:4] for a in store.column_chunks(c))
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > free // 4:
        return None
    return tuple(torch.cat([torch.tensor(a, device=device) for a in store.column_chunks(c)]) for c in COLUMNS[:4])


class InProcessExecutor:
    """num_workers = 0: the shards are computed here, one after another, without Ray. This is
    the reference every distributed run is held against."""

    num_shards = 1

    def __init__(self, store: TaskStore, model_cfg: ModelConfig, maml_cfg: MamlConfig) -> None:
        self.computer = ShardComputer(store, model_cfg, maml_cfg)

    def compute(self, weights: np.ndarray, version: int, shards: list[np.ndarray]) -> list[ShardResult]:
        return [self.computer.compute(weights, ids) for ids in shards]

    def curves(
        self, weights: np.ndarray, shards: list[np.ndarray], max_steps: int, lr: float
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        return [self.computer.curve(weights, ids, max_steps, lr) for ids in shards]

    def describe(self) -> str:
        return f"in-process ({torch.get_num_threads()} torch threads)"

    def close(self) -> None:
        pass
