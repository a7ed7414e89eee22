"""Every wait on the cluster, bounded. The package calls `ray.get` and `ray.wait` only here
(tests/test_failover.py scans for raw calls elsewhere): a lost node, an actor Ray keeps
pending, a placement that will never fit or a rendezvous with nobody on the other side must end
in one line that says what was awaited and for how long, never in a hang.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError

from distributed_maml.errors import TrainingError


class ClusterTimeout(TrainingError):
    """Something awaited on the cluster did not come within its bound."""


def get(refs: Any, timeout_s: float, what: str) -> Any:
    """ray.get with a deadline. `what` names the wait for the one-line error ("the workers'
    descriptions"); a Ray error raised by the remote call passes through unchanged."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise ClusterTimeout(f"{what}: no answer within {timeout_s:g} s") from None


def done(refs: Sequence[Any], timeout_s: float) -> list[Any]:
    """The refs among `refs` that are ready, waiting at most `timeout_s` for the first one
    (0: just look). Never raises for a slow or lost remote: the caller decides what silence means."""
    if not refs:
        return []
    ready, _ = ray.wait(list(refs), num_returns=1, timeout=timeout_s)
    if ready:  # whatever else is ready too, without waiting again
        more, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        return list(dict.fromkeys([*ready, *more]))
    return []


def result(ref: Any) -> Any:
    """The value of a ref that `done` returned (ready: this cannot block); a remote error raises."""
    return ray.get(ref, timeout=0)
