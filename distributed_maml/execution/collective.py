"""scaling.mode = "collective": the Ray workers form one torch.distributed group and run the step
loop themselves (stepping.collective_chunk), rank 0 the central learner.

The driver hands rank 0 the learner's state at a chunk's start and takes it back at its end, so a
checkpoint, a held-out score or a stop sees the same state as in driver mode. A rank that dies or
goes silent ends the chunk for all: every member is restarted, those that do not come back within
worker_timeout_s are retired, the group forms again around the rest, and the chunk runs again
from the state at its start. The step's shards stay the sampler's (num_shards of them, whatever
the group's width): a rank computes the shards the failover policy gives it and rank 0 sums them
in shard order, so the weights equal driver mode's bit for bit, at any width, with or without
faults. A retired worker that comes back (driver.RayExecutor.take_back) rejoins at the next
chunk. Evaluation (`curves`) is driver mode's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from distributed_maml.config import MamlConfig, ModelConfig, ScalingConfig
from distributed_maml.core.learner import Learner
from distributed_maml.data.sampler import Sampler
from distributed_maml.errors import ConfigError, TrainingError
from distributed_maml.execution import raywait
from distributed_maml.execution.driver import START_GRACE_S, RayExecutor
from distributed_maml.execution.health import POLL_S, _first_line, _Watch
from distributed_maml.execution.steps import OnStep, Steps


class _GroupLost(Exception):
    """A rank of the collective group went silent."""


class CollectiveExecutor(RayExecutor):
    def __init__(
        self, store: Path | np.ndarray, model_cfg: ModelConfig, maml_cfg: MamlConfig, scaling: ScalingConfig
    ) -> None:
        super().__init__(store, model_cfg, maml_cfg, scaling)
        self.restarts = 0
        self.members: list[int] = []  # the workers in the group, in rank order
        self.backend = ""
        try:
            self._form()
        except BaseException:
            self.close()
            raise

    def _form(self) -> None:
        """The group forms; a member lost while it forms (between the rendezvous and its join)
        restarts the group, which forms again around the workers that come back."""
        try:
            self._form_group()
        except (RayActorError, _GroupLost):
            self._restart()

    def _form_group(self) -> None:
        """The healthy workers join one group; rank 0's node address and a port free there are
        the rendezvous. A rank that cannot join is one line naming who dialled where."""
        self.start()
        members = self.healthy()
        timeout = self.scaling.worker_timeout_s
        pids = self._pids(members, timeout + START_GRACE_S)
        if pids is None:
            raise _GroupLost("a worker did not answer before the group formed")
        address, port = raywait.get(
            self.workers[members[0]].rendezvous.remote(), timeout + START_GRACE_S, "the collective group's address"
        )
        iface = self.scaling.interface
        joins = [
            self.workers[w].join_group.remote(address, port, r, len(members), timeout, iface)
            for r, w in enumerate(members)
        ]
        try:
            answers = raywait.get(joins, timeout + START_GRACE_S, f"forming the collective group at {address}:{port}")
        except (RayTaskError, raywait.ClusterTimeout) as e:
            # A member that died or restarted after the rendezvous makes the others fail their
            # join too (a peer's address refuses): that is a lost rank, not a network to fix.
            lost = self._lost_joining(members, pids, joins, timeout + START_GRACE_S)
            if lost is not None:
                raise _GroupLost(f"worker-{lost} was lost while the group formed") from None
            ips = ", ".join(f"worker-{w} on {getattr(self._info[w], 'ip', '?')}" for w in members)
            raise TrainingError(
                f"the collective group could not form at {address}:{port} ({ips}): {_first_line(e)}; every node must "
                f"reach {address} on that port and each rank's own address; set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME "
                "on GPUs) in the workers' environment, or scaling.interface, to the interface of the cluster network, "
                "or use scaling.mode = 'driver'"
            ) from None
        self.backend = answers[0][0]
        self.members = members

    def _lost_joining(self, members: list[int], pids: list[int], joins: list[Any], timeout_s: float) -> int | None:
        """The member lost while the group formed, if one was: its join ends in an actor error
        (the joins all end within their timeout), or it answers with a new process id or not at all."""
        deadline = time.monotonic() + timeout_s
        for w, ref in zip(members, joins, strict=True):
            if raywait.done([ref], max(0.0, deadline - time.monotonic())):
                try:
                    raywait.result(ref)
                except RayActorError:
                    return w
                except RayTaskError:
                    pass
        return next((w for w, pid in zip(members, pids, strict=True) if self._pids([w], 2 * POLL_S) != [pid]), None)

    def _pids(self, members: list[int], timeout_s: float) -> list[int] | None:
        """The members' process ids (a restarted worker has a new one); None if one does not answer."""
        try:
            return raywait.get([self.workers[w].ping.remote() for w in members], timeout_s, "the workers' process ids")
        except (RayActorError, raywait.ClusterTimeout):
            return None

    def _regroup(self) -> None:
        """The group forms again around the healthy workers (one came back or left)."""
        leaving = [self.workers[w].leave_group.remote() for w in self.members if w in self.healthy()]
        try:
            raywait.get(leaving, self.scaling.worker_timeout_s, "leaving the collective group")
        except (RayActorError, raywait.ClusterTimeout):
            self._restart()
            return
        self._form()

    def run_steps(self, learner: Learner, sampler: Sampler, steps: Steps, on_step: OnStep) -> int:
        n = self.num_shards
        if sampler.meta_batch < n:
            raise ConfigError(
                f"task.meta_batch ({sampler.meta_batch}) must be >= the {n} shards of a collective "
                "group's step (num_workers x shards_per_worker); raise it, or lower scaling.num_workers or shards_per_worker"
            )
        failures = 0
        while True:
            self._check_raylet()
            if self.take_back() or self.members != self.healthy():
                self._regroup()
            state = (learner.state_dict(), learner.optimizer_state(), learner.version)
            rank = {w: r for r, w in enumerate(self.members)}
            owners = self.policy.owners(n)
            assignment = [[i for i in range(n) if rank[owners[i]] == r] for r in range(len(self.members))]
            calls = [
                self.workers[w].run_steps.remote(state if r == 0 else None, sampler, steps, assignment, n)
                for r, w in enumerate(self.members)
            ]
            try:
                outcomes, end_state = self._all(calls)[0]
                break
            except (RayActorError, RayTaskError, _GroupLost) as e:  # a rank died, broke, or was restarted
                failures += 1
                if failures >= self.policy.max_failures:
                    raise TrainingError(
                        f"the collective group failed {failures} times running steps {steps.first}..{steps.last} (last: "
                        f"{_first_line(e)}); see the worker logs above; the last checkpoint is intact"
                    ) from None
                self._restart()
        learner.load(*end_state)
        for outcome in outcomes:  # each rank's speed over the chunk hands out the next chunk's shards
            for name, tasks in outcome.timing["worker_tasks"].items():
                member = self.members[int(name.rsplit("-", 1)[1])]  # the chunk names ranks worker-<rank>
                self.policy.observe(member, tasks, outcome.timing["worker_compute_s"][name])
        for outcome in outcomes:
            on_step(outcome)
        return outcomes[-1].step if outcomes else steps.first - 1

    def _all(self, calls: list[Any]) -> list[Any]:
        """Every rank's answer; raises as soon as one rank fails or goes silent (the others then
        wait in a collective that will never complete: they are restarted, not awaited)."""
        watch = _Watch(self.workers, self.scaling.worker_timeout_s)
        pending = dict(zip(calls, self.members, strict=True))
        answers: dict[int, Any] = {}
        while pending:
            ready = raywait.done(list(pending), POLL_S)
            if not ready:
                silent = watch.silent(set(pending.values()))
                if silent:
                    raise _GroupLost(f"worker-{silent[0]} went silent for {self.scaling.worker_timeout_s:g} s")
                continue
            for ref in ready:
                answers[pending.pop(ref)] = raywait.result(ref)
        return [answers[w] for w in self.members]

    def _restart(self) -> None:
        """Every member killed and restarted by Ray (max_restarts); one that does not answer
        within worker_timeout_s (its node lost) is retired; the group forms around the rest."""
        self.restarts += 1
        for w in self.healthy():
            ray.kill(self.workers[w], no_restart=False)
        for w in self.healthy():
            if not self._restarted(w):
                self._retire(w, "did not come back after the group failed")
        if not self.healthy():
            raise TrainingError(
                f"no worker of the collective group came back within {self.scaling.worker_timeout_s:g} s; "
                "see the Ray logs for why, then continue with --resume"
            )
        for attempt in range(3):  # a worker still dying when called fails the forming: once more
            try:
                self._form_group()
                return
            except (RayActorError, _GroupLost) as e:
                if attempt == 2:
                    raise TrainingError(
                        f"the collective group lost a member each of 3 times it formed (last: {_first_line(e)}); "
                        "see the worker logs above, then continue with --resume"
                    ) from None
                time.sleep(0.5)

    def _restarted(self, w: int) -> bool:
        """Whether worker w answers after its restart. A restart runs the actor's constructor
        again (torch import, store open: seconds on a loaded node), so it gets the start's
        bound, worker_timeout_s + START_GRACE_S; a worker whose node Ray declares dead
        meanwhile is given up at once (a healthy worker retired for a slow restart would cost
        the run its width)."""
        deadline = time.monotonic() + self.scaling.worker_timeout_s + START_GRACE_S
        while time.monotonic() < deadline:
            if self._answers(w, min(POLL_S * 2, max(0.1, deadline - time.monotonic()))):
                return True
            if w in self.slots.lost():
                return False
        return False

    def describe(self) -> str:
        return super().describe()[:-1] + f", collective {self.backend} group)"
