"""The MAML paper's sinusoid regression (Finn et al. 2017, section 5.1).

Each task is y = A sin(x - phi) with amplitude A ~ U[0.1, 5.0], phase phi ~ U[0, pi] and
inputs x ~ U[-5, 5]; the loss is the mean squared error.
"""

from __future__ import annotations

import numpy as np

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, np.pi)
X_RANGE = (-5.0, 5.0)


def function(x: np.ndarray, amplitude: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """The task's true function; amplitude and phase broadcast against x."""
    return amplitude * np.sin(x - phase)


def generate(rng: np.random.Generator, count: int, shots: int, queries: int) -> dict[str, np.ndarray]:
    amplitude = rng.uniform(*AMPLITUDE, size=(count, 1, 1))
    phase = rng.uniform(*PHASE, size=(count, 1, 1))
    x = rng.uniform(*X_RANGE, size=(count, shots + queries, 1))
    y = function(x, amplitude, phase)
    x, y = x.astype(np.float32), y.astype(np.float32)
    return {
        "x_support": x[:, :shots],
        "y_support": y[:, :shots],
        "x_query": x[:, shots:],
        "y_query": y[:, shots:],
        "params": np.concatenate([amplitude[:, 0], phase[:, 0]], axis=1).astype(np.float32),
    }
