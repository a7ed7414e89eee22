"""Watching the cluster while a run waits on it: how often a waiting step looks at its
workers (`POLL_S`), the ping that tells a slow worker from a lost one (`_Watch`), the local
raylet a run started (a stopped Ray ends the run with one line), and workers' peak memory.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from distributed_maml.execution import raywait

POLL_S = 1.0  # how often a step that is still waiting checks its workers' health


def _poll(deadline: float) -> float:
    """How long one wait may take before a deadline: at most POLL_S, never negative."""
    return max(0.0, min(POLL_S, deadline - time.monotonic()))


def _first_line(e: BaseException) -> str:
    """Ray's errors carry whole tracebacks; a one-line message takes the cause's first line."""
    text = str(getattr(e, "cause", None) or e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:200]


class _Watch:
    """Health checks of the workers a step waits on: one ping in flight per worker; a worker
    whose ping has gone unanswered for `timeout_s` is silent."""

    def __init__(self, workers: list[Any], timeout_s: float) -> None:
        self.workers, self.timeout_s = workers, timeout_s
        self.inflight: dict[int, tuple[Any, float]] = {}

    def silent(self, waited_on: set[int]) -> list[int]:
        now, out = time.monotonic(), []
        for w in waited_on:
            if w not in self.inflight:
                self.inflight[w] = (self.workers[w].ping.remote(), now)
                continue
            ref, sent = self.inflight[w]
            if raywait.done(
                [ref], 0
            ):  # it answered: alive (a dead actor's ping raises instead; then its call fails too)
                del self.inflight[w]
            elif now - sent > self.timeout_s:
                del self.inflight[w]
                out.append(w)
        return out


def _peak_rss_mib() -> float | None:
    """This process's peak resident memory (VmHWM), where /proc has it."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _own_raylet() -> Any:
    """The raylet process of the local Ray this process started (a Popen), or None. Ray keeps
    it on its private Node object; if that ever moves, watching is skipped, nothing breaks."""
    try:
        node = ray._private.worker.global_worker.node
        return node.all_processes["raylet"][0].process
    except (AttributeError, KeyError, IndexError, TypeError):
        return None
