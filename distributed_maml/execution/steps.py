"""What an executor is asked to run and what it reports: a run of meta-steps (`Steps`) and
each step's outcome (`StepOutcome`), passed to the training loop's `OnStep` callback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from distributed_maml.core.shards import ShardResult


@dataclass(frozen=True)
class StepOutcome:
    """What one meta-step reports: its tasks, metric means, and whether Adam applied it (a
    non-finite step is not applied: it stops the run, or is skipped by on_nonfinite = "skip")."""

    step: int
    count: int
    metrics: dict[str, float]
    finite: bool
    wall_s: float
    timing: dict[str, Any]


OnStep = Callable[[StepOutcome], None]


@dataclass(frozen=True)
class Steps:
    """A run of meta-steps first..last (1-based, inclusive) for an executor: whether the last
    one is logged (it then also reports the unadapted metrics), and whether a non-finite step
    ends the run (on_nonfinite = "stop") or is skipped."""

    first: int
    last: int
    log_last: bool
    stop_on_nonfinite: bool

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first, self.last + 1))

    def before(self, step: int) -> bool:
        """Whether `step` computes the unadapted metrics too (only a logged last step does)."""
        return self.log_last and step == self.last


def timing(results: list[ShardResult], wall_s: float, update_s: float) -> dict[str, Any]:
    """Where a step's time went: mean worker compute, how long the fastest worker idled for the
    slowest (stragglers), what Ray's calls and transfers added, and the learner's update."""
    per: dict[str, list[float]] = {}  # worker -> [shards, tasks, compute seconds]: a worker may hold several shards
    for r in results:
        acc = per.setdefault(r.worker, [0, 0, 0.0])
        acc[0], acc[1], acc[2] = acc[0] + 1, acc[1] + r.count, acc[2] + r.compute_s
    return timing_of(per, wall_s, update_s)


def timing_of(per: dict[str, list[float]], wall_s: float, update_s: float) -> dict[str, Any]:
    """`timing` from each worker's [shards, tasks, compute seconds] of the step."""
    busy = {w: v[2] for w, v in per.items()}
    return {
        "compute_s": float(np.mean(list(busy.values()))),
        "straggler_s": max(busy.values()) - min(busy.values()),
        "overhead_s": max(0.0, wall_s - max(busy.values())),
        "update_s": update_s,
        "slowest_worker": max(busy, key=lambda w: busy[w]),
        "shares": {w: int(v[0]) for w, v in per.items()},  # shards each worker computed this step
        "worker_tasks": {w: int(v[1]) for w, v in per.items()},
        "worker_compute_s": busy,
    }
