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

The inner loop's building blocks (batches, task maps, `adapt`, learned step sizes) are in
core/inner.py and re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad

from distributed_maml.config import MamlConfig
from distributed_maml.core import checkpointed, heads, implicit
from distributed_maml.core.adaptation import adaptation_curve
from distributed_maml.core.inner import (
    LR_PREFIX,
    PER_ELEMENT,
    PER_STEP,
    Params,
    TaskBatch,
    adapt,
    as_input,
    bind,
    head_of,
    learned_lr_shapes,
    loss_fn,
    map_tasks,
    meta_spec,
    split_lrs,
    task_losses,
    task_of,
    with_learned_lrs,
)
from distributed_maml.core.inner import (
    accuracy as accuracy_of,
)
from distributed_maml.core.models import Forward
from distributed_maml.core.shards import by_group

# fmt: off
__all__ = [  # the inner loop's pieces re-exported from core/inner.py, then this module's own
    "Params", "TaskBatch", "as_input", "map_tasks", "loss_fn", "task_losses", "adapt", "LR_PREFIX", "PER_ELEMENT",
    "PER_STEP", "split_lrs", "learned_lr_shapes", "meta_spec", "with_learned_lrs", "head_of", "StepPlan",
    "adaptation_curve", "batch_sums", "batch_vectors", "by_group", "meta_gradient", "metrics_before", "step_plan", "varies",
]
# fmt: on


@dataclass(frozen=True)
class StepPlan:
    """How one meta-step's inner loop counts: its derivative order, and the multi-step loss's
    weight per inner step (None: the last step's query loss only)."""

    first_order: bool
    weights: tuple[float, ...] | None = None


def step_plan(cfg: MamlConfig, version: int) -> StepPlan:
    """The plan at meta-update `version`. MAML++'s multi-step loss weights, with meta-updates
    for its epochs: all 1/K at first; the non-final ones decay by 1/(K * msl_anneal_steps) per
    update to a floor of 0.03/K, the last one takes what they give up."""
    first_order = cfg.always_first_order() or version < cfg.first_order_until
    if not cfg.multi_step_loss:
        return StepPlan(first_order)
    k = cfg.inner_steps
    decay, floor = 1.0 / k / cfg.msl_anneal_steps, 0.03 / k
    weights = [max(1.0 / k - version * decay, floor) for _ in range(k - 1)]
    weights.append(min(1.0 / k + version * (k - 1) * decay, 1.0 - (k - 1) * floor))
    return StepPlan(first_order, tuple(weights))


def varies(cfg: MamlConfig) -> bool:
    """Whether the plan changes from one meta-update to the next (MAML++'s annealing)."""
    return cfg.multi_step_loss or cfg.first_order_until > 0


def _objective(
    forward: Forward, kind: str, cfg: MamlConfig, plan: StepPlan, head: frozenset[str] | None, accuracy: bool = True
) -> Callable[..., tuple[Tensor, ...]]:
    """One task's meta-objective (the query loss after adaptation, or MAML++'s weighted sum of
    the query losses after every inner step), its final query loss and, for classification with
    `accuracy`, its accuracy (metrics; four more ops per task, which unlogged steps skip)."""
    loss = loss_fn(kind)
    accuracy = accuracy and kind == "classification"

    def task_objective(p: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, ...]:
        objective: Tensor | float = 0.0
        fs, fq = bind(forward, ys), bind(forward, yq)  # a padded set's BatchNorm: its real examples
        opening = heads.opening(forward, kind, p, xs, ys)  # proto: its rows and first gradient in one pass
        adapted = p if opening else heads.start(forward, p, xs, ys)  # a task's head rows (maml.head)
        for i in range(cfg.inner_steps):
            first = opening if i == 0 else None
            adapted = adapt(fs, kind, adapted, xs, ys, 1, cfg.inner_lr, plan.first_order, head, i, first)
            if plan.weights is not None and i < cfg.inner_steps - 1:
                objective = objective + plan.weights[i] * loss(fq(split_lrs(adapted)[0], xq), yq)
        out = fq(split_lrs(adapted)[0], xq)
        final = loss(out, yq)
        total = final if plan.weights is None else objective + plan.weights[-1] * final
        if not accuracy:
            return total, final.detach()
        return total, final.detach(), accuracy_of(out, yq).detach()

    return task_objective


def batch_sums(
    forward: Forward,
    kind: str,
    params: Params,
    batch: TaskBatch,
    cfg: MamlConfig,
    plan: StepPlan,
    weights: Tensor | None = None,
    task_map: str = "vmap",
    accuracy: bool = True,
) -> tuple[Params, Tensor, Tensor]:
    """The batched core of `meta_gradient`, tensors only (no host sync, so a CUDA graph can
    capture it): the summed meta-gradient (Reptile: the summed theta - phi), the final query
    loss sum and accuracy sum over the batch's tasks, each task counted `weights[t]` times (a
    padding task, weight 0, adds exactly nothing). Without `accuracy` the plain MAML path
    returns 0 for the accuracy sum (an unlogged step does not report it)."""
    grads, losses, accs = batch_vectors(forward, kind, params, batch, cfg, plan, weights, task_map, accuracy)
    return grads, losses.sum(), accs.sum()


def batch_vectors(
    forward: Forward,
    kind: str,
    params: Params,
    batch: TaskBatch,
    cfg: MamlConfig,
    plan: StepPlan,
    weights: Tensor | None = None,
    task_map: str = "vmap",
    accuracy: bool = True,
) -> tuple[Params, Tensor, Tensor]:
    """batch_sums with each task's (weighted) final query loss and accuracy kept apart: [T] each
    (per-source metrics sum them by source)."""
    if cfg.algorithm == "reptile":
        return _reptile_sums(forward, kind, params, batch, cfg, weights, task_map)
    if cfg.checkpoint_inner and not plan.first_order:
        return _checkpointed_sums(forward, kind, params, batch, cfg, plan, weights, task_map)
    if cfg.algorithm == "imaml":
        return _imaml_sums(forward, kind, params, batch, cfg, weights, task_map)
    objective = _objective(
        forward, kind, cfg, plan, heads.anil_head(cfg, forward, list(split_lrs(params)[0])), accuracy
    )

    def batch_objective(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        totals, *metrics = map_tasks(objective, task_map)(p, *batch.tensors())
        if weights is not None:
            totals, metrics = totals * weights, [m * weights for m in metrics]
        accs = metrics[1] if len(metrics) > 1 else torch.zeros_like(metrics[0])
        return totals.sum(), (metrics[0], accs)

    return outer_grad(batch_objective, params)


def outer_grad(
    objective: Callable[[Params], tuple[Tensor, tuple[Tensor, Tensor]]], params: Params
) -> tuple[Params, Tensor, Tensor]:
    """The gradient of `objective` (a scalar, with two metric tensors) at `params`, by plain
    autograd. torch.func.grad gives the same numbers, but wraps every op of the vmapped inner
    loop in one more functorch level: at meta-batch 25 of the sinusoid MLP that level was ~25% of
    a step (cProfile, `bench`'s bare_vmap_funcgrad row against bare). Autograd records only the
    ops that need it, and runs inside CUDA-graph capture too."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        total, (loss_sum, acc_sum) = objective(leaves)
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(leaves, grads, strict=True)), loss_sum.detach(), acc_sum.detach()


def _checkpointed_sums(
    forward: Forward,
    kind: str,
    params: Params,
    batch: TaskBatch,
    cfg: MamlConfig,
    plan: StepPlan,
    weights: Tensor | None,
    task_map: str,
) -> tuple[Params, Tensor, Tensor]:
    """batch_sums with maml.checkpoint_inner: each task's meta-gradient by core/checkpointed.py
    (one inner step's graph alive at a time), mapped over tasks and summed."""
    head = heads.anil_head(cfg, forward, list(split_lrs(params)[0]))
    names = list(params)

    def task(p: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, ...]:
        fs = bind(forward, ys)
        theta, pull = heads.started(forward, p, xs, ys)

        def step(q: Params, i: int) -> Params:
            return adapt(fs, kind, q, xs, ys, 1, cfg.inner_lr, False, head, first_step=i)

        query = _query(forward, kind, xq, yq)
        g, final, acc = checkpointed.meta_gradient(
            theta, step, query, cfg.inner_steps, plan.weights, recompute=cfg.checkpoint_recompute
        )
        g = g if pull is None else pull(g)
        return (*(g[k] for k in names), final, acc)

    return _summed(names, *_per_task(task, params, batch, task_map), weights)


def _imaml_sums(
    forward: Forward,
    kind: str,
    params: Params,
    batch: TaskBatch,
    cfg: MamlConfig,
    weights: Tensor | None,
    task_map: str,
) -> tuple[Params, Tensor, Tensor]:
    """batch_sums for iMAML: each task's implicit meta-gradient (core/implicit.py), summed."""
    loss = loss_fn(kind)
    names = list(params)

    def task(p: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, ...]:
        fs = bind(forward, ys)
        theta, pull = heads.started(forward, p, xs, ys)
        g, final, acc = implicit.meta_gradient(
            lambda q: loss(fs(q, xs), ys),
            _query(forward, kind, xq, yq),
            theta,
            cfg.imaml_lambda,
            cfg.inner_lr,
            cfg.inner_steps,
            cfg.imaml_cg_steps,
            cfg.imaml_damping,
            cfg.imaml_solver,
        )
        g = g if pull is None else pull(g)
        return (*(g[k] for k in names), final, acc)

    return _summed(names, *_per_task(task, params, batch, task_map), weights)


def _reptile_sums(
    forward: Forward,
    kind: str,
    params: Params,
    batch: TaskBatch,
    cfg: MamlConfig,
    weights: Tensor | None,
    task_map: str,
) -> tuple[Params, Tensor, Tensor]:
    """Reptile's direction, summed over tasks: theta - phi, phi the weights after the inner SGD
    on the task's support set (no meta-gradient: the learner's SGD step of size epsilon on the
    mean moves theta toward the mean phi). Metrics: the query loss at phi."""
    loss = loss_fn(kind)
    classification = kind == "classification"
    names = list(params)

    def task(p: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, ...]:
        phi = adapt(bind(forward, ys), kind, p, xs, ys, cfg.inner_steps, cfg.inner_lr, first_order=True)
        out = bind(forward, yq)(phi, xq)
        acc = accuracy_of(out, yq) if classification else out.new_zeros(())
        return (*(p[k] - phi[k].detach() for k in names), loss(out, yq).detach(), acc.detach())

    return _summed(names, *_per_task(task, params, batch, task_map), weights)


def _query(
    forward: Forward, kind: str, xq: Tensor, yq: Tensor
) -> Callable[[Params], tuple[Tensor, tuple[Tensor, Tensor]]]:
    """One task's query loss at the given (meta-)parameters, with (loss, accuracy) as metrics."""
    loss = loss_fn(kind)
    fq = bind(forward, yq)

    def query(q: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        out = fq(split_lrs(q)[0], xq)
        value = loss(out, yq)
        acc = accuracy_of(out, yq) if kind == "classification" else out.new_zeros(())
        return value, (value.detach(), acc.detach())

    return query


def _per_task(
    task: Callable[..., tuple[Tensor, ...]], params: Params, batch: TaskBatch, task_map: str
) -> tuple[list[Tensor], Tensor, Tensor]:
    """`task` (returning its per-parameter outputs, then loss and accuracy) over the batch's tasks
    at detached params: ([T, ...] per parameter, losses [T], accuracies [T])."""
    *outs, losses, accs = map_tasks(task, task_map)({k: v.detach() for k, v in params.items()}, *batch.tensors())
    return outs, losses, accs


def _summed(
    names: list[str], per_task: list[Tensor], losses: Tensor, accs: Tensor, weights: Tensor | None
) -> tuple[Params, Tensor, Tensor]:
    """Per-task outputs ([T, ...] each) summed over the tasks, each task counted weights[t]
    times (a padding task, weight 0, adds exactly nothing); losses and accuracies stay per task."""
    if weights is not None:
        per_task = [t * weights.view(-1, *[1] * (t.dim() - 1)) for t in per_task]
        losses, accs = losses * weights, accs * weights
    return {k: t.sum(0) for k, t in zip(names, per_task, strict=True)}, losses, accs


def meta_gradient(
    forward: Forward,
    kind: str,
    params: Params,
    batch: TaskBatch,
    cfg: MamlConfig,
    task_map: str = "vmap",
    before: bool = True,
    version: int = 0,
    groups: Sequence[str] | None = None,
) -> tuple[Params, dict[str, float]]:
    """The SUM over the batch's tasks of the per-task meta-gradients, and metric sums.

    Returning sums (not means) lets shards of any size be combined exactly: the learner divides
    by the total task count once. Metrics, summed over tasks: loss_after, and with `before` (the
    training loop asks for it on logged steps only) acc_after for classification and
    loss_before / acc_before, the query metrics of the initial weights: one more forward pass (at
    meta-batch 25 it was 15% of a sinusoid step). `version` (the meta-updates applied so far)
    places the step on MAML++'s schedules (step_plan). `groups` (one name per task, e.g. its
    source): also loss_after@name, acc_after@name and tasks@name, summed over that group's tasks.
    """
    plan = step_plan(cfg, version)
    light = cfg.algorithm in ("reptile", "imaml") or (cfg.checkpoint_inner and not plan.first_order)
    if task_map == "vmap" or light:  # Reptile, iMAML and the checkpointed path keep no graph across tasks
        grads, loss_vec, acc_vec = batch_vectors(forward, kind, params, batch, cfg, plan, None, task_map, before)
        loss_after, acc_after = loss_vec.sum(), acc_vec.sum()
    else:  # one task at a time: the memory of one task's graph, gradients summed in task order
        objective = _objective(
            forward, kind, cfg, plan, heads.anil_head(cfg, forward, list(split_lrs(params)[0])), before
        )

        def one_task(p: Params, *task: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            total, final, *acc = objective(p, *task)
            return total, (final, acc[0] if acc else final.new_zeros(()))

        per_task = grad(one_task, has_aux=True)
        grads = {k: torch.zeros_like(v) for k, v in params.items()}
        loss_after = acc_after = torch.zeros((), device=batch.x_query.device)
        losses, accs = [], []
        for i in range(len(batch)):
            g, (task_loss, acc) = per_task(params, *task_of(batch.tensors(), i))
            grads = {k: grads[k] + g[k] for k in grads}
            loss_after, acc_after = loss_after + task_loss, acc_after + acc
            losses.append(task_loss)
            accs.append(acc)
        loss_vec, acc_vec = torch.stack(losses), torch.stack(accs)
    metrics = {"loss_after": loss_after.item()}
    if kind == "classification" and before:  # accuracy: on logged steps only
        metrics["acc_after"] = acc_after.item()
    if groups is not None:
        metrics.update(by_group(groups, loss_vec, acc_vec if kind == "classification" and before else None))
    if before:
        metrics.update(metrics_before(forward, kind, params, batch, task_map))
    return grads, metrics


def metrics_before(forward: Forward, kind: str, params: Params, batch: TaskBatch, task_map: str) -> dict[str, float]:
    """loss_before (and acc_before) summed over tasks: the query loss of the unadapted weights."""
    loss = loss_fn(kind)
    classification = kind == "classification"

    def unadapted(p: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        started = heads.start(forward, p, xs, ys)  # the head's rows before any step (proto: the prototypes)
        out = bind(forward, yq)(split_lrs(started)[0], xq)  # per task: a BatchNorm model sees this task's examples only
        acc = accuracy_of(out, yq) if classification else out.new_zeros(())
        return loss(out, yq), acc

    with torch.no_grad():
        frozen = {k: v.detach() for k, v in params.items()}
        losses, accs = map_tasks(unadapted, task_map)(frozen, *batch.tensors())
    out = {"loss_before": losses.sum().item()}
    if classification:
        out["acc_before"] = accs.sum().item()
    return out
