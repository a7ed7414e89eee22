"""conv4, per-task BatchNorm under vmap, the vmap/loop task maps, and user models and families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from distributed_maml import config, data
from distributed_maml.core import models
from distributed_maml.core.maml import TaskBatch, map_tasks, meta_gradient
from distributed_maml.errors import ConfigError
from distributed_maml.execution.computer import ShardComputer, choose_task_map

from .conftest import assert_user_error, cli_in_process, run_cli

NETS = "tests.usercode.nets"


@pytest.fixture(scope="module")
def glyph_store():
    return data.build_in_memory("glyphs", 6, seed=0, shots=1, queries=2, split="test", ways=3)


def _model(glyph_store, *overrides, dtype=torch.float32):
    cfg = config.load(None, ["model.name=conv4", "model.channels=4", *overrides]).model
    m = models.build(cfg, glyph_store.info, seed=0).to(dtype)
    return m, models.functional(m), {k: v.detach() for k, v in m.named_parameters()}


def test_conv4_shape_and_batch_norm_has_no_running_statistics(glyph_store):
    m, forward, params = _model(glyph_store)
    assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == 4
    assert sum(isinstance(x, models.TaskBatchNorm) for x in m.modules()) == 4
    assert not list(m.buffers())  # nothing shared between tasks
    out = forward(params, torch.rand(7, 1, 28, 28))
    assert out.shape == (7, 3)
    models.check(config.ModelConfig(name="conv4", channels=4), glyph_store.info)


def test_task_batch_norm_equals_torch_batch_norm():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(5, track_running_stats=False)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    ours = models.TaskBatchNorm(5, ref.eps, ref.weight, ref.bias)
    x = torch.randn(6, 5, 4, 4) * 3 + 1
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    assert set(dict(ours.named_parameters())) == set(dict(ref.named_parameters()))


def test_batch_norm_is_per_task_whatever_shares_the_batch(glyph_store):
    _, forward, params = _model(glyph_store)
    x = torch.rand(4, 5, 1, 28, 28)
    for task_map in ("vmap", "loop"):
        (batched,) = map_tasks(lambda p, xi: (forward(p, xi),), task_map)(params, x)
        alone = torch.stack([forward(params, x[t]) for t in range(4)])
        torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
        # task 2 gives the same outputs next to other tasks as it does alone
        (other,) = map_tasks(lambda p, xi: (forward(p, xi),), task_map)(params, torch.stack([x[2], x[0] * 5]))
        torch.testing.assert_close(other[0], batched[2], rtol=1e-5, atol=1e-5)


def _textbook(model, params, batch, cfg):
    """The per-task autograd loop, create_graph=True: the oracle for the second-order gradient."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    total = 0.0
    for t in range(len(batch)):
        p = dict(leaves)
        for _ in range(cfg.inner_steps):
            out = functional_call(model, p, (batch.x_support[t],))
            g = torch.autograd.grad(
                nn.functional.cross_entropy(out, batch.y_support[t]), list(p.values()), create_graph=True
            )
            p = {k: v - cfg.inner_lr * gi for (k, v), gi in zip(p.items(), g)}
        total = total + nn.functional.cross_entropy(functional_call(model, p, (batch.x_query[t],)), batch.y_query[t])
    return dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))


@pytest.mark.parametrize("first_order", [False, True])
def test_conv4_meta_gradient_vmap_equals_loop_and_autograd(glyph_store, first_order):
    """float64: the vmap path, the per-task loop and textbook autograd agree (second order
    through BatchNorm included: torch's fused batch_norm gets it wrong under vmap)."""
    m, forward, params = _model(glyph_store, dtype=torch.float64)
    batch = TaskBatch.from_numpy(glyph_store.rows(np.arange(4)), dtype=torch.float64)
    cfg = config.MamlConfig(inner_steps=2, inner_lr=0.4, first_order=first_order)
    g_vmap, m_vmap = meta_gradient(forward, "classification", params, batch, cfg, "vmap")
    g_loop, m_loop = meta_gradient(forward, "classification", params, batch, cfg, "loop")
    for k in params:
        torch.testing.assert_close(g_vmap[k], g_loop[k], rtol=1e-9, atol=1e-10)
    assert m_vmap == pytest.approx(m_loop, rel=1e-9)
    if not first_order:
        oracle = _textbook(m, params, batch, cfg)
        for k in params:
            torch.testing.assert_close(g_vmap[k], oracle[k], rtol=1e-9, atol=1e-10)


def test_conv4_meta_gradient_matches_finite_differences(glyph_store):
    m, forward, params = _model(glyph_store, dtype=torch.float64)
    batch = TaskBatch.from_numpy(glyph_store.rows(np.arange(2)), dtype=torch.float64)
    cfg = config.MamlConfig(inner_steps=1, inner_lr=0.4)
    grads, _ = meta_gradient(forward, "classification", params, batch, cfg, "vmap")

    def objective(p):
        return meta_gradient(forward, "classification", p, batch, cfg, "vmap")[1]["loss_after"]

    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # random directions: (L(p + e d) - L(p - e d)) / 2e = <grad, d>
        d = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
        eps = 1e-7  # ReLU and max-pool kinks are near: larger steps cross them (1e-5 is off by 6e-4)
        plus = objective({k: params[k] + eps * d[k] for k in params})
        minus = objective({k: params[k] - eps * d[k] for k in params})
        analytic = sum(float((grads[k] * d[k]).sum()) for k in params)
        assert (plus - minus) / (2 * eps) == pytest.approx(analytic, rel=1e-6, abs=1e-8)


def test_task_map_rule_and_shards_agree(glyph_store):
    cpu = torch.device("cpu")
    conv = models.build(config.ModelConfig(name="conv4", channels=4), glyph_store.info, 0)
    assert (
        choose_task_map(conv, cpu, "auto") == "loop" and choose_task_map(conv, torch.device("cuda"), "auto") == "vmap"
    )
    assert choose_task_map(nn.Linear(2, 2), cpu, "auto") == "vmap" and choose_task_map(conv, cpu, "vmap") == "vmap"
    model_cfg = config.ModelConfig(name="conv4", channels=4)
    maml_cfg = config.MamlConfig(inner_steps=1, inner_lr=0.4)
    weights = models.ParamSpec.of(conv).flatten(dict(conv.named_parameters())).detach().numpy()
    ids = np.arange(5)
    a = ShardComputer(glyph_store, model_cfg, maml_cfg, task_map="vmap").compute(weights, ids)
    b = ShardComputer(glyph_store, model_cfg, maml_cfg, task_map="loop").compute(weights, ids)
    np.testing.assert_allclose(a.grad_sum, b.grad_sum, rtol=1e-4, atol=1e-5)
    la, _ = ShardComputer(glyph_store, model_cfg, maml_cfg, task_map="vmap").curve(weights, ids, (0, 1, 2), 0.4)
    lb, _ = ShardComputer(glyph_store, model_cfg, maml_cfg, task_map="loop").curve(weights, ids, (0, 1, 2), 0.4)
    np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name, needle",
    [
        (f"{NETS}:running_stats", "track_running_stats=False"),
        (f"{NETS}:dropout", "set p=0"),
        (f"{NETS}:wrong_outputs", "gives outputs of shape (3, 4)"),
        (f"{NETS}:double", "build the model in float32"),
        (f"{NETS}:not_a_module", "not a torch.nn.Module"),
        (f"{NETS}:NOT_CALLABLE", "not a callable factory"),
        (f"{NETS}:missing", "has no attribute 'missing'"),
        ("no_such_package.nets:f", "module 'no_such_package' not found"),
    ],
)
def test_user_model_errors_name_the_problem(glyph_store, name, needle):
    with pytest.raises(ConfigError) as e:
        models.check(config.ModelConfig(name=name), glyph_store.info)
    assert needle in str(e.value)


def test_user_model_and_family_through_the_cli(tmp_path, capsys):
    """A user network trains; import errors are one line and exit 2 (as the user sees them)."""
    base = [
        "train",
        "--set",
        "training.steps=2",
        "--set",
        "scaling.num_workers=0",
        "--set",
        "training.eval_every=1",
        "--set",
        "training.eval_tasks=4",
        "--no-progress",
    ]
    ok = run_cli(
        *base,
        "--set",
        "task.family=glyphs",
        "--set",
        "task.ways=3",
        "--set",
        "task.meta_batch=2",
        "--set",
        "task.shots=1",
        "--set",
        "task.queries=2",
        "--set",
        f"model.name={NETS}:small_cnn",
        "--set",
        "model.kwargs={width = 3}",
        "--output-dir",
        tmp_path / "user",
    )
    assert ok.returncode == 0, ok.stderr
    assert "tasks by loop" in ok.stdout and "done: 2 steps" in ok.stdout
    assert "kwargs = {width = 3}" in (tmp_path / "user" / "config.toml").read_text()
    fam = cli_in_process(  # the user's family by import path (the shell's view: the network above)
        capsys,
        *base,
        "--set",
        f"task.family={NETS}:Quadratic",
        "--set",
        "model.name=mlp",
        "--set",
        "task.shots=5",
        "--set",
        "task.queries=5",
        "--set",
        "maml.inner_lr=0.01",
        "--output-dir",
        tmp_path / "fam",
    )
    assert fam.returncode == 0, fam.stderr
    assert "Val Loss:" in fam.stdout  # validation tasks come from the user's generator too (its val stream)
    assert_user_error(
        cli_in_process(
            capsys,
            *base,
            "--set",
            f"model.name={NETS}:running_stats",
            "--set",
            "task.family=glyphs",
            "--output-dir",
            tmp_path / "bn",
        ),
        "track_running_stats=False",
    )
    assert_user_error(
        cli_in_process(capsys, *base, "--set", "task.family=nowhere.mod:Fam", "--output-dir", tmp_path / "nf"),
        "module 'nowhere' not found",
    )
    assert_user_error(
        cli_in_process(
            capsys, "tasks", "build", "--family", f"{NETS}:BadShapes", "--num-tasks", "4", "--out", tmp_path / "b.arrow"
        ),
        "['x_query'] must be",
    )
    assert not any((tmp_path / d).exists() for d in ("bn", "nf", "b.arrow"))


def test_glyph_run_evaluates_against_baselines(tmp_path):
    """A tiny conv4 run on glyphs, then eval: held-out glyph classes, the pretrained baseline
    fit as a classifier over all training classes (its head re-initialised for the ways)."""
    from distributed_maml.evaluation import evaluate
    from distributed_maml.training import run, train

    cfg = config.load(
        None,
        [
            "task.family=glyphs",
            "task.ways=3",
            "task.shots=1",
            "task.queries=2",
            "task.meta_batch=4",
            "training.steps=3",
            "training.eval_every=0",
            "model.name=conv4",
            "model.channels=4",
            "maml.inner_steps=1",
            "maml.inner_lr=0.4",
            "scaling.num_workers=0",
        ],
    )
    r = run.prepare(cfg, tmp_path / "g", progress=False)
    ex = train.make_executor(r)
    train.train(r, ex, progress=False)
    res = evaluate.evaluate(tmp_path / "g", steps=[0, 1], num_tasks=12, pretrain_steps=3, workers=0)
    assert res["family"] == "glyphs" and res["num_tasks"] == 12 and len(res["accuracy_mean"]) == 2
    assert set(res["baselines"]) == {"pretrained", "scratch"}
    assert all(0 <= a <= 1 for b in res["baselines"].values() for a in b["accuracy_mean"])
    pre = torch.load(tmp_path / "g" / "baselines" / "pretrained_3.pt", weights_only=True)
    scratch = models.build(cfg.model, r.store.info, seed=0)
    assert pre["17.weight"].shape == (3, 4)  # the head: ways outputs, from the run's own init
    torch.testing.assert_close(pre["17.weight"], scratch.state_dict()["17.weight"])
    assert not torch.equal(pre["0.weight"], scratch.state_dict()["0.weight"])  # the body was pretrained


def test_user_code_next_to_where_you_run_imports_from_the_console_script(tmp_path, monkeypatch):
    """`distributed-maml` (the console script) does not put the working folder on sys.path as
    `python -m` does; user code beside the user must import all the same."""
    import sys

    from distributed_maml import userimport

    (tmp_path / "beside_me.py").write_text("def f(input_shape, num_outputs):\n    return 42\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert userimport.load("beside_me:f", "model.name")((1,), 1) == 42
    assert userimport.search_path("beside_me:f") == str(tmp_path.resolve())


@pytest.mark.parametrize(
    "variant",
    [{"algorithm": "anil"}, {"algorithm": "meta-sgd"}, {"algorithm": "reptile"}, {"multi_step_loss": True}],
    ids=["anil", "meta-sgd", "reptile", "maml++"],
)
def test_algorithms_on_conv4_agree_between_task_maps(glyph_store, variant):
    """Every algorithm runs on conv4 (BatchNorm, image tasks): vmap and the per-task loop, two
    independent mappings, give the same meta-gradient (weights and learned step sizes alike)."""
    from distributed_maml.core import maml

    model_cfg = config.ModelConfig(name="conv4", channels=4)
    maml_cfg = config.MamlConfig(inner_steps=2, inner_lr=0.4, **variant)
    a = ShardComputer(glyph_store, model_cfg, maml_cfg, task_map="vmap")
    b = ShardComputer(glyph_store, model_cfg, maml_cfg, task_map="loop")
    params = maml.with_learned_lrs(maml_cfg, dict(a.model.named_parameters()), maml_cfg.inner_lr)
    weights = a.spec.flatten(params).detach().numpy()
    ga, gb = a.compute(weights, np.arange(4), version=3), b.compute(weights, np.arange(4), version=3)
    assert ga.grad_sum.size == a.spec.numel and np.abs(ga.grad_sum).sum() > 0
    # float32, second order through grouped (vmap) vs plain (loop) convolutions: the two reduce
    # in different orders, ~3e-5 apart on entries up to ~4 on some CPUs; a mapping bug is O(1)
    scale = float(np.abs(gb.grad_sum).max())
    np.testing.assert_allclose(ga.grad_sum, gb.grad_sum, rtol=1e-4, atol=2e-5 * scale)
    assert ga.metrics["loss_after"] == pytest.approx(gb.metrics["loss_after"], rel=1e-5)
