"""MAML as pure functions over explicit parameters, vectorised over tasks with torch.func.

`meta_gradient` is the one function that turns (parameters, a batch of tasks) into the summed
meta-gradient and metric sums; the in-process loop and every Ray worker call it.

For one task with support (xs, ys) and query (xq, yq), inner steps k and step size alpha:

    theta_0 = theta,  theta_{i+1} = theta_i - alpha * grad L_support(theta_i)
    task loss = L_query(theta_k)

The meta-gradient is d(task loss)/d(theta) through all k steps (second order). First-order
MAML stops the gradient at each inner gradient, so it equals grad L_query at theta_k.
`forward(params, x)` is the model as a pure function (models.functional).

Tasks are mapped one of two ways (`task_map`), with the same result: "vmap" runs all tasks of a
batch as one batched computation; "loop" runs them one at a time and sums their gradients (on a
CPU, conv nets are faster so: under vmap each task's adapted weights turn every convolution into
a grouped one). Either way a task only ever sees its own examples, so a model with BatchNorm
normalises each task with that task's own statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from .config import MamlConfig
from .models import Forward

Params = dict[str, Tensor]


@dataclass(frozen=True)
class TaskBatch:
    """Tensors with a leading task axis: x [T, N, D]; y [T, N] labels or [T, N, O] targets."""

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor

    @classmethod
    def from_numpy(cls, rows: dict, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> TaskBatch:
        def conv(a: object) -> Tensor:
            t = as_input(torch.from_numpy(a).to(device))  # type: ignore[arg-type]  # uint8 crosses to the device
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        return cls(*(conv(rows[k]) for k in ("x_support", "y_support", "x_query", "y_query")))

    def __len__(self) -> int:
        return self.x_support.shape[0]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.x_support, self.y_support, self.x_query, self.y_query


def as_input(t: Tensor) -> Tensor:
    """Stored images (uint8) as model inputs: float32 in [0, 1], made where the model runs."""
    return t.to(torch.float32).div_(255.0) if t.dtype == torch.uint8 else t


TaskMap = Callable[..., tuple[Tensor, ...]]


def map_tasks(fn: Callable[..., tuple[Tensor, ...]], task_map: str) -> TaskMap:
    """fn(p, *task_tensors) over the leading task axis of the tensors (p shared): vmap, or a
    Python loop with the outputs stacked. Both give every task only its own examples."""
    if task_map == "vmap":

        def vmapped(p: Params, *tensors: Tensor) -> tuple[Tensor, ...]:
            return vmap(fn, in_dims=(None, *(0,) * len(tensors)))(p, *tensors)

        return vmapped

    def looped(p: Params, *tensors: Tensor) -> tuple[Tensor, ...]:
        outs = [fn(p, *(t[i] for t in tensors)) for i in range(tensors[0].shape[0])]
        return tuple(torch.stack(o) for o in zip(*outs, strict=True))

    return looped


def loss_fn(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    return F.cross_entropy if kind == "classification" else F.mse_loss


def task_losses(kind: str, out: Tensor, y: Tensor) -> Tensor:
    """Per-task mean loss of outputs [T, N, C] against y, without vmap: [T]."""
    if kind == "classification":
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
    return F.mse_loss(out, y, reduction="none").flatten(1).mean(1)


def adapt(
    forward: Forward,
    kind: str,
    params: Params,
    xs: Tensor,
    ys: Tensor,
    steps: int,
    lr: float,
    first_order: bool = False,
) -> Params:
    """`steps` SGD steps on one task's support set, differentiable (unless first_order)."""
    loss = loss_fn(kind)

    def support_loss(p: Params) -> Tensor:
        return loss(forward(p, xs), ys)

    for _ in range(steps):
        g = grad(support_loss)(params)
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
        params = {k: params[k] - lr * g[k] for k in params}
    return params


def _objective(forward: Forward, kind: str, cfg: MamlConfig) -> Callable[..., tuple[Tensor, Tensor]]:
    """One task's meta-objective: its query loss after adaptation, and its query accuracy."""
    loss = loss_fn(kind)
    classification = kind == "classification"

    def task_objective(p: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        adapted = adapt(forward, kind, p, xs, ys, cfg.inner_steps, cfg.inner_lr, cfg.first_order)
        out = forward(adapted, xq)
        acc = (out.argmax(-1) == yq).to(out.dtype).mean() if classification else out.new_zeros(())
        return loss(out, yq), acc.detach()

    return task_objective


def vmap_sums(
    forward: Forward, kind: str, params: Params, batch: TaskBatch, cfg: MamlConfig, weights: Tensor | None = None
) -> tuple[Params, Tensor, Tensor]:
    """The vmapped core of `meta_gradient`, tensors only (no host sync, so a CUDA graph can
    capture it): the summed meta-gradient, loss sum and accuracy sum over the batch's tasks,
    each task counted `weights[t]` times (a padding task, weight 0, adds exactly nothing)."""
    objective = _objective(forward, kind, cfg)

    def batch_objective(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        losses, accs = map_tasks(objective, "vmap")(p, *batch.tensors())
        if weights is not None:
            losses, accs = losses * weights, accs * weights
        return losses.sum(), (losses.detach().sum(), accs.sum())

    grads, (loss_sum, acc_sum) = grad(batch_objective, has_aux=True)(params)
    return grads, loss_sum, acc_sum


def meta_gradient(
    forward: Forward,
    kind: str,
    params: Params,
    batch: TaskBatch,
    cfg: MamlConfig,
    task_map: str = "vmap",
    before: bool = True,
) -> tuple[Params, dict[str, float]]:
    """The SUM over the batch's tasks of the per-task meta-gradients, and metric sums.

    Returning sums (not means) lets shards of any size be combined exactly: the learner divides
    by the total task count once. Metrics, summed over tasks: loss_after (and acc_after for
    classification), and with `before` loss_before / acc_before, the query loss of the initial
    weights: one more forward pass, which the training loop asks for on logged steps only (at
    meta-batch 25 it was 15% of a sinusoid step).
    """
    if task_map == "vmap":
        grads, loss_after, acc_after = vmap_sums(forward, kind, params, batch, cfg)
    else:  # one task at a time: the memory of one task's graph, gradients summed in task order
        objective = _objective(forward, kind, cfg)

        def one_task(p: Params, *task: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            task_loss, acc = objective(p, *task)
            return task_loss, (task_loss.detach(), acc)

        per_task = grad(one_task, has_aux=True)
        grads = {k: torch.zeros_like(v) for k, v in params.items()}
        loss_after = acc_after = torch.zeros((), device=batch.x_query.device)
        for i in range(len(batch)):
            g, (task_loss, acc) = per_task(params, *(t[i] for t in batch.tensors()))
            grads = {k: grads[k] + g[k] for k in grads}
            loss_after, acc_after = loss_after + task_loss.detach(), acc_after + acc
    metrics = {"loss_after": loss_after.item()}
    if kind == "classification":
        metrics["acc_after"] = acc_after.item()
    if before:
        metrics.update(metrics_before(forward, kind, params, batch, task_map))
    return grads, metrics


def metrics_before(forward: Forward, kind: str, params: Params, batch: TaskBatch, task_map: str) -> dict[str, float]:
    """loss_before (and acc_before) summed over tasks: the query loss of the unadapted weights."""
    loss = loss_fn(kind)
    classification = kind == "classification"

    def unadapted(p: Params, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        out = forward(p, xq)  # per task: a BatchNorm model sees this task's examples only
        acc = (out.argmax(-1) == yq).to(out.dtype).mean() if classification else out.new_zeros(())
        return loss(out, yq), acc

    with torch.no_grad():
        frozen = {k: v.detach() for k, v in params.items()}
        losses, accs = map_tasks(unadapted, task_map)(frozen, batch.x_query, batch.y_query)
    out = {"loss_before": losses.sum().item()}
    if classification:
        out["acc_before"] = accs.sum().item()
    return out


def adaptation_curve(
    forward: Forward, kind: str, params: Params, batch: TaskBatch, max_steps: int, lr: float, task_map: str = "vmap"
) -> tuple[Tensor, Tensor | None]:
    """Per-task query loss (and accuracy) after 0..max_steps inner steps: [T, max_steps + 1]."""
    loss = loss_fn(kind)
    classification = kind == "classification"

    def curve(p: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        losses, accs = [], []
        for step in range(max_steps + 1):
            if step:
                p = adapt(forward, kind, p, xs, ys, 1, lr, first_order=True)
            out = forward(p, xq)
            losses.append(loss(out, yq))
            accs.append((out.argmax(-1) == yq).to(out.dtype).mean() if classification else losses[-1])
        return torch.stack(losses), torch.stack(accs)

    frozen = {k: v.detach() for k, v in params.items()}
    losses, accs = map_tasks(curve, task_map)(frozen, batch.x_support, batch.y_support, batch.x_query, batch.y_query)
    return losses.detach(), accs.detach() if classification else None
