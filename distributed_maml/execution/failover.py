"""The assignment and failover policy: who computes which shard of a step, by the workers'
measured speed, and after a worker failed, went silent or came back. Ray-free and small, so
every decision is in one place and testable without a cluster.

The shards of a step are fixed by the sampler and summed in shard order, so which worker
computes a shard never changes the weights. Until every healthy worker's speed is measured,
shard i belongs to worker i % size while it is healthy and a retired worker's shards go to the
healthy ones (round robin by shard index). Once they are (`observe`: an exponential average of
each worker's tasks per second of compute), a step's shards are handed out in proportion to
speed, every healthy worker at least one: a worker at half speed gets half the shards, and a
step no longer waits a slow worker's whole share (scaling.shards_per_worker > 1 gives the room).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from distributed_maml.errors import TrainingError

SPEED_DECAY = 0.5  # weight of a worker's past speed against its last step's (a noisy neighbour comes and goes)


def proportional(n: int, speeds: list[float]) -> list[int]:
    """`n` shards split in proportion to `speeds`, each worker at least one while n allows
    (its speed stays measured), the rest by largest remainder (ties: the lower index)."""
    total = sum(speeds)
    target = [n * s / total for s in speeds]
    floor = 1 if n >= len(speeds) else 0
    counts = [max(floor, int(t)) for t in target]
    while sum(counts) > n:  # the floor of 1 took more than there is: from the most over target
        i = max((i for i in range(len(counts)) if counts[i] > floor), key=lambda i: (counts[i] - target[i], -i))
        counts[i] -= 1
    while sum(counts) < n:  # the rest to the most under target
        i = max(range(len(counts)), key=lambda i: (target[i] - counts[i], -i))
        counts[i] += 1
    return counts


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
    speeds: dict[int, float] = field(default_factory=dict)  # tasks/s of compute, exponential average

    def __post_init__(self) -> None:
        self.failures = self.failures or [0] * self.size

    def healthy(self) -> list[int]:
        return [w for w in range(self.size) if w not in self.retired]

    def observe(self, w: int, tasks: int, seconds: float) -> None:
        """Worker w computed `tasks` tasks in `seconds` of compute (its own clock, not Ray's)."""
        if tasks > 0 and seconds > 0:
            rate = tasks / seconds
            self.speeds[w] = rate if w not in self.speeds else SPEED_DECAY * self.speeds[w] + (1 - SPEED_DECAY) * rate

    def owner(self, shard: int) -> int:
        """Who computes `shard` by the round-robin rule: its own worker while healthy, else a healthy one."""
        healthy = self.healthy()
        if not healthy:
            raise self.none_left(shard % self.size, shard, "was retired")
        return shard % self.size if (shard % self.size) not in self.retired else healthy[shard % len(healthy)]

    def owners(self, shards: int) -> list[int]:
        """The owner of each of a step's `shards`: by speed once every healthy worker has one
        (contiguous runs of shards, in worker order), else the round-robin rule."""
        healthy = self.healthy()
        if not healthy:
            raise self.none_left(0, 0, "was retired")
        if not all(w in self.speeds for w in healthy):
            return [self.owner(i) for i in range(shards)]
        counts = proportional(shards, [self.speeds[w] for w in healthy])
        return [w for w, c in zip(healthy, counts, strict=True) for _ in range(c)]

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
