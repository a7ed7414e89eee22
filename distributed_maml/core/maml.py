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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from distributed_maml.config import MamlConfig
from distributed_maml.core.models import Forward, ParamSpec
from distributed_maml.errors import ConfigError

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
    head: frozenset[str] | None = None,
    first_step: int = 0,
) -> Params:
    """`steps` SGD steps on one task's support set, differentiable (unless first_order). With
    `head` (ANIL) only those parameters move; the rest still carry the meta-gradient. Learned
    step sizes in `params` (LR_PREFIX entries: Meta-SGD's per element, MAML++'s per parameter
    and step, indexed from `first_step`) replace `lr`; they stay in the returned dict."""
    loss = loss_fn(kind)
    params, lrs = split_lrs(params)
    for i in range(first_step, first_step + steps):
        moving = params if head is None else {k: params[k] for k in head}

        def support_loss(q: Params, params: Params = params) -> Tensor:
            return loss(forward({**params, **q}, xs), ys)

        g = grad(support_loss)(moving)
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
        params = {k: params[k] - _step_size(lrs, k, i, lr) * g[k] if k in g else params[k] for k in params}
    return {**params, **lrs}


LR_PREFIX = "inner_lr"  # learned inner step sizes ride in the meta-parameters under these names:
PER_ELEMENT = "inner_lr:"  # + a parameter's name: Meta-SGD, one step size per element
PER_STEP = "inner_lr_step:"  # + a parameter's name: MAML++'s LSLR, one per tensor and inner step


def split_lrs(params: Params) -> tuple[Params, Params]:
    """(the model's parameters, the learned step sizes) of a meta-parameter dict."""
    model = {k: v for k, v in params.items() if not k.startswith(LR_PREFIX)}
    return model, {k: v for k, v in params.items() if k.startswith(LR_PREFIX)}


def _step_size(lrs: Params, name: str, step: int, default: float) -> Tensor | float:
    """Parameter `name`'s step size at inner step `step`: Meta-SGD's tensor (its shape), or
    MAML++'s per-step scalar (steps past the trained ones take the last), or `default`."""
    if PER_ELEMENT + name in lrs:
        return lrs[PER_ELEMENT + name]
    if PER_STEP + name in lrs:
        per_step = lrs[PER_STEP + name]
        return per_step[min(step, per_step.shape[0] - 1)]
    return default


def learned_lr_shapes(cfg: MamlConfig, spec: ParamSpec) -> dict[str, tuple[int, ...]]:
    """The learned step sizes `cfg` asks for, by name: Meta-SGD one per weight element (the
    parameter's shape), MAML++'s LSLR one per parameter tensor and inner step ([inner_steps])."""
    if cfg.algorithm == "meta-sgd":
        return {PER_ELEMENT + n: s for n, s in zip(spec.names, spec.shapes, strict=True)}
    if cfg.learn_inner_lr == "per-layer-per-step":
        return {PER_STEP + n: (cfg.inner_steps,) for n in spec.names}
    return {}


def meta_spec(cfg: MamlConfig, spec: ParamSpec) -> ParamSpec:
    """The meta-parameters' layout: the model's, then the learned step sizes (if any)."""
    extra = learned_lr_shapes(cfg, spec)
    return ParamSpec(spec.names + tuple(extra), spec.shapes + tuple(extra.values()))


def with_learned_lrs(cfg: MamlConfig, params: Params, value: float) -> Params:
    """`params` with every learned step size `cfg` asks for that it lacks, set to `value` (a
    run's start, or a baseline evaluated at a fixed step size)."""
    model, _ = split_lrs(params)
    spec = ParamSpec(tuple(model), tuple(tuple(v.shape) for v in model.values()))
    like = next(iter(model.values()))
    extra = {
        k: torch.full(shape, value, dtype=like.dtype, device=like.device)
        for k, shape in learned_lr_shapes(cfg, spec).items()
        if k not in params
    }
    return {**params, **extra}


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


def head_of(cfg: MamlConfig, names: Sequence[str]) -> frozenset[str] | None:
    """The parameters ANIL's inner loop adapts (None: all, for every other algorithm): those
    named with the prefix `anil_head`, by default the last layer's."""
    if cfg.algorithm != "anil":
        return None
    prefix = cfg.anil_head or (names[-1].rsplit(".", 1)[0] + "." if "." in names[-1] else names[-1])
    head = frozenset(n for n in names if n.startswith(prefix) or n == prefix)
    if not head or len(head) == len(names):
        raise ConfigError(
            f"maml.anil_head {prefix!r} names {'no' if not head else 'every'} parameter of this model "
            f"({', '.join(names)}); name the head's prefix, e.g. {names[-1].rsplit('.', 1)[0] + '.'!r}"
        )
    return head


def _objective(
    forward: Forward, kind: str, cfg: MamlConfig, plan: StepPlan, head: frozenset[str] | None
) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """One task's meta-objective (the query loss after adaptation, or MAML++'s weighted sum of
    the query losses after every inner step), its final query loss and accuracy (metrics)."""
    loss = loss_fn(kind)
    classification = kind == "classification"

    def task_objective(p: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        objective: Tensor | float = 0.0
        adapted = p
        for i in range(cfg.inner_steps):
            adapted = adapt(forward, kind, adapted, xs, ys, 1, cfg.inner_lr, plan.first_order, head, first_step=i)
            if plan.weights is not None and i < cfg.inner_steps - 1:
                objective = objective + plan.weights[i] * loss(forward(split_lrs(adapted)[0], xq), yq)
        out = forward(split_lrs(adapted)[0], xq)
        final = loss(out, yq)
        total = final if plan.weights is None else objective + plan.weights[-1] * final
        acc = (out.argmax(-1) == yq).to(out.dtype).mean() if classification else out.new_zeros(())
        return total, final.detach(), acc.detach()

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
) -> tuple[Params, Tensor, Tensor]:
    """The batched core of `meta_gradient`, tensors only (no host sync, so a CUDA graph can
    capture it): the summed meta-gradient (Reptile: the summed theta - phi), the final query
    loss sum and accuracy sum over the batch's tasks, each task counted `weights[t]` times (a
    padding task, weight 0, adds exactly nothing)."""
    if cfg.algorithm == "reptile":
        return _reptile_sums(forward, kind, params, batch, cfg, weights, task_map)
    objective = _objective(forward, kind, cfg, plan, head_of(cfg, list(split_lrs(params)[0])))

    def batch_objective(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        totals, losses, accs = map_tasks(objective, task_map)(p, *batch.tensors())
        if weights is not None:
            totals, losses, accs = totals * weights, losses * weights, accs * weights
        return totals.sum(), (losses.sum(), accs.sum())

    grads, (loss_sum, acc_sum) = grad(batch_objective, has_aux=True)(params)
    return grads, loss_sum, acc_sum


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
        phi = adapt(forward, kind, p, xs, ys, cfg.inner_steps, cfg.inner_lr, first_order=True)
        out = forward(phi, xq)
        acc = (out.argmax(-1) == yq).to(out.dtype).mean() if classification else out.new_zeros(())
        return (*(p[k] - phi[k].detach() for k in names), loss(out, yq).detach(), acc.detach())

    *diffs, losses, accs = map_tasks(task, task_map)({k: v.detach() for k, v in params.items()}, *batch.tensors())
    if weights is not None:
        diffs = [d * weights.view(-1, *[1] * (d.dim() - 1)) for d in diffs]
        losses, accs = losses * weights, accs * weights
    return {k: d.sum(0) for k, d in zip(names, diffs, strict=True)}, losses.sum(), accs.sum()


def meta_gradient(
    forward: Forward,
    kind: str,
    params: Params,
    batch: TaskBatch,
    cfg: MamlConfig,
    task_map: str = "vmap",
    before: bool = True,
    version: int = 0,
) -> tuple[Params, dict[str, float]]:
    """The SUM over the batch's tasks of the per-task meta-gradients, and metric sums.

    Returning sums (not means) lets shards of any size be combined exactly: the learner divides
    by the total task count once. Metrics, summed over tasks: loss_after (and acc_after for
    classification), and with `before` loss_before / acc_before, the query loss of the initial
    weights: one more forward pass, which the training loop asks for on logged steps only (at
    meta-batch 25 it was 15% of a sinusoid step). `version` (the meta-updates applied so far)
    places the step on MAML++'s schedules (step_plan).
    """
    plan = step_plan(cfg, version)
    if task_map == "vmap" or cfg.algorithm == "reptile":  # Reptile keeps no graph: its loop is light
        grads, loss_after, acc_after = batch_sums(forward, kind, params, batch, cfg, plan, task_map=task_map)
    else:  # one task at a time: the memory of one task's graph, gradients summed in task order
        objective = _objective(forward, kind, cfg, plan, head_of(cfg, list(split_lrs(params)[0])))

        def one_task(p: Params, *task: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            total, final, acc = objective(p, *task)
            return total, (final, acc)

        per_task = grad(one_task, has_aux=True)
        grads = {k: torch.zeros_like(v) for k, v in params.items()}
        loss_after = acc_after = torch.zeros((), device=batch.x_query.device)
        for i in range(len(batch)):
            g, (task_loss, acc) = per_task(params, *(t[i] for t in batch.tensors()))
            grads = {k: grads[k] + g[k] for k in grads}
            loss_after, acc_after = loss_after + task_loss, acc_after + acc
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
        out = forward(split_lrs(p)[0], xq)  # per task: a BatchNorm model sees this task's examples only
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
    forward: Forward,
    kind: str,
    params: Params,
    batch: TaskBatch,
    max_steps: int,
    lr: float,
    task_map: str = "vmap",
    head: frozenset[str] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-task query loss (and accuracy) after 0..max_steps inner steps: [T, max_steps + 1]
    (`head`: ANIL's, the only parameters that adapt; learned step sizes in `params` replace
    `lr`)."""
    loss = loss_fn(kind)
    classification = kind == "classification"

    def curve(p: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        losses, accs = [], []
        for step in range(max_steps + 1):
            if step:
                p = adapt(forward, kind, p, xs, ys, 1, lr, first_order=True, head=head, first_step=step - 1)
            out = forward(split_lrs(p)[0], xq)
            losses.append(loss(out, yq))
            accs.append((out.argmax(-1) == yq).to(out.dtype).mean() if classification else losses[-1])
        return torch.stack(losses), torch.stack(accs)

    frozen = {k: v.detach() for k, v in params.items()}
    losses, accs = map_tasks(curve, task_map)(frozen, batch.x_support, batch.y_support, batch.x_query, batch.y_query)
    return losses.detach(), accs.detach() if classification else None
