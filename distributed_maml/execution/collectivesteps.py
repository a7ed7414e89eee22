"""A collective chunk's unlogged steps with nothing read back until the chunk ends.

stepping.collective_chunk's per-step loop crosses the host every step: rank 0 writes whether to
go on into the broadcast and every rank reads it (`.item()`), each shard's sums come back to the
host, are packed, go back to the communication device and are reduced on rank 0's host. On a
GPU group (NCCL) that is several synchronisations a step around a fraction of a millisecond of
kernels. Here, for the steps of a chunk that are not logged:

- rank 0 broadcasts its learner's weights (on its GPU with NCCL) and nothing else;
- each rank computes its shards with `ShardComputer.sums` (a CUDA graph where it has one) on the
  tasks of a device tensor of ids copied once for the chunk, and packs the sums on the device;
- rank 0 gathers the packed rows, adds them in shard order (the driver's order: the same bits),
  and updates through masked.MaskedUpdate: a non-finite step is never applied and, under
  on_nonfinite = "stop", nor is any after it; the other ranks compute those steps in vain
  (the logged step at the chunk's end then tells them to stop, as the per-step loop does);
- each rank's compute time is taken by CUDA events (the host runs ahead of the device) or the
  host clock on a CPU, and everything is read once, after the last step.

Only a step plan that does not change (no MAML++ schedules) and tasks mapped by vmap take this
path; the others, and every logged step, run the per-step loop.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from distributed_maml.core.learner import Learner
from distributed_maml.core.maml import varies
from distributed_maml.data.sampler import Sampler, split_shards
from distributed_maml.execution.computer import ShardComputer
from distributed_maml.execution.masked import MaskedUpdate
from distributed_maml.execution.steps import StepOutcome, timing_of


def eligible(computer: ShardComputer) -> bool:
    """Whether this computer's unlogged steps can run without the host (see the module doc)."""
    return computer.task_map == "vmap" and not varies(computer.maml_cfg) and not computer.shapes_vary


class _Clock:
    """This rank's compute time per step, read once at the end."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[object, object]] = []
        self._start: object = None

    def _now(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> None:
        self.marks.append((self._start, self._now()))

    def seconds(self) -> list[float]:
        if not self.cuda:
            return [float(b) - float(a) for a, b in self.marks]  # type: ignore[arg-type]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000.0 for a, b in self.marks]  # type: ignore[attr-defined]


def unlogged_steps(
    computer: ShardComputer,
    learner: Learner | None,
    sampler: Sampler,
    steps: list[int],
    rank: int,
    assignment: list[list[int]],
    num_shards: int,
    stop: bool,
    comm: torch.device,
) -> tuple[list[StepOutcome], bool]:
    """`steps` (none of them logged) on every rank of the group; rank 0 holds the `learner`.
    Returns, on rank 0, the steps' outcomes (up to the first non-finite one under `stop`) and
    whether such a step halted the chunk; ([], False) on the other ranks."""
    size, mine = computer.spec.numel, assignment[rank]
    width = max(len(a) for a in assignment)
    shards = [split_shards(sampler.ids(s - 1), num_shards) for s in steps]
    count = sampler.meta_batch  # every step's tasks
    views: list[list[Tensor]] = []
    if computer.resident is not None and mine:  # this rank's ids of the whole chunk cross to the device once
        sizes = [len(step[i]) for step in shards for i in mine]
        flat_ids = np.concatenate([step[i] for step in shards for i in mine]).astype(np.int64)
        parts = torch.from_numpy(flat_ids).to(computer.device).split(sizes)
        views = [list(parts[j * len(mine) : (j + 1) * len(mine)]) for j in range(len(steps))]
    weights = torch.empty(size, dtype=torch.float32, device=comm)
    rows = torch.zeros(width, size + 1, dtype=torch.float32, device=comm)  # per shard: its sums, its loss sum
    gathered = [torch.empty_like(rows) for _ in assignment] if rank == 0 else None
    holder = {i: (r, k) for r, a in enumerate(assignment) for k, i in enumerate(a)}  # shard -> (rank, row)
    update = MaskedUpdate(learner, stop) if learner is not None else None
    # the count as a device tensor, made once: dividing by a tensor is a true division on CUDA
    # too (by a Python number it is a multiplication by the inverse: not the host loop's bits)
    divisor = torch.tensor(float(count), dtype=torch.float32).to(comm)
    losses: list[Tensor] = []
    finite: list[Tensor] = []
    clock = _Clock(computer.device)
    started = time.perf_counter()
    for j in range(len(steps)):
        if learner is not None:
            weights.copy_(learner.flat.detach())
        dist.broadcast(weights, src=0)
        clock.start()
        for k, i in enumerate(mine):
            batch = computer.gather(views[j][k]) if views else computer.batch(shards[j][i])
            grad_sum, loss_sum = computer.sums(weights, batch)
            rows[k, :size].copy_(grad_sum)
            rows[k, size].copy_(loss_sum)
        clock.stop()
        dist.gather(rows, gathered, dst=0)
        if update is not None and gathered is not None:
            total = torch.zeros(size, dtype=torch.float32, device=comm)
            loss = torch.zeros((), dtype=torch.float64, device=comm)  # the host loop's float sum of float32s
            for i in range(num_shards):
                r, k = holder[i]
                total += gathered[r][k, :size]
                loss += gathered[r][k, size].double()
            loss = loss / count
            finite.append(update.apply(total / divisor, loss).clone())
            losses.append(loss)
    seconds = torch.tensor(clock.seconds(), dtype=torch.float64).to(comm)
    every = [torch.empty_like(seconds) for _ in assignment] if rank == 0 else None
    dist.gather(seconds, every, dst=0)
    if learner is None or every is None:
        return [], False
    got_loss = torch.stack(losses).cpu().tolist()  # the chunk's one read
    got_finite = torch.stack(finite).cpu().tolist()
    per_rank = [e.cpu().tolist() for e in every]
    wall = (time.perf_counter() - started) / len(steps)
    outcomes = []
    for j, step in enumerate(steps):
        per = {
            f"worker-{r}": [len(a), sum(len(shards[j][i]) for i in a), per_rank[r][j]]
            for r, a in enumerate(assignment)
            if a
        }
        ok = bool(got_finite[j])
        learner.version += ok
        outcomes.append(StepOutcome(step, count, {"loss_after": got_loss[j]}, ok, wall, timing_of(per, wall, 0.0)))
        if not ok and stop:
            return outcomes, True
    return outcomes, False
