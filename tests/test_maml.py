"""The meta-gradient against two oracles: central finite differences in float64, and an
explicit per-task loop with torch.autograd.grad(create_graph=True) written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distributed_maml.config import MamlConfig, ModelConfig
from distributed_maml.core import maml, models
from distributed_maml.data.writing import build_in_memory
from distributed_maml.errors import ConfigError

CASES = [("seed", "seed_mlp"), ("sinusoid", "sinusoid_mlp")]


def setup(family: str, model_name: str, tasks: int = 3, dtype=torch.float64, shots=3, queries=4):
    store = build_in_memory(family, tasks, seed=11, shots=shots, queries=queries, split="train")
    model = models.build(ModelConfig(name=model_name), store.info, seed=5, dtype=dtype)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = maml.TaskBatch.from_numpy(store.rows(np.arange(tasks)), dtype=dtype)
    return store.info.kind, model, params, batch


def task_loss(kind, out, y):
    return F.cross_entropy(out, y) if kind == "classification" else F.mse_loss(out, y)


def forward(params, x):
    """The MLP written out by hand: the oracle must not share the product's forward."""
    names = list(params)
    for i in range(0, len(names), 2):
        x = x @ params[names[i]].T + params[names[i + 1]]
        if i + 2 < len(names):
            x = torch.relu(x)
    return x


def loop_objective(kind, params, batch, cfg: MamlConfig, first_order: bool = False):
    """Sum over tasks of the query loss after the inner loop, one task at a time."""
    total = 0.0
    for t in range(len(batch)):
        p = dict(params)
        for _ in range(cfg.inner_steps):
            loss = task_loss(kind, forward(p, batch.x_support[t]), batch.y_support[t])
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
            p = {k: v - cfg.inner_lr * g for (k, v), g in zip(p.items(), grads)}
        total = total + task_loss(kind, forward(p, batch.x_query[t]), batch.y_query[t])
    return total


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


@pytest.mark.parametrize("family, model_name", CASES)
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_second_order_matches_finite_differences(family, model_name, inner_steps):
    kind, model, params, batch = setup(family, model_name)
    cfg = MamlConfig(inner_steps=inner_steps, inner_lr=0.1, first_order=False)
    g, _ = maml.meta_gradient(models.functional(model), kind, params, batch, cfg)
    g = flat(g)
    spec = models.ParamSpec.of(model)
    theta = flat(params)
    rng = np.random.default_rng(0)
    eps = 1e-6
    # Random directions test every coordinate at once; single coordinates test the layout.
    directions = [torch.from_numpy(rng.normal(size=theta.numel())) for _ in range(3)]
    directions += [
        torch.nn.functional.one_hot(torch.tensor(i), theta.numel()).double()
        for i in rng.choice(theta.numel(), 8, replace=False)
    ]
    for d in directions:
        fd = (_value(kind, spec, theta + eps * d, batch, cfg) - _value(kind, spec, theta - eps * d, batch, cfg)) / (
            2 * eps
        )
        assert float(g @ d) == pytest.approx(fd, rel=1e-5, abs=1e-7)


def _value(kind, spec, vec, batch, cfg):
    """The meta-objective at vec (the inner loop needs autograd, so the leaves require grad)."""
    p = {k: v.clone().requires_grad_(True) for k, v in spec.unflatten(vec).items()}
    return float(loop_objective(kind, p, batch, cfg).detach())


@pytest.mark.parametrize("family, model_name", CASES)
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_first_order_matches_finite_differences_at_the_adapted_weights(family, model_name, inner_steps):
    """FOMAML's meta-gradient is grad L_query at theta_k with theta_k held fixed."""
    kind, model, params, batch = setup(family, model_name)
    cfg = MamlConfig(inner_steps=inner_steps, inner_lr=0.1, first_order=True)
    g = flat(maml.meta_gradient(models.functional(model), kind, params, batch, cfg)[0])
    spec = models.ParamSpec.of(model)
    rng = np.random.default_rng(1)
    d = torch.from_numpy(rng.normal(size=g.numel()))
    eps, fd = 1e-6, 0.0
    for t in range(len(batch)):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        for _ in range(inner_steps):
            loss = task_loss(kind, forward(p, batch.x_support[t]), batch.y_support[t])
            grads = torch.autograd.grad(loss, list(p.values()))
            p = {k: (v - cfg.inner_lr * gr).detach().requires_grad_(True) for (k, v), gr in zip(p.items(), grads)}
        theta_k = flat(p).detach()
        with torch.no_grad():
            up = task_loss(kind, forward(spec.unflatten(theta_k + eps * d), batch.x_query[t]), batch.y_query[t])
            down = task_loss(kind, forward(spec.unflatten(theta_k - eps * d), batch.x_query[t]), batch.y_query[t])
        fd += float(up - down) / (2 * eps)
    assert float(g @ d) == pytest.approx(fd, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("family, model_name", CASES)
@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_matches_a_per_task_loop(family, model_name, first_order):
    kind, model, params, batch = setup(family, model_name, tasks=6, dtype=torch.float32, shots=5, queries=5)
    cfg = MamlConfig(inner_steps=2, inner_lr=0.05, first_order=first_order)
    g, metrics = maml.meta_gradient(models.functional(model), kind, params, batch, cfg)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    total = loop_objective(kind, leaves, batch, cfg, first_order=first_order)
    expected = torch.autograd.grad(total, list(leaves.values()))
    torch.testing.assert_close(flat(g), flat(dict(zip(leaves, expected))), rtol=2e-5, atol=2e-6)
    assert metrics["loss_after"] == pytest.approx(float(total.detach()), rel=1e-5)
    before = sum(float(task_loss(kind, forward(params, batch.x_query[t]), batch.y_query[t])) for t in range(6))
    assert metrics["loss_before"] == pytest.approx(before, rel=1e-5)


@pytest.mark.parametrize("family, model_name", CASES)
@pytest.mark.parametrize("first_order", [False, True])
def test_benchs_minimal_script_computes_the_per_task_loops_meta_gradient(family, model_name, first_order):
    """`bench`'s bare row (bench/minimal_script.py): the mean meta-gradient its step leaves in .grad
    is the hand-written loop's, and the project's (float64)."""
    from distributed_maml.bench import minimal_script

    kind, model, params, batch = setup(family, model_name, tasks=4)
    cfg = MamlConfig(inner_steps=2, inner_lr=0.05, first_order=first_order)
    step, script = minimal_script.make_step(model, 2, 0.05, first_order, lambda o, y: task_loss(kind, o, y))
    step(batch.tensors())
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    expected = torch.autograd.grad(loop_objective(kind, leaves, batch, cfg, first_order), list(leaves.values()))
    got = flat({k: v.grad for k, v in script.items()})
    torch.testing.assert_close(got, flat(dict(zip(leaves, expected))) / 4, rtol=1e-10, atol=1e-12)
    ours = flat(maml.meta_gradient(models.functional(model), kind, params, batch, cfg)[0]) / 4
    torch.testing.assert_close(got, ours, rtol=1e-10, atol=1e-12)


def test_unlogged_steps_skip_accuracy_and_logged_steps_report_it():
    """Accuracy is a logged step's metric (`before`): an unlogged step saves its ops, and its
    loss and gradient are the logged step's exactly."""
    kind, model, params, batch = setup("seed", "seed_mlp", tasks=5, dtype=torch.float32)
    fwd, cfg = models.functional(model), MamlConfig(inner_steps=2, inner_lr=0.1)
    for task_map in ("vmap", "loop"):
        g_log, logged = maml.meta_gradient(fwd, kind, params, batch, cfg, task_map, before=True)
        g_quiet, quiet = maml.meta_gradient(fwd, kind, params, batch, cfg, task_map, before=False)
        assert "acc_after" in logged and "acc_after" not in quiet
        assert quiet["loss_after"] == logged["loss_after"]
        assert torch.equal(flat(g_log), flat(g_quiet))


def test_functional_call_fallback_gives_the_same_gradient():
    """Any nn.Module works (model-agnostic); the fast MLP path is only a shortcut."""
    kind, model, params, batch = setup("seed", "seed_mlp", tasks=4, dtype=torch.float32)
    cfg = MamlConfig(inner_steps=2, inner_lr=0.1)
    fast = flat(maml.meta_gradient(models.functional(model), kind, params, batch, cfg)[0])
    generic = lambda p, x: torch.func.functional_call(model, p, (x,))  # noqa: E731
    slow = flat(maml.meta_gradient(generic, kind, params, batch, cfg)[0])
    torch.testing.assert_close(fast, slow)


def test_accuracy_metrics_count_correct_query_predictions():
    kind, model, params, batch = setup("seed", "seed_mlp", tasks=5, dtype=torch.float32)
    _, m = maml.meta_gradient(models.functional(model), kind, params, batch, MamlConfig(inner_steps=1))
    out = forward(params, batch.x_query)
    expected = float((out.argmax(-1) == batch.y_query).float().mean(1).sum())
    assert m["acc_before"] == pytest.approx(expected)
    assert 0 <= m["acc_after"] <= 5


def test_adaptation_curve_step_zero_is_the_unadapted_loss_and_steps_follow_sgd():
    kind, model, params, batch = setup("sinusoid", "sinusoid_mlp", tasks=4, dtype=torch.float32)
    losses, accs = maml.adaptation_curve(models.functional(model), kind, params, batch, (0, 1, 2), 0.01)
    assert accs is None and losses.shape == (4, 3)
    for t in range(4):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        assert float(losses[t, 0]) == pytest.approx(
            float(task_loss(kind, forward(p, batch.x_query[t]), batch.y_query[t]).detach()), rel=1e-5
        )
        for k in (1, 2):
            loss = task_loss(kind, forward(p, batch.x_support[t]), batch.y_support[t])
            grads = torch.autograd.grad(loss, list(p.values()))
            p = {n: (v - 0.01 * g).detach().requires_grad_(True) for (n, v), g in zip(p.items(), grads)}
            q = float(task_loss(kind, forward(p, batch.x_query[t]), batch.y_query[t]).detach())
            assert float(losses[t, k]) == pytest.approx(q, rel=1e-4)


def test_adaptation_curve_scores_only_the_asked_for_steps():
    """Scoring at (0, 2, 5) gives those columns of the full 0..5 curve, exactly."""
    kind, model, params, batch = setup("seed", "seed_mlp", tasks=4, dtype=torch.float32)
    fwd = models.functional(model)
    full, full_acc = maml.adaptation_curve(fwd, kind, params, batch, range(6), 0.3)
    some, some_acc = maml.adaptation_curve(fwd, kind, params, batch, (0, 2, 5), 0.3)
    assert torch.equal(some, full[:, [0, 2, 5]]) and torch.equal(some_acc, full_acc[:, [0, 2, 5]])
    with pytest.raises(ValueError, match="ascending"):
        maml.adaptation_curve(fwd, kind, params, batch, (3, 1), 0.3)


PADDING_VARIANTS = {
    "maml": {},
    "fomaml": {"algorithm": "fomaml"},
    "anil": {"algorithm": "anil"},
    "reptile": {"algorithm": "reptile"},
    "meta-sgd": {"algorithm": "meta-sgd"},
    "maml++": {"multi_step_loss": True, "msl_anneal_steps": 4, "first_order_until": 2},
}


@pytest.mark.parametrize("variant", list(PADDING_VARIANTS))
@pytest.mark.parametrize("family, model_name", CASES)
def test_zero_weighted_padding_adds_nothing(family, model_name, variant):
    """The CUDA-graph step pads a shard to a fixed size with copies of its first task weighted 0
    (graphstep.fill_padded): its sums equal the unpadded shard's, for every algorithm (Reptile
    weights its own sums; MAML++ at a meta-update where its schedules are still moving). Runs on
    the CPU."""
    from distributed_maml.execution.graphstep import fill_padded, padded_size

    kind, model, params, batch = setup(family, model_name, tasks=5, dtype=torch.float32)
    cfg = MamlConfig(inner_steps=2, inner_lr=0.1, **PADDING_VARIANTS[variant])
    params = maml.with_learned_lrs(cfg, params, cfg.inner_lr)  # Meta-SGD's step sizes (others: unchanged)
    fwd = models.functional(model)
    size = padded_size(len(batch))
    assert size == 64 and padded_size(64) == 64 and padded_size(65) == 128
    buffers = maml.TaskBatch(*(torch.full((size, *t.shape[1:]), 7, dtype=t.dtype) for t in batch.tensors()))
    weights = torch.full((size,), 3.0)
    fill_padded(buffers, weights, batch)
    assert weights.sum() == len(batch) and torch.equal(buffers.x_query[-1], batch.x_query[0])
    plan = maml.step_plan(cfg, 1)  # MAML++: still first order (until update 2), loss weights annealing
    g_pad, loss_pad, acc_pad = maml.batch_sums(fwd, kind, params, buffers, cfg, plan, weights)
    g, loss, acc = maml.batch_sums(fwd, kind, params, batch, cfg, plan)
    for k in g:  # float32 sums over 64 rows and over 5 block differently: a few e-7 apart, not a task's weight
        torch.testing.assert_close(g_pad[k], g[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_pad, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(acc_pad, acc, rtol=1e-6, atol=0)


# ---- algorithms beyond plain MAML: each against a hand-written oracle ----------------------


def variant_objective(kind, params, batch, cfg, weights=None, head=None, first_order=False):
    """The meta-objective written out: per task, SGD on the support set (only `head` moves, if
    given), the query loss after every step weighted by `weights` (else the last step only)."""
    total = 0.0
    for t in range(len(batch)):
        p = dict(params)
        for i in range(cfg.inner_steps):
            moving = [k for k in p if head is None or k in head]
            loss = task_loss(kind, forward(p, batch.x_support[t]), batch.y_support[t])
            grads = torch.autograd.grad(loss, [p[k] for k in moving], create_graph=not first_order)
            p = {**p, **{k: p[k] - cfg.inner_lr * g for k, g in zip(moving, grads)}}
            if weights is not None:
                total = total + weights[i] * task_loss(kind, forward(p, batch.x_query[t]), batch.y_query[t])
        if weights is None:
            total = total + task_loss(kind, forward(p, batch.x_query[t]), batch.y_query[t])
    return total


def _check_fd(kind, params, g, value, seed=0):
    """g . d against central differences of value() along random directions and coordinates."""
    spec = models.ParamSpec(tuple(params), tuple(tuple(v.shape) for v in params.values()))
    theta, g, eps = flat(params), flat(g), 1e-6
    rng = np.random.default_rng(seed)
    directions = [torch.from_numpy(rng.normal(size=theta.numel())) for _ in range(2)]
    directions += [
        torch.nn.functional.one_hot(torch.tensor(int(i)), theta.numel()).double() for i in (0, theta.numel() - 1)
    ]
    for d in directions:

        def at(vec):
            return float(value({k: v.clone().requires_grad_(True) for k, v in spec.unflatten(vec).items()}).detach())

        fd = (at(theta + eps * d) - at(theta - eps * d)) / (2 * eps)
        assert float(g @ d) == pytest.approx(fd, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("family, model_name", CASES)
def test_multi_step_loss_matches_finite_differences(family, model_name):
    """MAML++'s multi-step loss: the gradient of sum_i w_i L_query(theta_i), w from the
    annealing schedule at meta-update 300 of 1000."""
    kind, model, params, batch = setup(family, model_name)
    cfg = MamlConfig(inner_steps=3, inner_lr=0.1, multi_step_loss=True, msl_anneal_steps=1000)
    plan = maml.step_plan(cfg, 300)
    w = plan.weights
    assert w is not None and sum(w) == pytest.approx(1.0) and w[0] == pytest.approx(1 / 3 - 300 / 3000)
    g, metrics = maml.meta_gradient(models.functional(model), kind, params, batch, cfg, version=300)
    _check_fd(kind, params, g, lambda p: variant_objective(kind, p, batch, cfg, weights=w))
    # loss_after stays the final query loss (comparable with plain MAML), not the weighted sum
    plain = maml.meta_gradient(models.functional(model), kind, params, batch, MamlConfig(3, 0.1))[1]
    assert metrics["loss_after"] == pytest.approx(plain["loss_after"], rel=1e-9)
    late = maml.step_plan(cfg, 10**6).weights
    assert late == pytest.approx((0.01, 0.01, 0.98))  # annealed: MAML++'s floor 0.03/K per early step


def test_derivative_order_annealing_switches_at_first_order_until():
    kind, model, params, batch = setup("seed", "seed_mlp")
    fwd = models.functional(model)
    cfg = MamlConfig(inner_steps=2, inner_lr=0.1, first_order_until=5)
    first = maml.meta_gradient(fwd, kind, params, batch, MamlConfig(2, 0.1, first_order=True))[0]
    second = maml.meta_gradient(fwd, kind, params, batch, MamlConfig(2, 0.1))[0]
    early = maml.meta_gradient(fwd, kind, params, batch, cfg, version=4)[0]
    late = maml.meta_gradient(fwd, kind, params, batch, cfg, version=5)[0]
    assert torch.equal(flat(early), flat(first)) and torch.equal(flat(late), flat(second))
    assert not torch.allclose(flat(first), flat(second))


@pytest.mark.parametrize("family, model_name", CASES)
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_adapts_the_head_only(family, model_name, first_order):
    """ANIL: the inner loop moves the last layer only; the meta-gradient still reaches every
    layer. Second order against finite differences; first order against the hand-written loop."""
    kind, model, params, batch = setup(family, model_name)
    cfg = MamlConfig(inner_steps=2, inner_lr=0.1, algorithm="anil", first_order=first_order)
    head = maml.head_of(cfg, list(params))
    assert head == {n for n in params if n.startswith(list(params)[-1].rsplit(".", 1)[0] + ".")} and len(head) == 2
    g, _ = maml.meta_gradient(models.functional(model), kind, params, batch, cfg)
    if first_order:
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        total = variant_objective(kind, leaves, batch, cfg, head=head, first_order=True)
        want = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))
        torch.testing.assert_close(flat(g), flat(want), rtol=1e-9, atol=1e-12)
    else:
        _check_fd(kind, params, g, lambda p: variant_objective(kind, p, batch, cfg, head=head))
    whole = maml.meta_gradient(
        models.functional(model), kind, params, batch, MamlConfig(2, 0.1, first_order=first_order)
    )[0]
    assert not torch.allclose(flat(g), flat(whole))  # it is not MAML
    with pytest.raises(ConfigError, match="names no parameter"):
        maml.head_of(MamlConfig(algorithm="anil", anil_head="head."), list(params))


@pytest.mark.parametrize("family, model_name", CASES)
def test_reptile_direction_is_theta_minus_the_adapted_weights(family, model_name):
    """Reptile: the summed direction is sum_t (theta - phi_t), phi_t after plain SGD on task t's
    support set; the learner's SGD step of epsilon moves theta to theta + eps * mean(phi - theta)."""
    from distributed_maml.core.learner import Learner

    kind, model, params, batch = setup(family, model_name)
    cfg = MamlConfig(inner_steps=3, inner_lr=0.1, algorithm="reptile", reptile_step=0.25)
    for task_map in ("vmap", "loop"):
        g, metrics = maml.meta_gradient(models.functional(model), kind, params, batch, cfg, task_map)
        phis = []
        for t in range(len(batch)):
            p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
            for _ in range(cfg.inner_steps):
                loss = task_loss(kind, forward(p, batch.x_support[t]), batch.y_support[t])
                grads = torch.autograd.grad(loss, list(p.values()))
                p = {k: (v - cfg.inner_lr * gr).detach().requires_grad_(True) for (k, v), gr in zip(p.items(), grads)}
            phis.append(flat(p).detach())
        want = sum(flat(params) - phi for phi in phis)
        torch.testing.assert_close(flat(g), want, rtol=1e-9, atol=1e-12)
        after = [
            float(
                task_loss(kind, forward(models.ParamSpec.of(model).unflatten(phi), batch.x_query[t]), batch.y_query[t])
            )
            for t, phi in enumerate(phis)
        ]
        assert metrics["loss_after"] == pytest.approx(sum(after), rel=1e-9)
    spec = models.ParamSpec.of(model)
    learner = Learner.of(spec, flat(params).float(), cfg, lr=1e-3)
    learner.apply((flat(g) / len(batch)).float().numpy())
    mean_phi = sum(phis) / len(phis)
    expected = flat(params) + 0.25 * (mean_phi - flat(params))
    np.testing.assert_allclose(learner.weights(), expected.float().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind_of_lr", ["meta-sgd", "per-layer-per-step"])
@pytest.mark.parametrize("family, model_name", CASES)
def test_learned_inner_step_sizes_match_finite_differences(family, model_name, kind_of_lr):
    """Meta-SGD (a step size per weight element) and MAML++'s LSLR (one per parameter tensor
    and inner step): the meta-gradient reaches the weights and the step sizes alike."""
    kind, model, params, batch = setup(family, model_name)
    extra = {"algorithm": "meta-sgd"} if kind_of_lr == "meta-sgd" else {"learn_inner_lr": kind_of_lr}
    cfg = MamlConfig(inner_steps=2, inner_lr=0.1, **extra)
    rng = np.random.default_rng(3)
    meta = {  # step sizes spread around inner_lr, so a wrong index or shape shows
        k: (v if k in params else v * torch.from_numpy(rng.uniform(0.5, 1.5, size=v.shape)))
        for k, v in maml.with_learned_lrs(cfg, params, cfg.inner_lr).items()
    }
    lr_names = [k for k in meta if k not in params]
    assert len(lr_names) == len(params)
    assert all(
        meta[k].shape == ((2,) if kind_of_lr != "meta-sgd" else params[k.split(":", 1)[1]].shape) for k in lr_names
    )

    def objective(p):
        total = 0.0
        for t in range(len(batch)):
            q = {k: p[k] for k in params}
            for i in range(cfg.inner_steps):
                loss = task_loss(kind, forward(q, batch.x_support[t]), batch.y_support[t])
                grads = torch.autograd.grad(loss, list(q.values()), create_graph=True)
                step = {k: p[f"inner_lr:{k}"] if kind_of_lr == "meta-sgd" else p[f"inner_lr_step:{k}"][i] for k in q}
                q = {k: v - step[k] * g for (k, v), g in zip(q.items(), grads)}
            total = total + task_loss(kind, forward(q, batch.x_query[t]), batch.y_query[t])
        return total

    g, _ = maml.meta_gradient(models.functional(model), kind, meta, batch, cfg)
    assert set(g) == set(meta) and all(float(g[k].abs().sum()) > 0 for k in lr_names)
    _check_fd(kind, meta, g, objective)
