"""iMAML (maml.algorithm = "imaml") against two oracles: the closed form of a linear-regression
task (float64), and textbook autograd through the unrolled proximal inner loop once it has
converged; the conjugate-gradient solver on its own; and through the training loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distributed_maml.config import MamlConfig
from distributed_maml.core import implicit, maml

from .conftest import assert_user_error, cli_in_process, run_cli, train_on

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


@pytest.mark.parametrize(
    "task_map,solver", [("vmap", "sgd"), ("loop", "sgd"), ("vmap", "backtracking"), ("loop", "backtracking")]
)
def test_imaml_equals_the_closed_form_on_linear_regression(task_map, solver):
    batch, theta = _tasks()
    cfg = MamlConfig(
        algorithm="imaml", inner_steps=STEPS, inner_lr=LR, imaml_lambda=LAM, imaml_cg_steps=6, imaml_solver=solver
    )
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


def test_the_backtracking_inner_solver_converges_where_plain_steps_diverge():
    """A proximal problem curved far beyond 2 / inner_lr (support loss 0.5 phi^T A phi, A's
    eigenvalues 60 and 20): plain steps of 0.1 blow up, backtracking ones never raise the
    objective (each k-step solve is a prefix of the (k+1)-step one) and reach its minimiser
    phi* = lam (A + lam I)^-1 theta; also per task under vmap."""
    a = torch.diag(torch.tensor([60.0, 20.0], dtype=torch.float64))
    theta = {"x": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    lam = 1.0

    def support(p):
        return 0.5 * p["x"] @ a @ p["x"]

    def objective(p):
        return support(p) + 0.5 * lam * ((p["x"] - theta["x"]) ** 2).sum()

    plain = implicit.solve(support, theta, lam, 0.1, 40, "sgd")
    assert not (objective(plain) < objective(theta))  # diverged (or overflowed)
    values = [float(objective(implicit.solve(support, theta, lam, 0.1, k, "backtracking"))) for k in range(41)]
    assert all(b <= a_ for a_, b in zip(values, values[1:])), values
    phi = implicit.solve(support, theta, lam, 0.1, 40, "backtracking")["x"]
    want = lam * torch.linalg.solve(a + lam * torch.eye(2, dtype=torch.float64), theta["x"])
    torch.testing.assert_close(phi, want, rtol=1e-6, atol=1e-8)
    thetas = {"x": torch.stack([theta["x"], 3 * theta["x"]])}  # two tasks: the same solve, per task
    both = torch.func.vmap(lambda t: implicit.solve(support, t, lam, 0.1, 40, "backtracking"))(thetas)["x"]
    torch.testing.assert_close(both, torch.stack([want, 3 * want]), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("task_map", ["vmap", "loop"])
def test_held_out_tasks_adapt_by_the_proximal_inner_loop_the_run_trained_with(task_map):
    """An iMAML initialisation is evaluated (and validated) as it was trained: the adaptation
    curve after k steps is the query loss at phi_k of the proximal solver, task by task."""
    batch, theta = _tasks(seed=3)
    cfg = MamlConfig(algorithm="imaml", inner_lr=0.05, imaml_lambda=LAM)
    prox = implicit.Proximal.of(cfg)
    assert prox == implicit.Proximal(LAM, "backtracking") and implicit.Proximal.of(MamlConfig()) is None
    got, _ = maml.adaptation_curve(linear_forward, "regression", theta, batch, [0, 2, 7], 0.05, task_map, None, prox)
    for t in range(len(batch)):

        def support(p, t=t):
            return F.mse_loss(linear_forward(p, batch.x_support[t]), batch.y_support[t])

        for j, k in enumerate([0, 2, 7]):
            phi = implicit.solve(support, theta, LAM, 0.05, k)
            want = F.mse_loss(linear_forward(phi, batch.x_query[t]), batch.y_query[t])
            torch.testing.assert_close(got[t, j], want, rtol=1e-10, atol=1e-12)
    plain, _ = maml.adaptation_curve(linear_forward, "regression", theta, batch, [0, 2, 7], 0.05, task_map)
    assert not torch.equal(plain[:, 1:], got[:, 1:])  # SGD steps without the proximal pull differ


def test_a_worker_scores_an_imaml_run_with_its_proximal_inner_loop(store_path):
    from distributed_maml.config import ModelConfig
    from distributed_maml.data.store import TaskStore
    from distributed_maml.execution.computer import ShardComputer

    store, ids, cfg = TaskStore.open(store_path), np.arange(6), MamlConfig(algorithm="imaml", imaml_lambda=0.5)
    computer = ShardComputer(store, ModelConfig(), cfg)
    weights = computer.spec.flatten(dict(computer.model.named_parameters())).detach().numpy()
    params = computer.spec.unflatten(torch.from_numpy(weights))
    got, _ = computer.curve(weights, ids, [0, 3], 0.1)
    want, _ = maml.adaptation_curve(
        computer.forward, store.info.kind, params, computer.batch(ids), [0, 3], 0.1, proximal=implicit.Proximal.of(cfg)
    )
    np.testing.assert_array_equal(got, want.numpy())


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
    from distributed_maml.training import run, train

    r = run.resume(tmp_path / "half", None, ["training.steps=6"])
    resumed = train.train(r, train.make_executor(r), progress=False)
    assert np.array_equal(resumed.weights, full.weights) and not np.array_equal(half.weights, full.weights)


def test_a_run_saved_before_imaml_solver_existed_resumes_with_plain_steps():
    from pathlib import Path

    from distributed_maml.config import Config
    from distributed_maml.data.sampler import Sampler
    from distributed_maml.training.checkpoint import RunState, StoreRef

    state = RunState(Config(), Sampler(0, 10, 2), StoreRef("s.arrow", "seed", 0, 2, 10))
    data = state.to_json()
    assert RunState.from_json(data, Path("x")).config.maml.imaml_solver == "backtracking"  # saved: kept
    del data["config"]["maml"]["imaml_solver"]
    assert RunState.from_json(data, Path("x")).config.maml.imaml_solver == "sgd"


def test_imaml_options_out_of_range_are_one_line(tmp_path, capsys):
    """The CLI's error path in this interpreter (one fresh interpreter per case cost 4 s; the
    shell's view of a bad value is test_reliability's)."""
    for bad in ("maml.imaml_lambda=0", "maml.imaml_cg_steps=0", "maml.imaml_lambda=2.5"):  # x inner_lr 0.5 >= 1
        out = tmp_path / "r"
        proc = cli_in_process(capsys, "train", "--set", "maml.algorithm=imaml", "--set", bad, "--output-dir", out)
        assert_user_error(proc, bad.split("=")[0])
        assert not out.exists()
    with pytest.raises(Exception, match="maml.imaml_solver must be one of sgd, backtracking, got 'newton'"):
        MamlConfig(algorithm="imaml", imaml_solver="newton")
    with pytest.raises(Exception, match="first_order has no meaning for imaml"):
        MamlConfig(algorithm="imaml", first_order=True)


@pytest.mark.slow
def test_an_imaml_glyph_run_beats_scratch_through_the_cli(tmp_path):
    """The 2-core demonstration (about 4 minutes): jobs/glyphs-imaml.toml as shipped (10
    backtracking proximal steps, lambda 0.5, exact implicit gradient) at 50 meta-steps beats
    the scratch baseline after 10 inner steps on held-out tasks, the two 95% intervals apart
    (measured 0.912 +- 0.010 against 0.867 +- 0.013 on 2 cores)."""
    out = tmp_path / "imaml"
    sets = ["training.steps=50", "training.eval_every=0"]
    train = run_cli(
        "train", "--config", "jobs/glyphs-imaml.toml", "--output-dir", out, "--no-progress",
        *[a for s in sets for a in ("--set", s)], timeout=1200,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    ev = run_cli(
        "eval", "--run", out, "--steps", "0,10", "--num-tasks", "200", "--no-pretrained", "--json", timeout=1200
    )
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout)
    scratch = res["baselines"]["scratch"]
    assert res["accuracy_mean"][1] - res["accuracy_ci95"][1] > scratch["accuracy_mean"][1] + scratch["accuracy_ci95"][1]
