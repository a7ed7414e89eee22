"""Which tasks a meta-step sees: a pure function of (seed, store size, meta-batch, step).

Epoch e is a permutation of the store drawn from (seed, e); step s takes positions
[s * meta_batch, (s + 1) * meta_batch) of the concatenated epochs. Nothing is stateful, so a
resumed run, or any worker, recomputes exactly the same ids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_tasks: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_tasks)
    perm.flags.writeable = False
    return perm


@dataclass(frozen=True)
class Sampler:
    seed: int
    num_tasks: int
    meta_batch: int

    def ids(self, step: int) -> np.ndarray:
        """The task ids of meta-step `step` (0-based)."""
        start = step * self.meta_batch
        first_epoch, first_offset = divmod(start, self.num_tasks)
        if first_offset + self.meta_batch <= self.num_tasks:  # within one epoch: one slice (most steps)
            return _permutation(self.seed, first_epoch, self.num_tasks)[
                first_offset : first_offset + self.meta_batch
            ].copy()
        pos = start + np.arange(self.meta_batch, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.num_tasks)
        out = np.empty(self.meta_batch, dtype=np.int64)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = _permutation(self.seed, int(e), self.num_tasks)[offsets[mask]]
        return out

    def state(self) -> dict[str, int]:
        return asdict(self)


def split_shards(ids: np.ndarray, num_shards: int) -> list[np.ndarray]:
    """The fan-out: contiguous, nearly equal shards (sizes differ by at most one), never empty."""
    if num_shards <= 1:
        return [ids]
    return list(np.array_split(ids, min(num_shards, len(ids))))
