"""The failover policy: who computes a shard after its worker failed, went silent or came back.
Ray-free and small, so every decision is in one place and testable without a cluster.

The shards of a step are fixed by the sampler and summed in shard order, so which worker
computes a shard never changes the weights: shard i belongs to worker i while it is healthy;
a retired worker's shards go to the healthy ones (round robin by shard index); a worker that
comes back takes its own shards again at the next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from distributed_maml.errors import TrainingError


class Action(Enum):
    RETRY = "retry"  # the same worker again (Ray restarted it)
    MOVE = "move"  # the shard goes to another worker; the failed one is retired


@dataclass(frozen=True)
class Decision:
    action: Action
    worker: int  # who computes the shard now


@dataclass
class Failover:
    """Failure counts and the set of retired workers of a pool of `size` workers."""

    size: int
    max_failures: int
    timeout_s: float
    failures: list[int] = field(default_factory=list)
    retired: set[int] = field(default_factory=set)
    broken: set[int] = field(default_factory=set)  # retired for failing, not for being lost: they stay out

    def __post_init__(self) -> None:
        self.failures = self.failures or [0] * self.size

    def healthy(self) -> list[int]:
        return [w for w in range(self.size) if w not in self.retired]

    def owner(self, shard: int) -> int:
        """Who computes `shard` now: its own worker while healthy, else a healthy one."""
        healthy = self.healthy()
        if not healthy:
            raise self.none_left(shard % self.size, shard, "was retired")
        return shard % self.size if (shard % self.size) not in self.retired else healthy[shard % len(healthy)]

    def owners(self, shards: int) -> list[int]:
        return [self.owner(i) for i in range(shards)]

    def failed(self, w: int, shard: int, restarted: bool) -> Decision:
        """Worker w's call for `shard` failed (its actor died). `restarted`: Ray brought it back
        within timeout_s. Retry on it while it has failures left, else retire it and move."""
        self.failures[w] += 1
        if self.failures[w] < self.max_failures and restarted:
            return Decision(Action.RETRY, w)
        self.broken.add(w)
        return self._move(w, shard, "failed")

    def silent(self, w: int, shard: int) -> Decision:
        """Worker w did not answer a health check for timeout_s (a lost node, or an actor Ray
        holds pending): retired at once, its shard moved."""
        return self._move(w, shard, "went silent")

    def retire(self, w: int) -> None:
        self.failures[w] = max(self.failures[w], self.max_failures)
        self.retired.add(w)

    def may_return(self) -> list[int]:
        """Retired workers that were lost (silent, their node gone), not broken: their slots may
        be placed again (elastic). A worker that failed max_failures times would fail again."""
        return sorted(self.retired - self.broken)

    def back(self, w: int) -> None:
        """A retired worker's slot answers again (its node returned, or room appeared)."""
        self.retired.discard(w)
        self.failures[w] = 0

    def _move(self, w: int, shard: int, what: str) -> Decision:
        self.retire(w)
        if not self.healthy():
            raise self.none_left(w, shard, what)
        return Decision(Action.MOVE, self.owner(shard))

    def none_left(self, w: int, shard: int, what: str) -> TrainingError:
        return TrainingError(
            f"no healthy worker left (last: worker-{w} {what} on shard {shard}; each may fail "
            f"{self.max_failures} times or be silent {self.timeout_s:g} s); "
            "see the Ray logs for why, then continue with --resume"
        )
