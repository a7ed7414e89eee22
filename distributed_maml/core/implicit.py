"""Implicit MAML (iMAML, Rajeswaran et al. 2019): the meta-gradient of the query loss at the
solution of a proximal inner problem, by the implicit function theorem, without
differentiating through the inner steps (memory independent of their number).

For one task the inner loop approximately solves

    phi*(theta) = argmin_phi  L_support(phi) + (lambda / 2) ||phi - theta||^2

by `inner_steps` gradient steps of size inner_lr from phi = theta (no graph kept). At the
minimum, grad L_support(phi*) + lambda (phi* - theta) = 0, so d phi* / d theta = (I + H / lambda)^-1
with H the support loss's Hessian at phi*, and the meta-gradient is

    g = (I + H / lambda)^-1  grad L_query(phi*),

found by `imaml_cg_steps` steps of conjugate gradient on (I + H / lambda) g = grad L_query,
each needing one Hessian-vector product (reverse-over-reverse: one vjp of the support gradient,
whose graph at phi is built once). Everything is torch.func, so it runs under vmap, the per-task
loop and a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, vjp

Params = dict[str, Tensor]
Loss = Callable[[Params], Tensor]  # phi -> the support loss
Query = Callable[[Params], tuple[Tensor, tuple[Tensor, Tensor]]]  # phi -> (query loss, (loss, accuracy))


def solve(support: Loss, theta: Params, lam: float, lr: float, steps: int) -> Params:
    """phi after `steps` gradient steps on support(phi) + lam/2 ||phi - theta||^2 from theta."""
    phi = dict(theta)
    for _ in range(steps):
        g = grad(support)(phi)
        phi = {k: (phi[k] - lr * (g[k] + lam * (phi[k] - theta[k]))).detach() for k in phi}
    return phi


def meta_gradient(
    support: Loss, query: Query, theta: Params, lam: float, lr: float, steps: int, cg_steps: int, damping: float = 0.0
) -> tuple[Params, Tensor, Tensor]:
    """The implicit meta-gradient of one task at theta, and the query loss and accuracy at phi.
    `damping` > 0 solves (I + H / (lam + damping)) g = grad L_query instead (as iMAML's authors'
    code does, with 10): less of the Hessian, so a usable direction where the inner loop has not
    converged and the exact implicit one is not (damping -> infinity: the first-order grad L_query(phi))."""
    theta = {k: v.detach() for k, v in theta.items()}
    phi = solve(support, theta, lam, lr, steps)
    loss, pull, (final, acc) = vjp(query, phi, has_aux=True)
    (b,) = pull(torch.ones_like(loss))
    _, hessian = vjp(grad(support), phi)  # the support gradient's graph at phi, built once

    scale = lam + damping

    def apply(v: Params) -> Params:  # (I + H / scale) v; H is symmetric, so v^T H = (H v)^T
        (hv,) = hessian(v)
        return {k: v[k] + hv[k] / scale for k in v}

    return conjugate_gradient(apply, b, cg_steps), final, acc


def conjugate_gradient(apply: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """x with apply(x) = b (apply symmetric positive definite) after `steps` CG iterations from 0.
    Data-independent control flow (fixed steps, a converged direction adds 0, never 0/0), so it
    runs under vmap and in a CUDA graph."""
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rr = _dot(r, r)
    for _ in range(steps):
        ap = apply(p)
        pap = _dot(p, ap)
        alpha = torch.where(pap > 0, rr / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_new = _dot(r, r)
        beta = torch.where(rr > 0, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = {k: r[k] + beta * p[k] for k in p}
        rr = rr_new
    return x


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]
