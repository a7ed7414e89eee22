"""What every `bench` table shares: the problems it times and how it times a call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from distributed_maml.config import ModelConfig
from distributed_maml.core.maml import TaskBatch
from distributed_maml.core.models import build, functional
from distributed_maml.data.writing import build_in_memory

MODELS = {"sinusoid_mlp": ("sinusoid", 10, 10, 0.01), "seed_mlp": ("seed", 5, 15, 0.5)}  # family, K, Q, alpha


def time_call(fn: Callable[[], Any], min_seconds: float, reps: int = 5) -> float:
    """Median seconds per call over `reps` timed rounds of at least min_seconds / reps each
    (two rounds of one call when one call alone outlasts min_seconds: the per-task loop at
    meta-batch 1000 would otherwise take six times the budget)."""
    start = time.perf_counter()
    fn()  # warm-up
    if time.perf_counter() - start >= min_seconds:
        reps = min(reps, 2)
    return statistics.median(_per_call(fn, min_seconds / reps) for _ in range(reps))


def _per_call(fn: Callable[[], Any], seconds: float) -> float:
    """Seconds per call of fn, called until at least `seconds` have passed (once at least)."""
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / n


def resnet12_widths(channels: int) -> list[int]:
    """ResNet-12's four widths scaled from the first (64 -> MetaOptNet's 64-160-320-640)."""
    return [channels, round(2.5 * channels), 5 * channels, 10 * channels]


def conv4_problem(meta_batch: int, channels: int, queries: int, device: str = "cpu", backbone: str = "conv4") -> tuple:
    """conv4 (`channels` filters) or resnet12 (widths from `channels`) on `meta_batch` 5-way
    1-shot glyph tasks: (forward, params, batch)."""
    store = build_in_memory("glyphs", meta_batch, seed=0, shots=1, queries=queries, split="train")
    cfg = (
        ModelConfig(name="resnet12", kwargs={"widths": resnet12_widths(channels)})
        if backbone == "resnet12"
        else ModelConfig(name="conv4", channels=channels)
    )
    model = build(cfg, store.info, seed=0).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = TaskBatch.from_numpy(store.rows(np.arange(meta_batch)), device)
    return functional(model), params, batch


def time_interleaved(fns: dict[str, Callable[[], Any]], min_seconds: float, rounds: int = 7) -> dict[str, float]:
    """Seconds per call of each fn, best of `rounds` rounds that take turns (each round at least
    min_seconds / rounds per fn): a ratio between them then does not depend on what else the
    machine did meanwhile, and the best round is the one least disturbed."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], _per_call(fn, min_seconds / rounds))
    return best
