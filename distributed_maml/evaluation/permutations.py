"""`eval --permutations K`: the spread of a meta-model's accuracy over K random label assignments
of the same held-out tasks (Ye & Chao, ICLR 2022: a fixed head's rows are tied to class indices,
so renaming a task's classes changes its answer; a unicorn or proto head's does not).

Assignment j gives each task its own permutation of its classes, drawn from (j, the task's id):
the support and query labels are both mapped through it, so every assignment is the same task.
Scored in-process on the driver after the run's own evaluation, at the largest inner-step count.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distributed_maml.config import Config
from distributed_maml.core.adaptation import adaptation_curve
from distributed_maml.core.inner import TaskBatch
from distributed_maml.data import TaskStore
from distributed_maml.execution.computer import CURVE_CHUNK, ShardComputer

MAX_PERMUTATIONS = 1000


def relabelled(rows: dict[str, np.ndarray], ids: np.ndarray, ways: int, assignment: int) -> dict[str, np.ndarray]:
    """`rows` with each task's labels mapped through its own permutation of its classes (padded
    labels [T, N, 2] keep their ways column; a task's ways is that column's value, else `ways`)."""
    out = dict(rows)
    for key in ("y_support", "y_query"):
        out[key] = rows[key].copy()
    padded = rows["y_support"].ndim == 3
    for t, task_id in enumerate(ids):
        w = int(rows["y_support"][t, :, 1].max()) if padded else ways
        perm = np.random.default_rng([assignment, int(task_id)]).permutation(w)
        for key in ("y_support", "y_query"):
            labels = out[key][t, :, 0] if padded else out[key][t]
            real = (out[key][t, :, 1] > 0) if padded else np.ones(len(labels), dtype=bool)
            labels[real] = perm[labels[real]]
    return out


def accuracy_spread(
    cfg: Config, store: TaskStore, params: dict[str, torch.Tensor], n: int, steps: int, lr: float, k: int
) -> dict[str, Any]:
    """Mean accuracy of the first `n` tasks after `steps` inner steps under each of `k` label
    assignments (assignment 0: the tasks as stored), and their spread."""
    computer = ShardComputer(store, cfg.model, cfg.maml)
    ids = np.arange(n)
    means = []
    for j in range(k):
        accs = []
        for lo in range(0, n, CURVE_CHUNK):
            chunk = ids[lo : lo + CURVE_CHUNK]
            rows = store.rows(chunk)
            batch = TaskBatch.from_numpy(rows if j == 0 else relabelled(rows, chunk, store.info.ways, j))
            _, acc = adaptation_curve(
                computer.forward, "classification", params, batch, (steps,), lr,
                computer.task_map, computer.head, computer.proximal,
            )  # fmt: skip
            accs.append(acc[:, 0].numpy())
        means.append(float(np.concatenate(accs).mean()))
    return {
        "assignments": k,
        "steps": steps,
        "accuracy": means,
        "mean": float(np.mean(means)),
        "std": float(np.std(means, ddof=1)) if k > 1 else 0.0,
        "spread": float(max(means) - min(means)),
    }
