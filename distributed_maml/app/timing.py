"""What every `bench` table shares: the problems it times and how it times a call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

MODELS = {"sinusoid_mlp": ("sinusoid", 10, 10, 0.01), "seed_mlp": ("seed", 5, 15, 0.5)}  # family, K, Q, alpha


def time_call(fn: Callable[[], Any], min_seconds: float, reps: int = 5) -> float:
    """Median seconds per call over `reps` timed rounds of at least min_seconds / reps each."""
    fn()  # warm-up
    rounds = []
    for _ in range(reps):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / reps:
                break
        rounds.append(elapsed / n)
    return statistics.median(rounds)
