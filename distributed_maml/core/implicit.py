"""Implicit MAML (iMAML, Rajeswaran et al. 2019): the meta-gradient of the query loss at the
solution of a proximal inner problem, by the implicit function theorem, without
differentiating through the inner steps (memory independent of their number).

For one task the inner loop approximately solves

    phi*(theta) = argmin_phi  L_support(phi) + (lambda / 2) ||phi - theta||^2

by `inner_steps` gradient steps from phi = theta (no graph kept; backtracking ones, whose size
adapts per task, by default: the implicit gradient is only right near phi*). At the
minimum, grad L_support(phi*) + lambda (phi* - theta) = 0, so d phi* / d theta = (I + H / lambda)^-1
with H the support loss's Hessian at phi*, and the meta-gradient is

    g = (I + H / lambda)^-1  grad L_query(phi*),

found by `imaml_cg_steps` steps of conjugate gradient on (I + H / lambda) g = grad L_query,
each needing one Hessian-vector product (reverse-over-reverse: one vjp of the support gradient,
whose graph at phi is built once). Everything is torch.func, so it runs under vmap, the per-task
loop and a CUDA graph.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vjp

from distributed_maml.config import MamlConfig

Params = dict[str, Tensor]
Loss = Callable[[Params], Tensor]  # phi -> the support loss
Query = Callable[[Params], tuple[Tensor, tuple[Tensor, Tensor]]]  # phi -> (query loss, (loss, accuracy))


@dataclass(frozen=True)
class Proximal:
    """iMAML's inner loop as evaluation runs it too: lam and the solver (maml.imaml_*)."""

    lam: float
    solver: str

    @classmethod
    def of(cls, cfg: MamlConfig) -> Proximal | None:
        """The run's proximal inner loop, or None where the algorithm adapts by plain steps."""
        return cls(cfg.imaml_lambda, cfg.imaml_solver) if cfg.algorithm == "imaml" else None

    def iterate(self, support: Loss, theta: Params, lr: float, steps: int) -> Iterator[Params]:
        """phi after each of `steps` steps of this inner loop from theta (module `iterate`)."""
        return iterate(support, theta, self.lam, lr, steps, self.solver)


def solve(support: Loss, theta: Params, lam: float, lr: float, steps: int, solver: str = "backtracking") -> Params:
    """phi after `steps` steps on support(phi) + lam/2 ||phi - theta||^2 from theta."""
    last = collections.deque(iterate(support, theta, lam, lr, steps, solver), maxlen=1)
    return last[0] if last else dict(theta)


def iterate(
    support: Loss, theta: Params, lam: float, lr: float, steps: int, solver: str = "backtracking"
) -> Iterator[Params]:
    """phi after each of `steps` steps on support(phi) + lam/2 ||phi - theta||^2 from theta:
    plain gradient steps of lr ("sgd"), or "backtracking" ones (below)."""
    if solver == "backtracking":
        yield from _backtracking(support, theta, lam, lr, steps)
        return
    phi = dict(theta)
    for _ in range(steps):
        g = grad(support)(phi)
        phi = {k: (phi[k] - lr * (g[k] + lam * (phi[k] - theta[k]))).detach() for k in phi}
        yield phi


GROW, SHRINK, ARMIJO = 1.25, 0.5, 1e-4


def _backtracking(support: Loss, theta: Params, lam: float, lr: float, steps: int) -> Iterator[Params]:
    """Gradient steps whose size adapts per task, from lr: a step that lowers the proximal
    objective F by at least ARMIJO x its first-order prediction is taken and the next one is
    GROW x longer; one that does not (or is not finite) is dropped and the next is SHRINK x
    shorter. F never rises, so on a sharply curved support loss (per-task BatchNorm over 5
    images) the loop settles where plain steps oscillate. One gradient-and-value of F per step,
    like a plain step; the choice is a torch.where, so the control flow does not depend on the
    data (vmap, CUDA graphs)."""

    def objective(phi: Params) -> Tensor:
        return support(phi) + 0.5 * lam * sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)

    phi = dict(theta)
    g, f = grad_and_value(objective)(phi)
    eta = torch.full_like(f, lr)
    for _ in range(steps):
        trial = {k: phi[k] - eta * g[k] for k in phi}
        g_trial, f_trial = grad_and_value(objective)(trial)
        ok = f_trial <= f - ARMIJO * eta * _dot(g, g)  # False for a non-finite trial
        phi = {k: torch.where(ok, trial[k], phi[k]).detach() for k in phi}
        g = {k: torch.where(ok, g_trial[k], g[k]).detach() for k in g}
        f = torch.where(ok, f_trial, f).detach()
        eta = torch.where(ok, eta * GROW, eta * SHRINK)
        yield phi


def meta_gradient(
    support: Loss,
    query: Query,
    theta: Params,
    lam: float,
    lr: float,
    steps: int,
    cg_steps: int,
    damping: float = 0.0,
    solver: str = "backtracking",
) -> tuple[Params, Tensor, Tensor]:
    """The implicit meta-gradient of one task at theta, and the query loss and accuracy at phi.
    `damping` > 0 solves (I + H / (lam + damping)) g = grad L_query instead (as iMAML's authors'
    code does, with 10): less of the Hessian, so a usable direction where the inner loop has not
    converged and the exact implicit one is not (damping -> infinity: the first-order grad L_query(phi))."""
    theta = {k: v.detach() for k, v in theta.items()}
    phi = solve(support, theta, lam, lr, steps, solver)
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
