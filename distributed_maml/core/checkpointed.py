"""The second-order meta-gradient through K inner steps with memory that does not grow with K
(maml.checkpoint_inner): reverse mode by hand, recomputing one inner step at a time.

The plain path lets autograd record all K inner steps (each a support forward, its gradient and
the graph to differentiate that gradient again) and keeps every activation until the outer
backward: memory linear in K. Here the forward pass keeps only each step's weights theta_0 ..
theta_K (no graph), and the backward pass walks the steps in reverse: for step i it rebuilds that
one step's graph from theta_i (torch.func.vjp), pulls the adjoint dL/dtheta_{i+1} back to
dL/dtheta_i (a Hessian-vector product), and frees it. Peak memory: one step's graph plus K + 1
weight copies per task; cost: one extra support forward and backward per step.

Everything is torch.func (vjp inside the caller's vmap or per-task loop): no torch.autograd
state is kept between steps, so the same code runs under vmap, the loop and a CUDA graph.
torch.utils.checkpoint is not used: it is built on autograd's saved-tensor hooks, which the
torch.func transforms (grad, vjp, vmap) do not go through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import vjp

Params = dict[str, Tensor]
Step = Callable[[Params, int], Params]  # (theta_i, i) -> theta_{i+1}, differentiable
Query = Callable[[Params], tuple[Tensor, tuple[Tensor, Tensor]]]  # theta -> (query loss, (loss, accuracy))


def meta_gradient(
    params: Params,
    step: Step,
    query: Query,
    inner_steps: int,
    weights: Sequence[float] | None = None,
    recompute: bool = False,
) -> tuple[Params, Tensor, Tensor]:
    """d/d(params) of the query loss after `inner_steps` steps (or, with `weights`, MAML++'s
    sum of weights[i] x the query loss after step i + 1), for one task; and the final query loss
    and accuracy. Equal to differentiating through the unrolled loop (tested in float64).
    `recompute`: keep only the initial weights and recompute theta_i from them when step i is
    pulled back (memory flat in K; K(K-1)/2 more steps; the same operations, so the same bits)."""
    initial = {k: v.detach() for k, v in params.items()}

    def advance(theta: Params, first: int, last: int) -> Params:
        for i in range(first, last):  # the weights after steps first..last-1, no graph kept
            theta = {k: v.detach() for k, v in step(theta, i).items()}
        return theta

    states = [initial]
    if recompute:
        final_state = advance(initial, 0, inner_steps)
    else:
        for i in range(inner_steps):
            states.append(advance(states[-1], i, i + 1))
        final_state = states[-1]
    adjoint, (final, acc) = _query_grad(query, final_state, 1.0 if weights is None else weights[-1])
    del final_state
    for i in reversed(range(inner_steps)):
        theta_i = advance(initial, 0, i) if recompute else states.pop(i)
        out, pull = vjp(lambda q, i=i: step(q, i), theta_i)  # this step's graph only, rebuilt
        del out
        (adjoint,) = pull(adjoint)
        del pull  # freed before the next step is rebuilt: one step's graph alive at a time, not two
        if weights is not None and i > 0:  # MAML++: the query loss after step i counts too
            extra, _ = _query_grad(query, theta_i, weights[i - 1])
            adjoint = {k: adjoint[k] + extra[k] for k in adjoint}
        del theta_i
    return adjoint, final, acc


def _query_grad(query: Query, theta: Params, scale: float) -> tuple[Params, tuple[Tensor, Tensor]]:
    """scale x the query loss's gradient at theta (zero for entries it does not use: the learned
    step sizes), and the (loss, accuracy) metrics there."""
    loss, pull, metrics = vjp(query, theta, has_aux=True)
    (g,) = pull(torch.full_like(loss, scale))
    return g, metrics
