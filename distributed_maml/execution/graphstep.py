"""A GPU worker's meta-step captured as one CUDA graph (scaling.gpu_step = "graph").

An eager vmapped MAML step launches hundreds of small kernels; at GPU speeds the launches, not
the arithmetic, bound it (an eager seed-MLP step reached 210k tasks/s on an H200, the same step
replayed from a graph by a bare script 9.16M). A graph needs static shapes and addresses, so:

- the weights and the shard's tensors are copied into buffers the graph owns;
- a shard is padded to the next of a few sizes (powers of two from MIN_SIZE) with copies of its
  first task weighted 0: the padding adds exactly nothing to the sums (tested on the CPU);
- one graph per size, captured on first use and checked once against the eager step
  (max relative difference MAX_REL_DIFF): a mismatch turns the worker back to eager, saying so.

The unlogged steps replay the graph (loss only: accuracy is a logged step's metric); a logged
step (which also wants the unadapted metrics) runs eagerly. CPU workers always run eagerly.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from distributed_maml.config import MamlConfig
from distributed_maml.core.maml import TaskBatch, batch_sums, step_plan
from distributed_maml.core.models import Forward, ParamSpec

MIN_SIZE = 64
MAX_REL_DIFF = 1e-5  # the graph replays the eager kernels: any real difference is a capture bug


def padded_size(n: int) -> int:
    """The graph size a shard of n tasks runs at: the next power of two, at least MIN_SIZE."""
    return max(MIN_SIZE, 1 << (max(n, 1) - 1).bit_length())


def fill_padded(dst: TaskBatch, weights: Tensor, src: TaskBatch) -> None:
    """Writes `src`'s tasks into the first rows of `dst` (weight 1) and copies of its first task
    into the rest (weight 0), in place."""
    n = len(src)
    for d, s in zip(dst.tensors(), src.tensors(), strict=True):
        d[:n].copy_(s)
        d[n:].copy_(s[:1].expand_as(d[n:]))
    weights[:n].fill_(1.0)
    weights[n:].fill_(0.0)


class GraphedStep:
    """batch_sums for shards of up to `size` tasks shaped like `example`, as one CUDA graph."""

    def __init__(
        self,
        forward: Forward,
        kind: str,
        spec: ParamSpec,
        cfg: MamlConfig,
        example: TaskBatch,
        size: int,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        device = example.x_support.device
        self.size = size
        self.flat = torch.zeros(spec.numel, device=device)
        self.inputs = TaskBatch(
            *(torch.zeros((size, *t.shape[1:]), dtype=t.dtype, device=device) for t in example.tensors())
        )
        self.weights = torch.zeros(size, device=device)

        plan = step_plan(cfg, 0)  # graphs only for plans that never change (maml.varies)

        def step() -> tuple[Tensor, Tensor, Tensor]:
            params = spec.unflatten(self.flat)
            with autocast():
                grads, loss_sum, acc_sum = batch_sums(
                    forward, kind, params, self.inputs, cfg, plan, self.weights, accuracy=False
                )
            return spec.flatten(grads), loss_sum.float(), acc_sum.float()

        fill_padded(self.inputs, self.weights, example)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step()

    def run(self, flat: Tensor, batch: TaskBatch) -> tuple[Tensor, Tensor, Tensor]:
        """(flat summed meta-gradient, loss sum, accuracy sum): views of the graph's outputs,
        valid until the next replay."""
        self.flat.copy_(flat)
        fill_padded(self.inputs, self.weights, batch)
        self.graph.replay()
        return self.out


class GraphSteps:
    """A worker's graphs, one per padded size, each checked against eager once."""

    def __init__(
        self,
        forward: Forward,
        kind: str,
        spec: ParamSpec,
        cfg: MamlConfig,
        name: str,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        self.forward, self.kind, self.spec, self.cfg, self.name = forward, kind, spec, cfg, name
        self.autocast = autocast
        self.graphs: dict[int, GraphedStep] = {}
        self.failed: str | None = None  # why this worker went back to eager

    def run(self, flat: Tensor, batch: TaskBatch) -> tuple[Tensor, Tensor, Tensor] | None:
        """The graph's sums for `batch`, or None: run eagerly (a graph failed to capture or to
        match; the reason is printed once and kept in `failed`)."""
        if self.failed:
            return None
        size = padded_size(len(batch))
        if size not in self.graphs:
            try:
                graph = GraphedStep(self.forward, self.kind, self.spec, self.cfg, batch, size, self.autocast)
                got = graph.run(flat, batch)
                params = self.spec.unflatten(flat)
                with self.autocast():
                    want = batch_sums(
                        self.forward, self.kind, params, batch, self.cfg, step_plan(self.cfg, 0), accuracy=False
                    )
                eager = self.spec.flatten(want[0])
                diff = float((got[0] - eager).abs().max() / eager.abs().max().clamp_min(1e-30))
                if not diff <= MAX_REL_DIFF:
                    raise RuntimeError(f"its meta-gradient is {diff:.1e} off the eager step's")
            except RuntimeError as e:  # capture unsupported by an op, out of memory, or a mismatch
                self.failed = f"CUDA graph of {size} tasks: {str(e).splitlines()[0][:200]}"
                print(f"{self.name}: eager steps from now on ({self.failed})", file=sys.stderr, flush=True)
                return None
            self.graphs[size] = graph
        return self.graphs[size].run(flat, batch)
