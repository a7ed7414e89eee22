"""Task families: deterministic generators of few-shot tasks as numpy arrays.

A family turns (rng, count, shots, queries) into a dict of arrays with a leading task axis:
``x_support [T, S, D]``, ``y_support [T, S]`` (int64 labels) or ``[T, S, O]`` (float32
targets), the same for the query set, and ``params [T, P]``: the numbers that define each
task (for plots and checks, never shown to the model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import seed as _seed
from . import sinusoid as _sinusoid

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Family:
    """What a store needs to know about a family: shapes, kind and its generator."""

    name: str
    kind: str  # "classification" or "regression"
    input_dim: int
    output_dim: int  # classes for classification, targets for regression
    ways: int  # classes per task (1 for regression: points are not grouped by class)
    generate: Callable[[np.random.Generator, int, int, int], Arrays]


FAMILIES: dict[str, Family] = {
    "seed": Family("seed", "classification", _seed.INPUT_DIM, _seed.WAYS, _seed.WAYS, _seed.generate),
    "sinusoid": Family("sinusoid", "regression", 1, 1, 1, _sinusoid.generate),
}
