"""The meta-gradients `bench` holds the project against, written the ways others write them.

- `loop_meta_gradient`: the textbook (learn2learn-style) code, one task at a time,
  torch.autograd.grad(create_graph=True) for the inner step.
- `funcgrad_meta_gradient`: vmap over tasks with the OUTER gradient by torch.func.grad as well
  (the `bare_funcgrad` row; `bench`'s bare row until issue 19: a functorch level around the whole
  step costs ~25% at meta-batch 25, so it made a slow yardstick).
- The bare row itself is bench/minimal_script.py: torch.func inside vmap, `.backward()` outside.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from distributed_maml.config import MamlConfig
from distributed_maml.core import maml
from distributed_maml.core.maml import TaskBatch


def loop_meta_gradient(
    model: torch.nn.Module, params: dict[str, torch.Tensor], batch: TaskBatch, cfg: MamlConfig, kind: str = "regression"
) -> dict[str, torch.Tensor]:
    """The per-task baseline: a Python loop over tasks, autograd with create_graph (detached
    inner gradients at first order). Returns the SUM over tasks."""
    loss_fn = maml.loss_fn(kind)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    total = 0.0
    for t in range(len(batch)):
        p = dict(leaves)
        for _ in range(cfg.inner_steps):
            loss = loss_fn(functional_call(model, p, (batch.x_support[t],)), batch.y_support[t])
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=not cfg.first_order)
            p = {k: v - cfg.inner_lr * g for (k, v), g in zip(p.items(), grads, strict=True)}
        total = total + loss_fn(functional_call(model, p, (batch.x_query[t],)), batch.y_query[t])
    grads = torch.autograd.grad(total, list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def funcgrad_meta_gradient(
    model: torch.nn.Module, params: dict[str, torch.Tensor], batch: TaskBatch, cfg: MamlConfig, kind: str = "regression"
) -> dict[str, torch.Tensor]:
    """vmap over tasks, torch.func.grad of the summed query loss. Returns the SUM over tasks."""
    loss_fn = maml.loss_fn(kind)

    def task(p: dict, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        for _ in range(cfg.inner_steps):
            g = grad(lambda q: loss_fn(functional_call(model, q, (xs,)), ys))(p)
            g = {k: v.detach() for k, v in g.items()} if cfg.first_order else g
            p = {k: p[k] - cfg.inner_lr * g[k] for k in p}
        return loss_fn(functional_call(model, p, (xq,)), yq)

    def total(p: dict) -> torch.Tensor:
        return vmap(task, in_dims=(None, 0, 0, 0, 0))(p, *batch.tensors()).sum()

    return grad(total)({k: v.detach() for k, v in params.items()})
