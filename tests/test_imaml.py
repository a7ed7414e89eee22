"""iMAML (maml.algorithm = "imaml") against two oracles: the closed form of a linear-regression
task (float64), and textbook autograd through the unrolled proximal inner loop once it has
converged; the conjugate-gradient solver on its own; and through the training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distributed_maml.config import MamlConfig
from distributed_maml.core import implicit, maml

from .conftest import assert_user_error, run_cli, train_on

LAM, LR, STEPS = 2.0, 0.1, 100


def linear_forward(params, x):
    return x @ params["w"] + params["b"]


def _tasks(n_tasks=3, d=3, shots=6, queries=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(n_tasks, shots, d, generator=gen, dtype=torch.float64)
    xq = torch.randn(n_tasks, queries, d, generator=gen, dtype=torch.float64)
    w = torch.randn(n_tasks, d, 1, generator=gen, dtype=torch.float64)
    ys, yq = xs @ w + 0.1, xq @ w + 0.1
    theta = {"w": torch.randn(d, 1, generator=gen, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
    return maml.TaskBatch(xs, ys, xq, yq), theta


def _closed_form(batch, theta, damping: float = 0.0):
    """phi* = argmin mse(X phi, y) + lam/2 |phi - theta|^2 solves (H + lam I) phi = (2/n) X^T y + lam theta
    with H = (2/n) X^T X (X with a ones column for the bias); d phi*/d theta = lam (H + lam I)^-1, so the
    meta-gradient is lam (H + lam I)^-1 grad L_query(phi*) (H symmetric)."""
    th = np.concatenate([theta["w"].numpy()[:, 0], theta["b"].numpy()])
    total = np.zeros_like(th)
    for t in range(len(batch)):
        xs = np.concatenate([batch.x_support[t].numpy(), np.ones((batch.x_support.shape[1], 1))], 1)
        xq = np.concatenate([batch.x_query[t].numpy(), np.ones((batch.x_query.shape[1], 1))], 1)
        ys, yq = batch.y_support[t].numpy()[:, 0], batch.y_query[t].numpy()[:, 0]
        h = 2 / len(ys) * xs.T @ xs
        a = h + LAM * np.eye(len(th))
        phi = np.linalg.solve(a, 2 / len(ys) * xs.T @ ys + LAM * th)
        gq = 2 / len(yq) * xq.T @ (xq @ phi - yq)
        scale = LAM + damping  # the linear solve's (I + H / scale)^-1 = scale (H + scale I)^-1
        total += scale * np.linalg.solve(h + scale * np.eye(len(th)), gq)
    return total


def _flat(g):
    return np.concatenate([g["w"].numpy()[:, 0], g["b"].numpy()])


@pytest.mark.parametrize("task_map", ["vmap", "loop"])
def test_imaml_equals_the_closed_form_on_linear_regression(task_map):
    batch, theta = _tasks()
    cfg = MamlConfig(algorithm="imaml", inner_steps=STEPS, inner_lr=LR, imaml_lambda=LAM, imaml_cg_steps=6)
    g, _ = maml.meta_gradient(linear_forward, "regression", theta, batch, cfg, task_map, before=False)
    want = _closed_form(batch, theta)
    assert np.abs(_flat(g) - want).max() <= 1e-6 * np.abs(want).max(), (_flat(g), want)


def test_imaml_equals_autograd_through_the_converged_proximal_loop():
    """When the inner loop has converged, differentiating through every proximal step (textbook
    autograd, create_graph) gives the implicit meta-gradient."""
    batch, theta = _tasks(seed=1)
    cfg = MamlConfig(algorithm="imaml", inner_steps=STEPS, inner_lr=LR, imaml_lambda=LAM, imaml_cg_steps=6)
    g, _ = maml.meta_gradient(linear_forward, "regression", theta, batch, cfg, "vmap", before=False)
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    total = 0.0
    for t in range(len(batch)):
        phi = dict(leaves)
        for _ in range(STEPS):
            loss = F.mse_loss(linear_forward(phi, batch.x_support[t]), batch.y_support[t])
            gs = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {k: phi[k] - LR * (gi + LAM * (phi[k] - leaves[k])) for k, gi in zip(phi, gs)}
        total = total + F.mse_loss(linear_forward(phi, batch.x_query[t]), batch.y_query[t])
    oracle = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))
    for k in g:
        torch.testing.assert_close(g[k], oracle[k], rtol=1e-8, atol=1e-10)


def test_imaml_damping_solves_the_damped_system_and_tends_to_the_query_gradient():
    """imaml_damping d: the closed form with (I + H / (lam + d)) in the linear solve (phi* still
    the lam-proximal solution); a huge d gives the query loss's gradient at phi*."""
    batch, theta = _tasks(seed=2)
    for d, want in [(3.0, _closed_form(batch, theta, damping=3.0)), (1e12, _closed_form(batch, theta, damping=1e12))]:
        cfg = MamlConfig(
            algorithm="imaml", inner_steps=STEPS, inner_lr=LR, imaml_lambda=LAM, imaml_cg_steps=6, imaml_damping=d
        )
        g, _ = maml.meta_gradient(linear_forward, "regression", theta, batch, cfg, "vmap", before=False)
        assert np.abs(_flat(g) - want).max() <= 1e-6 * np.abs(want).max(), (d, _flat(g), want)
    with pytest.raises(Exception, match="imaml_damping must be a finite number >= 0"):
        MamlConfig(algorithm="imaml", imaml_damping=-1.0)


def test_conjugate_gradient_solves_a_spd_system_and_never_divides_by_zero():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    a = m @ m.T + 5 * torch.eye(5, dtype=torch.float64)
    b = {"x": torch.randn(5, generator=gen, dtype=torch.float64)}
    x = implicit.conjugate_gradient(lambda v: {"x": a @ v["x"]}, b, 5)
    torch.testing.assert_close(a @ x["x"], b["x"], rtol=1e-10, atol=1e-10)
    more = implicit.conjugate_gradient(lambda v: {"x": a @ v["x"]}, b, 12)  # past convergence: no NaN
    assert torch.isfinite(more["x"]).all()
    torch.testing.assert_close(more["x"], x["x"], rtol=1e-8, atol=1e-10)
    zero = implicit.conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": torch.zeros(5, dtype=torch.float64)}, 3)
    assert torch.equal(zero["x"], torch.zeros(5, dtype=torch.float64))


def test_an_imaml_run_learns_and_resumes_bit_identical(tmp_path, store_path):
    base = ["scaling.num_workers=0", "task.meta_batch=8", "maml.algorithm=imaml", "maml.inner_steps=5"]
    full, _ = train_on(tmp_path / "full", store_path, [*base, "training.steps=6"])
    half, _ = train_on(tmp_path / "half", store_path, [*base, "training.steps=3"])
    from distributed_maml.app import run, train

    r = run.resume(tmp_path / "half", None, ["training.steps=6"])
    resumed = train.train(r, train.make_executor(r), progress=False)
    assert np.array_equal(resumed.weights, full.weights) and not np.array_equal(half.weights, full.weights)


def test_imaml_options_out_of_range_are_one_line():
    for bad in ("maml.imaml_lambda=0", "maml.imaml_cg_steps=0", "maml.imaml_lambda=2.5"):  # x inner_lr 0.5 >= 1
        assert_user_error(
            run_cli("train", "--set", "maml.algorithm=imaml", "--set", bad, "--no-progress"), bad.split("=")[0]
        )
    with pytest.raises(Exception, match="first_order has no meaning for imaml"):
        MamlConfig(algorithm="imaml", first_order=True)
