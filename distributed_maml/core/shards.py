"""What crosses from a worker to the learner: one shard's summed meta-gradient (`ShardResult`)
and the fan-in that turns a step's shards into one mean (`reduce_shards`). Workers build the
first, the learner and the collective loop apply the second; both import only this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor


@dataclass
class ShardResult:
    """What a worker returns for one shard: the SUM of its tasks' meta-gradients (flat float32
    numpy, which Ray hands over without a copy), how many tasks it held, and metric sums."""

    grad_sum: np.ndarray
    count: int
    metrics: dict[str, float]
    compute_s: float = 0.0
    worker: str = "in-process"


@dataclass
class Reduced:
    grad: np.ndarray
    count: int
    metrics: dict[str, float] = field(default_factory=dict)  # means over tasks


def reduce_shards(results: Sequence[ShardResult]) -> Reduced:
    """The fan-in: the task-weighted mean of the shards' gradients and metrics, summed in shard
    order (never arrival order) so that the result does not depend on timing."""
    count = sum(r.count for r in results)
    total = np.zeros_like(results[0].grad_sum)
    sums: dict[str, float] = {}
    for r in results:
        total += r.grad_sum
        for k, v in r.metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    return Reduced(total / np.float32(count), count, _means(sums, count))


def _means(sums: dict[str, float], count: int) -> dict[str, float]:
    """Metric sums as means over the step's tasks; a group's (`loss_after@g`: a source's) over
    that group's tasks (`tasks@g`, reported as its share of the step)."""
    out = {}
    for k, v in sums.items():
        metric, at, group = k.partition("@")
        if not at:
            out[k] = v / count
        elif metric == "tasks":
            out[k] = v / count
        elif sums.get(f"tasks@{group}"):
            out[k] = v / sums[f"tasks@{group}"]
    return out


def by_group(groups: Sequence[str], losses: Tensor, accs: Tensor | None) -> dict[str, float]:
    """Per-task losses (and accuracies) summed by group: loss_after@g, acc_after@g, tasks@g."""
    values = losses.detach().cpu().tolist()
    hits = accs.detach().cpu().tolist() if accs is not None else None
    out: dict[str, float] = {}
    for i, g in enumerate(groups):
        out[f"tasks@{g}"] = out.get(f"tasks@{g}", 0.0) + 1.0
        out[f"loss_after@{g}"] = out.get(f"loss_after@{g}", 0.0) + values[i]
        if hits is not None:
            out[f"acc_after@{g}"] = out.get(f"acc_after@{g}", 0.0) + hits[i]
    return out
