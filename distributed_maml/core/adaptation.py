"""Adapting a meta-learned initialisation to new tasks, as evaluation does: the product of a run.

`inner_iterates` is the one test-time inner loop: `adaptation_curve` (eval's curves) and the
public API (`MetaModel.adapt`, `adapt`, `serve`) both step through it, so a run's own algorithm
adapts the same way everywhere: learned step sizes (Meta-SGD, MAML++'s LSLR) replace the step
size, ANIL moves its head only, iMAML takes its proximal steps, and a network with per-task
BatchNorm normalises each task's support and query sets with their own statistics. No graph is
kept (first order): nothing here needs a meta-gradient.

A task may have fewer ways than the network has outputs: `class_mask` (0 for the task's classes,
-inf for the rest) is added to every output, so the missing classes take no probability in the
inner loop's loss and are never predicted.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.func import vmap

from distributed_maml.core import heads, implicit
from distributed_maml.core.inner import Params, TaskBatch, accuracy, adapt, bind, loss_fn, map_tasks, split_lrs
from distributed_maml.core.models import Forward


def inner_iterates(
    forward: Forward,
    kind: str,
    params: Params,
    xs: Tensor,
    ys: Tensor,
    steps: int,
    lr: float,
    head: frozenset[str] | None = None,
    proximal: implicit.Proximal | None = None,
) -> Iterator[Params]:
    """One task's meta-parameters after each of inner steps 1..`steps` (the run's inner loop at
    test time: plain steps of `lr` or the learned sizes in `params`, `head` only for ANIL, or
    iMAML's `proximal` steps from `lr`)."""
    loss = loss_fn(kind)
    forward = bind(forward, ys)  # a padded support set's BatchNorm: its real examples only
    prox = proximal and proximal.iterate(lambda q: loss(forward(q, xs), ys), params, lr, steps)
    for step in range(1, steps + 1):
        params = next(prox) if prox else adapt(forward, kind, params, xs, ys, 1, lr, True, head, first_step=step - 1)
        yield params


def masked(forward: Forward, class_mask: Tensor | None) -> Forward:
    """`forward` with `class_mask` added to its outputs (None: unchanged)."""
    if class_mask is None:
        return forward
    return lambda p, x: forward(p, x) + class_mask


def adapt_tasks(
    forward: Forward,
    kind: str,
    params: Params,
    xs: Tensor,
    ys: Tensor,
    steps: int,
    lr: float,
    task_map: str = "vmap",
    head: frozenset[str] | None = None,
    proximal: implicit.Proximal | None = None,
    class_mask: Tensor | None = None,
    width: int | None = None,
) -> Params:
    """The network's parameters adapted to each task of xs [T, N, ...], ys [T, N(, O)]: each
    [T, ...] (learned step sizes dropped). The meta-parameters are not touched. With a head
    of any ways (maml.head unicorn or proto) a task starts with `width` rows (its ways)."""
    fwd = masked(forward, class_mask)

    def one(p: Params, xs: Tensor, ys: Tensor) -> tuple[Tensor, ...]:
        p = heads.start(forward, p, xs, ys, width)
        q = collections.deque(inner_iterates(fwd, kind, p, xs, ys, steps, lr, head, proximal), maxlen=1)
        model = split_lrs(q[0] if q else p)[0]
        return tuple(model[k] for k in names)

    frozen = {k: v.detach() for k, v in params.items()}
    names = heads.started_names(forward, list(split_lrs(frozen)[0]))
    with torch.no_grad() if steps == 0 else torch.enable_grad():  # the inner loop takes gradients
        out = map_tasks(one, task_map)(frozen, xs, ys)
    return {k: v.detach() for k, v in zip(names, out, strict=True)}


def task_outputs(
    forward: Forward, adapted: Params, xq: Tensor, task_map: str = "vmap", class_mask: Tensor | None = None
) -> Tensor:
    """Each task's outputs on its own queries xq [T, Q, ...] with its adapted parameters (each
    [T, ...]): [T, Q, O]. A task's queries are one batch (per-task BatchNorm: their statistics,
    as training and evaluation scored query sets)."""
    fwd = masked(forward, class_mask)
    with torch.no_grad():
        if task_map == "vmap":
            return vmap(fwd, in_dims=(0, 0))(adapted, xq)
        return torch.stack([fwd({k: v[i] for k, v in adapted.items()}, xq[i]) for i in range(xq.shape[0])])


def adaptation_curve(
    forward: Forward,
    kind: str,
    params: Params,
    batch: TaskBatch,
    steps: Sequence[int],
    lr: float,
    task_map: str = "vmap",
    head: frozenset[str] | None = None,
    proximal: implicit.Proximal | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-task query loss (and accuracy) after each of `steps` inner steps (ascending, distinct):
    [T, len(steps)] (`head`: ANIL's, the only parameters that adapt; learned step sizes in
    `params` replace `lr`; `proximal`: iMAML's inner loop, from lr, as it trained). The query set
    is scored only at those counts: with 15 queries per class it is 15x the support set, so
    scoring 0..10 cost 2.2x scoring 0, 1, 5 and 10."""
    loss = loss_fn(kind)
    classification = kind == "classification"
    if not steps or list(steps) != sorted(set(steps)) or steps[0] < 0:
        raise ValueError(f"steps must be distinct inner-step counts >= 0 in ascending order, got {list(steps)}")

    def curve(p: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        losses, accs = [], []
        p = heads.start(forward, p, xs, ys)  # the head's rows (maml.head), as training started them
        iterates = inner_iterates(forward, kind, p, xs, ys, steps[-1], lr, head, proximal)
        fq = bind(forward, yq)
        for step, q in enumerate(itertools.chain([p], iterates)):  # the API's inner loop: the same bits
            if step not in steps:
                continue
            out = fq(split_lrs(q)[0], xq)
            losses.append(loss(out, yq))
            accs.append(accuracy(out, yq) if classification else losses[-1])
        return torch.stack(losses), torch.stack(accs)

    frozen = {k: v.detach() for k, v in params.items()}
    losses, accs = map_tasks(curve, task_map)(frozen, batch.x_support, batch.y_support, batch.x_query, batch.y_query)
    return losses.detach(), accs.detach() if classification else None
