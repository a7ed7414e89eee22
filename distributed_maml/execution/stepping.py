"""Meta-steps: the one fan-in-and-update every executor applies, in its two loops.

`settle` turns one step's shard results into the learner's update. The driver loop (`drive`:
in-process and Ray driver mode) computes a step's shards through the executor and settles it
here; the collective loop (`collective_chunk`, run inside every Ray worker of a
torch.distributed group) gathers the shards to rank 0, which settles them with the same code
and broadcasts the new weights. Same shards, same reduction order, same Adam: the two modes give
bit-identical weights (tested). Ray-free, so the collective loop runs under any launcher.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.distributed as dist

from distributed_maml import stopping
from distributed_maml.core.learner import Learner
from distributed_maml.core.shards import Reduced, ShardResult, reduce_shards
from distributed_maml.data.sampler import Sampler, split_shards
from distributed_maml.execution import collectivesteps
from distributed_maml.execution.computer import ShardComputer
from distributed_maml.execution.protocol import Executor
from distributed_maml.execution.steps import OnStep, StepOutcome, Steps, timing


def is_finite(reduced: Reduced) -> bool:
    return bool(np.isfinite(reduced.grad).all()) and all(math.isfinite(v) for v in reduced.metrics.values())


def settle(learner: Learner, step: int, results: list[ShardResult], started: float) -> StepOutcome:
    """The fan-in and the update: shard sums reduced in shard order, then Adam (unless the step
    is non-finite: Adam never sees it; the caller's policy decides what follows)."""
    reduced = reduce_shards(results)
    finite = is_finite(reduced)
    t1 = time.perf_counter()
    if finite:
        learner.apply(reduced.grad)
    t2 = time.perf_counter()
    return StepOutcome(
        step, reduced.count, reduced.metrics, finite, t2 - started, timing(results, t1 - started, t2 - t1)
    )


def fan_out_in(
    executor: Executor, learner: Learner, ids: np.ndarray, before: bool = True
) -> tuple[list[ShardResult], Reduced]:
    """One step's work: the ids split into the executor's shards, computed at the learner's
    weights (waiting for the slowest shard), reduced in shard order (`before`: with the unadapted
    metrics, for a logged step). `bench` times this too."""
    shards = split_shards(ids, executor.num_shards)
    results = executor.compute(learner.snapshot(), learner.version, shards, before)
    return results, reduce_shards(results)


def drive(
    executor: Executor,
    learner: Learner,
    sampler: Sampler,
    steps: Steps,
    on_step: OnStep,
) -> int:
    """`steps`, the driver calling the executor every step. Returns the last step applied or
    reported: earlier than `steps.last` when a stop was requested (checked between steps) or a
    non-finite step stops the run."""
    for step in steps:
        if step > steps.first and stopping.requested():
            return step - 1
        started = time.perf_counter()
        shards = split_shards(sampler.ids(step - 1), executor.num_shards)
        results = executor.compute(learner.snapshot(), learner.version, shards, steps.before(step))
        outcome = settle(learner, step, results, started)
        on_step(outcome)
        if not outcome.finite and steps.stop_on_nonfinite:
            return step
    return steps.last


def collective_chunk(
    computer: ShardComputer,
    learner: Learner | None,
    sampler: Sampler,
    steps: Steps,
    rank: int,
    assignment: list[list[int]],
    num_shards: int,
) -> list[StepOutcome]:
    """`steps` on every rank of the default torch.distributed group at once; rank 0
    holds the `learner` (the central learner) and returns the steps' outcomes, the others [].

    Per step: rank 0 broadcasts its weights (and whether to go on); each rank computes the
    shards assignment[rank] of the step's `num_shards` (one each, unless the group lost a
    member); every rank's shard sums are gathered to rank 0, which settles them in shard order
    exactly as the driver does (a gather, not a reduce: a reduction tree would add the shards
    in another order, and the weights would drift from driver mode's in the last bit)."""
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    size = computer.spec.numel
    width = max(len(a) for a in assignment)  # every rank sends as many rows (gather needs equal sizes)
    header = torch.empty(size + 2, dtype=torch.float32, device=comm)  # weights, go on (1) or stop (0), version
    outcomes: list[StepOutcome] = []
    go, rest = True, list(steps)
    unlogged = [s for s in steps if not steps.before(s)]
    if unlogged and collectivesteps.eligible(computer):  # nothing read back until the chunk ends
        outcomes, halted = collectivesteps.unlogged_steps(
            computer, learner, sampler, unlogged, rank, assignment, num_shards, steps.stop_on_nonfinite, comm
        )
        go, rest = not halted, [s for s in steps if steps.before(s)]
    for step in rest:
        started = time.perf_counter()
        if rank == 0:
            assert learner is not None
            header[:size] = learner.flat.detach()  # on NCCL the learner is on this GPU: no host copy
            header[size] = float(go)
            header[size + 1] = float(learner.version)  # exact in float32 up to 2**24 updates
        dist.broadcast(header, src=0)
        if header[size].item() == 0.0:
            break
        weights = header[:size]  # a tensor: used in place where it already is on the computer's device
        shards = split_shards(sampler.ids(step - 1), num_shards)
        version = int(header[size + 1].item())
        mine = [computer.compute(weights, shards[i], steps.before(step), version) for i in assignment[rank]]
        keys = list(mine[0].metrics)  # the same on every rank: they follow the task kind and `before`
        rows = np.zeros((width, size + 2 + len(keys)), dtype=np.float32)
        for j, r in enumerate(mine):
            rows[j] = np.concatenate([r.grad_sum, [r.count, r.compute_s], [r.metrics[k] for k in keys]])
        packed = torch.from_numpy(rows).to(comm)
        gathered = [torch.empty_like(packed) for _ in assignment] if rank == 0 else None
        dist.gather(packed, gathered, dst=0)
        if rank == 0:
            assert learner is not None and gathered is not None
            results: list[ShardResult | None] = [None] * num_shards
            for r, g in enumerate(gathered):
                got = g.cpu().numpy()
                for j, i in enumerate(assignment[r]):
                    results[i] = _unpack(got[j], size, keys, f"worker-{r}")
            assert all(r is not None for r in results), (assignment, num_shards)  # every shard, once
            outcome = settle(learner, step, results, started)  # type: ignore[arg-type]
            outcomes.append(outcome)
            go = outcome.finite or not steps.stop_on_nonfinite
    return outcomes


def _unpack(packed: np.ndarray, size: int, keys: list[str], worker: str) -> ShardResult:
    count, compute_s = packed[size : size + 2]
    metrics = {k: float(v) for k, v in zip(keys, packed[size + 2 :], strict=True)}
    return ShardResult(packed[:size].copy(), int(count), metrics, float(compute_s), worker)


class Driven:
    """The driver's loop as an executor's `run_steps`: in-process and Ray driver mode call their
    workers from the driver every step (`drive`); the collective executor has its own."""

    def run_steps(self, learner: Learner, sampler: Sampler, steps: Steps, on_step: OnStep) -> int:
        return drive(self, learner, sampler, steps, on_step)  # type: ignore[arg-type]  # an Executor
