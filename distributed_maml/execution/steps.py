"""What an executor is asked to run and what it reports: a run of meta-steps (`Steps`) and
each step's outcome (`StepOutcome`), passed to the training loop's `OnStep` callback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


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
