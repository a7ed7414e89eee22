"""Meta-Dataset's episode sampler (Triantafillou et al. 2020, section 3.2 and its `sampling.py`):
`task.sampler = "meta-dataset"`. Unlike the uniform draw (data/episodes.py `draw_shape`), an
episode's shape depends on the classes it picks, so the classes come first. Given the task's
own generator, in this order (docs/episodes.md writes it out with the paper's constants):

1. the source (several sources: `choice` by weight), then the ways
   w ~ U{lo, min(hi, C)} (C: that source's classes; the paper's lo = 5, hi = 50);
2. w distinct classes (`choice` without replacement among the source's), with n_c examples each;
3. the queries per class q = min(Q, floor(min_c n_c / 2)) (Q = task.queries, the paper's 10);
4. the support budget S = min(M, sum_c floor(beta * min(K, n_c - q) + 1)), beta ~ U[0, 1)
   (K = task.shots, the paper's 100 per class; M = task.max_support, the paper's 500; 0: none);
5. the shots s_c = min(floor(R_c * (S - w)) + 1, n_c - q), R_c = n_c e^{a_c} / sum_k n_k e^{a_k},
   a_c ~ U[log 1/2, log 2): a class's share follows its size, perturbed; each keeps one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_LOG_WEIGHT, MAX_LOG_WEIGHT = float(np.log(0.5)), float(np.log(2.0))


@dataclass(frozen=True)
class Pool:
    """What the sampler picks from: examples per class (`counts`, int64 [C]) and the sources'
    class ranges (source i: classes first[i]..first[i + 1] - 1) and normalised weights."""

    counts: np.ndarray
    first: np.ndarray
    weights: np.ndarray | None = None

    def source(self, rng: np.random.Generator) -> int:
        return 0 if self.weights is None else int(rng.choice(len(self.weights), p=self.weights))


@dataclass(frozen=True)
class Drawn:
    """One episode's plan: its classes (store indices), shots per class, queries per class, the
    source, and the support budget S (the shots sum to at most S: each class's share is floored)."""

    classes: np.ndarray
    shots: np.ndarray
    queries: int
    source: int
    budget: int


def draw(
    rng: np.random.Generator, ways: tuple[int, int], most_shots: int, most_queries: int, budget: int, pool: Pool
) -> Drawn:
    """Steps 1-5 above, from `rng` (the task's generator, nothing drawn from it before)."""
    src = pool.source(rng)
    first, n = int(pool.first[src]), int(pool.first[src + 1] - pool.first[src])
    w = int(rng.integers(ways[0], min(ways[1], n) + 1))
    classes = first + rng.choice(n, w, replace=False)
    have = pool.counts[classes]
    queries = min(most_queries, int(have.min()) // 2)
    left = have - queries
    beta = rng.random()
    size = int(np.floor(beta * np.minimum(most_shots, left) + 1).sum())
    if budget:
        size = min(size, budget)
    share = have * np.exp(rng.uniform(MIN_LOG_WEIGHT, MAX_LOG_WEIGHT, size=w))
    shots = np.minimum(np.floor(share / share.sum() * (size - w)).astype(np.int64) + 1, left)
    return Drawn(classes.astype(np.int64), shots.astype(np.int64), queries, src, size)
