"""Which tasks a meta-step sees: a pure function of (seed, number of task ids, meta-batch, step).

Step s takes positions [s * meta_batch, (s + 1) * meta_batch) of the concatenated epochs; epoch
e visits every task id once, in an order drawn from (seed, e):

- "epochs" (a materialized store): a permutation of its rows, numpy's, drawn from [seed, e];
- "keyed" (an on-the-fly store, up to 2**63 - 1 ids): a keyed bijection of [0, n), a 6-round
  Feistel network over the ids' bits (round keys from [seed, e]) with cycle-walking into [0, n).
  Nothing is materialized: any position's id costs the same at n = 10^3 or 10^18, and within an
  epoch no id repeats (at 10^9 ids a run of 10^9 tasks never sees one twice).

An on-the-fly store with variable episodes then orders each step's ids by episode shape
(episodes.Shapes.sort), so contiguous shards hold episodes of similar shape and pad little.
Nothing is stateful, so a resumed run, or any worker, recomputes exactly the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from distributed_maml.data.episodes import Shapes

Order = Literal["epochs", "keyed"]
ROUNDS = 6


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_tasks: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_tasks)
    perm.flags.writeable = False
    return perm


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64, wrapping): the Feistel round function."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_permutation(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """The ids at `positions` (each in [0, n)) of epoch `epoch`'s keyed bijection of [0, n)."""
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = np.random.SeedSequence([seed, epoch, 0xFE15]).generate_state(ROUNDS, np.uint64)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << half) | right

    with np.errstate(over="ignore"):
        x = np.asarray(positions, dtype=np.uint64)
        out = feistel(x)
        walk = out >= np.uint64(n)
        while walk.any():  # cycle-walking: a bijection of [0, 2**bits) restricted to [0, n)
            out[walk] = feistel(out[walk])
            walk = out >= np.uint64(n)
    return out.astype(np.int64)


@dataclass(frozen=True)
class Sampler:
    seed: int
    num_tasks: int
    meta_batch: int
    order: Order = "epochs"
    shapes: Shapes | None = field(default=None, compare=False, repr=False)
    """Variable episodes: the step's ids are sorted by shape (not part of the state: the store's)."""

    @classmethod
    def of(cls, store: Any, seed: int, meta_batch: int) -> Sampler:
        """The sampler of a task store: keyed over an on-the-fly store's ids (sorted by shape when
        its episodes vary), a permutation per epoch over a materialized one's rows."""
        info = store.info
        if not info.on_the_fly:
            return cls(seed, len(store), meta_batch)
        shapes = None if info.spec.fixed else store.drawer.shapes
        return cls(seed, len(store), meta_batch, "keyed", shapes)

    def ids(self, step: int) -> np.ndarray:
        """The task ids of meta-step `step` (0-based)."""
        ids = self._drawn(step)
        return ids if self.shapes is None else self.shapes.sort(ids)

    def _drawn(self, step: int) -> np.ndarray:
        start = step * self.meta_batch
        first_epoch, first_offset = divmod(start, self.num_tasks)
        if self.order == "keyed" and first_offset + self.meta_batch <= self.num_tasks:
            positions = np.arange(first_offset, first_offset + self.meta_batch, dtype=np.uint64)
            return keyed_permutation(positions, self.num_tasks, self.seed, first_epoch)
        if first_offset + self.meta_batch <= self.num_tasks:  # within one epoch: one slice (most steps)
            return _permutation(self.seed, first_epoch, self.num_tasks)[
                first_offset : first_offset + self.meta_batch
            ].copy()
        # a step that straddles epochs: each position from its own epoch's order (Python ints:
        # near 2**63 ids the positions pass int64)
        epochs, offsets = zip(*(divmod(start + j, self.num_tasks) for j in range(self.meta_batch)), strict=True)
        epoch_of, offset_of = np.array(epochs, dtype=object), np.array(offsets, dtype=np.uint64)
        out = np.empty(self.meta_batch, dtype=np.int64)
        for e in sorted(set(epochs)):
            mask = epoch_of == e
            if self.order == "keyed":
                out[mask] = keyed_permutation(offset_of[mask], self.num_tasks, self.seed, e)
            else:
                out[mask] = _permutation(self.seed, e, self.num_tasks)[offset_of[mask].astype(np.int64)]
        return out

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seed": self.seed, "num_tasks": self.num_tasks, "meta_batch": self.meta_batch}
        if self.order != "epochs":  # a materialized store's checkpoints stay as they were
            out["order"] = self.order
        return out


def split_shards(ids: np.ndarray, num_shards: int) -> list[np.ndarray]:
    """The fan-out: contiguous, nearly equal shards (sizes differ by at most one), never empty."""
    if num_shards <= 1:
        return [ids]
    return list(np.array_split(ids, min(num_shards, len(ids))))
