"""An in-process run on a GPU: the learner on the device, a whole meta-step as one CUDA graph.

The driver loop (stepping.drive) crosses the host every step: the weights go to numpy, the
loss is read with `.item()`, Adam runs where the learner is. On a GPU a small model's step is
a fraction of a millisecond of kernels, so that host work was most of it (0.24x a bare CUDA
graph at meta-batch 25 on an H200). Here, between two logged steps:

- the weights and Adam's state stay on the device (core.learner.Learner with `device`);
- one step = the gather of its tasks from the device-resident store, the meta-gradient, the
  mean, the finiteness check and the (capturable) Adam update, captured once as a CUDA graph and
  replayed: two launches a step (the step's ids into the graph's buffer, the replay);
- nothing is read back until the chunk ends: each step's loss and finiteness land in device
  buffers, read once, and the steps are reported to the loop then.

A non-finite step is never applied: the graph keeps the pre-step weights and Adam state where
the step is not finite (torch.where against a snapshot), and with on_nonfinite = "stop" every
later step of the chunk is a no-op too, so the learner holds the weights of the step before
the first bad one, as the driver loop leaves it. The logged step at a chunk's end runs through
the driver loop's own code (unadapted metrics, accuracy). Same arithmetic as the driver loop:
the same batch_sums, the same mean, the same Adam, so the weights are the same bits on a CPU
(where `capture=False` runs the very same step eagerly: tests/test_devicesteps.py).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distributed_maml import stopping
from distributed_maml.core.learner import Learner
from distributed_maml.core.maml import TaskBatch, batch_sums, step_plan, varies
from distributed_maml.data.sampler import Sampler
from distributed_maml.execution.computer import ShardComputer
from distributed_maml.execution.masked import MaskedUpdate
from distributed_maml.execution.stepping import drive
from distributed_maml.execution.steps import OnStep, StepOutcome, Steps


def why_not_fused(computer: ShardComputer) -> str | None:
    """Why this computer's steps cannot be fused (None: they can, with a learner on its device)."""
    if computer.task_map != "vmap":
        return "tasks by loop"
    if varies(computer.maml_cfg):
        return "MAML++ schedules change the step"
    if computer.shapes_vary:
        return "episodes of variable shape"  # fused steps reuse one input buffer of one shape
    return None


class FusedStep:
    """One meta-step (meta-gradient + update) over `meta_batch` tasks, with the learner's own
    tensors; `capture`: as a CUDA graph (else the same function runs eagerly)."""

    def __init__(self, computer: ShardComputer, learner: Learner, meta_batch: int, stop: bool, capture: bool) -> None:
        self.computer, self.learner, self.stop = computer, learner, stop
        dev = computer.device
        self.count = float(meta_batch)
        self.ids = torch.zeros(meta_batch, dtype=torch.long, device=dev)  # the step's task ids (graph input)
        # the step's rows when the store is not on the device: fixed buffers, filled before each step
        self.inputs = None if computer.resident is not None else computer.batch(np.zeros(meta_batch, dtype=np.int64))
        self.loss = torch.zeros((), device=dev)  # outputs: the step's mean query loss, finite or not
        self.finite = torch.zeros((), dtype=torch.bool, device=dev)
        self.plan = step_plan(computer.maml_cfg, 0)
        self.update = MaskedUpdate(learner, stop)
        self.halted = self.update.halted
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            self._capture()

    def _batch(self) -> TaskBatch:
        if self.computer.resident is not None:
            return self.computer.gather(self.ids)
        assert self.inputs is not None
        return self.inputs

    def _step(self) -> None:
        c = self.computer
        params = c.spec.unflatten(self.learner.flat.detach())
        with c.autocast():
            grads, loss_sum, _ = batch_sums(
                c.forward, c.store.info.kind, params, self._batch(), c.maml_cfg, self.plan, accuracy=False
            )
        with torch.no_grad():
            loss = loss_sum.float() / self.count
            finite = self.update.apply(c.spec.flatten(grads).float() / self.count, loss)
            self.loss.copy_(loss)
            self.finite.copy_(finite)

    def _capture(self) -> None:
        dev = self.computer.device
        before = [t.detach().clone() for t in self.update.state]
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                self._step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        with torch.no_grad():  # the warm-up changed the weights: put them back
            for t, b in zip(self.update.state, before, strict=True):
                t.copy_(b)
            self.halted.fill_(False)

    def run(self, ids: Tensor | np.ndarray) -> None:
        """One step on tasks `ids` (a device tensor, or host ids when the store is not resident)."""
        if self.computer.resident is not None:
            self.ids.copy_(torch.as_tensor(ids, device=self.computer.device))
        else:
            self.inputs = _fill(self.inputs, self.computer.batch(np.asarray(ids)))
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()


def _fill(dst: TaskBatch | None, src: TaskBatch) -> TaskBatch:
    """src's tensors copied into dst's (a graph's fixed addresses); dst made on first use."""
    if dst is None:
        return TaskBatch(*(t.clone() for t in src.tensors()))
    for d, s in zip(dst.tensors(), src.tensors(), strict=True):
        d.copy_(s)
    return dst


class DeviceSteps:
    """The run_steps of an in-process executor whose learner is on its device: unlogged steps
    fused (FusedStep), the logged last step of a chunk through the driver loop."""

    def __init__(self, computer: ShardComputer, capture: bool) -> None:
        self.computer, self.capture = computer, capture
        self.fused: FusedStep | None = None
        self.failed: str | None = None  # why the graph was not captured (then: fused eagerly)

    def describe(self) -> str:
        if self.failed:
            return f"learner on {self.computer.device}, fused eager steps (graph failed)"
        return f"learner on {self.computer.device}, " + ("one CUDA graph a step" if self.capture else "fused steps")

    def _step_for(self, learner: Learner, meta_batch: int, stop: bool) -> FusedStep:
        f = self.fused
        if f is not None and f.learner is learner and f.count == meta_batch and f.stop == stop:
            return f
        try:
            f = FusedStep(self.computer, learner, meta_batch, stop, self.capture and not self.failed)
        except RuntimeError as e:  # an op capture does not support, or out of memory
            self.failed = str(e).splitlines()[0][:200]
            print(f"in-process: fused eager steps from now on (CUDA graph: {self.failed})", file=sys.stderr, flush=True)
            f = FusedStep(self.computer, learner, meta_batch, stop, capture=False)
        self.fused = f
        return f

    def run_steps(self, executor: Any, learner: Learner, sampler: Sampler, steps: Steps, on_step: OnStep) -> int:
        unlogged = [s for s in steps if not steps.before(s)]
        if unlogged:
            fused = self._step_for(learner, sampler.meta_batch, steps.stop_on_nonfinite)
            ids = np.stack([sampler.ids(s - 1) for s in unlogged])
            if self.computer.resident is not None:  # one copy of the chunk's ids to the device
                ids = torch.from_numpy(ids.astype(np.int64)).to(self.computer.device)
            losses, finite = [], []
            start = time.perf_counter()
            for j, step in enumerate(unlogged):
                if step > steps.first and stopping.requested():
                    break
                fused.run(ids[j])
                losses.append(fused.loss.clone())  # stays on the device: read once below
                finite.append(fused.finite.clone())
            got_loss = torch.stack(losses).cpu().tolist()  # the chunk's one host sync
            got_finite = torch.stack(finite).cpu().tolist()
            fused.halted.fill_(False)
            wall = (time.perf_counter() - start) / len(got_loss)
            timing = {
                "compute_s": wall,
                "straggler_s": 0.0,
                "overhead_s": 0.0,
                "update_s": 0.0,
                "slowest_worker": "in-process",
            }
            for step, loss, ok in zip(unlogged, got_loss, got_finite, strict=False):
                learner.version += bool(ok)
                on_step(StepOutcome(step, len(ids[0]), {"loss_after": loss}, bool(ok), wall, timing))
                if not ok and steps.stop_on_nonfinite:
                    return step
            if len(got_loss) < len(unlogged):  # a stop was requested between steps
                return unlogged[len(got_loss) - 1]
        if not steps.log_last:
            return steps.last
        return drive(executor, learner, sampler, Steps(steps.last, steps.last, True, steps.stop_on_nonfinite), on_step)
