"""The seed's problem: 2-way classification of 10 features, with structure to meta-learn.

The original script drew unrelated random tasks, so there was nothing for meta-learning to
find. Here every task is a linear boundary whose normal lies (up to a little noise) in one
2-D subspace of R^10 that is shared by all tasks, at an angle drawn uniformly round the circle:

    w = cos(theta) u1 + sin(theta) u2 + 0.3 * n / sqrt(10),   theta ~ U[0, 2 pi), n ~ N(0, I)
    b ~ U[-0.5, 0.5],   label = 1 if x . w + b > 0 else 0,   x ~ N(0, I)

u1, u2 are fixed for the family (not per store), so training and held-out stores share them.
The angle is uniform, so an unadapted network can do no better than chance on average; a few
examples of a task pin down theta only for a learner that knows where to look (the subspace).
A MAML initialisation can learn that subspace; a random initialisation adapting in all 10
dimensions from a handful of examples cannot. Each task has `shots` support and `queries`
query examples per class: points drawn on the wrong side are reflected across the boundary.
"""

from __future__ import annotations

import numpy as np

INPUT_DIM = 10
WAYS = 2
NOISE = 0.3
BIAS = 0.5


def _prior_basis() -> np.ndarray:
    """The two orthonormal directions (rows) every task's boundary normal is drawn around."""
    q, _ = np.linalg.qr(np.random.default_rng(20170309).normal(size=(INPUT_DIM, 2)))
    return q.T


PRIOR = _prior_basis()


def _sample_side(rng: np.random.Generator, w: np.ndarray, b: np.ndarray, n: int, label: int) -> np.ndarray:
    """n points per task on the side of the boundary that carries `label` ([T, n, D])."""
    x = rng.normal(size=(w.shape[0], n, INPUT_DIM))
    margin = np.einsum("tnd,td->tn", x, w) + b[:, None]
    wrong = (margin > 0) != bool(label)
    # Reflect across the boundary: x - 2 m w / |w|^2 has margin -m, the same distance away.
    x = x - np.where(wrong, 2 * margin, 0.0)[..., None] * (w / (w**2).sum(1, keepdims=True))[:, None, :]
    return x


def generate(rng: np.random.Generator, count: int, shots: int, queries: int) -> dict[str, np.ndarray]:
    theta = rng.uniform(0.0, 2 * np.pi, size=count)
    w = np.cos(theta)[:, None] * PRIOR[0] + np.sin(theta)[:, None] * PRIOR[1]
    w = w + NOISE * rng.normal(size=(count, INPUT_DIM)) / np.sqrt(INPUT_DIM)
    b = rng.uniform(-BIAS, BIAS, size=count)
    parts = {}
    for split, n in (("support", shots), ("query", queries)):
        xs = [_sample_side(rng, w, b, n, label) for label in range(WAYS)]
        parts[f"x_{split}"] = np.concatenate(xs, axis=1).astype(np.float32)
        labels = np.repeat(np.arange(WAYS, dtype=np.int64), n)
        parts[f"y_{split}"] = np.broadcast_to(labels, (count, WAYS * n)).copy()
    parts["params"] = np.concatenate([w, b[:, None]], axis=1).astype(np.float32)
    return parts
