"""The minimal MAML script `bench` holds the project against: torch only, nothing of ours.

This is what a researcher writes in ten lines (the issue-19 recipe): the model through
`torch.func.functional_call`, the inner SGD steps by `torch.func.grad` inside `torch.func.vmap`
over tasks, then `.mean().backward()` on the vmapped query losses (plain autograd for the outer
gradient) and `torch.optim.Adam`. `bench` times it beside its own `bare` row and the project's
path; `python -m distributed_maml.bench.minimal_script` times it alone on random sinusoid-shaped
tasks. Keep it free of project imports: it is the yardstick, and a copy-paste away from a user.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


def make_step(
    model: torch.nn.Module,
    inner_steps: int,
    inner_lr: float,
    first_order: bool = False,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
    meta_lr: float = 1e-3,
    capturable: bool = False,
) -> tuple[Callable[[tuple[torch.Tensor, ...]], None], dict[str, torch.Tensor]]:
    """(step, params): step(batch) does one meta-update on batch = (xs, ys, xq, yq), each with a
    leading task axis; params are the meta-parameters it updates (their .grad: the last mean
    meta-gradient). `capturable`: Adam's step count on the device (for a CUDA graph)."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    opt = torch.optim.Adam(params.values(), lr=meta_lr, capturable=capturable)

    def task(p: dict, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        for _ in range(inner_steps):
            g = grad(lambda q: loss(functional_call(model, q, (xs,)), ys))(p)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            p = {k: p[k] - inner_lr * g[k] for k in p}
        return loss(functional_call(model, p, (xq,)), yq)

    def step(batch: tuple[torch.Tensor, ...]) -> None:
        opt.zero_grad()
        vmap(task, in_dims=(None, 0, 0, 0, 0))(params, *batch).mean().backward()
        opt.step()

    return step, params


def make_graph_step(
    model: torch.nn.Module,
    inner_steps: int,
    inner_lr: float,
    first_order: bool,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    example: tuple[torch.Tensor, ...],
    meta_lr: float = 1e-3,
) -> Callable[[tuple[torch.Tensor, ...]], None]:
    """The `bare_graph` row: make_step's meta-step (meta-gradient + Adam) on a CUDA device,
    captured once as a CUDA graph, the physical reference for a small-model GPU step. step(batch)
    copies a batch (CUDA tensors shaped like `example`) into the graph's inputs and replays it;
    Adam is `capturable` so its step count lives on the device too."""
    device = example[0].device
    step, _ = make_step(model.to(device), inner_steps, inner_lr, first_order, loss, meta_lr, capturable=True)
    static = tuple(t.clone() for t in example)

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            step(static)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # zero_grad() sets .grad to None: backward allocates it from the graph's pool
        step(static)

    def replay(batch: tuple[torch.Tensor, ...]) -> None:
        for s, b in zip(static, batch):
            s.copy_(b)
        graph.replay()

    return replay


def standalone(meta_batch: int = 25, inner_steps: int = 1) -> Callable[[], None]:
    """The script on its own: random sinusoid-shaped tasks (1-40-40-1 MLP, 10 + 10 examples), a
    zero-argument meta-step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1)
    )
    batch = tuple(torch.randn(meta_batch, 10, 1) for _ in range(4))
    step, _ = make_step(model, inner_steps, 0.01)
    return lambda: step(batch)


def main(meta_batch: int = 25, inner_steps: int = 1, seconds: float = 2.0) -> float:
    """Prints and returns ms per step, best of 7 rounds on one torch thread (as `bench` times)."""
    torch.set_num_threads(1)
    step = standalone(meta_batch, inner_steps)
    step()
    best = float("inf")
    for _ in range(7):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 7:
            step()
            n += 1
        best = min(best, (time.perf_counter() - start) / n)
    print(f"minimal MAML script: meta-batch {meta_batch}, {inner_steps} inner step(s): {1e3 * best:.2f} ms/step")
    return 1e3 * best


if __name__ == "__main__":
    main()
