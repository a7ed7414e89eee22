"""maml.checkpoint_inner: the meta-gradient through the inner loop, one step's graph at a time,
equals the plain path's (autograd through the unrolled loop) for every algorithm that
differentiates through the inner loop, under vmap and the per-task loop; and its memory does
not grow with the inner steps."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from distributed_maml.config import MamlConfig, ModelConfig
from distributed_maml.core import maml, models
from distributed_maml.core.inner import with_learned_lrs
from distributed_maml.data.writing import build_in_memory
from distributed_maml.errors import ConfigError

from .conftest import assert_user_error, cli_in_process, run_cli, train_on

VARIANTS = {
    "maml": {},
    "meta-sgd": {"algorithm": "meta-sgd"},
    "anil": {"algorithm": "anil"},
    "maml++ (msl)": {"multi_step_loss": True, "msl_anneal_steps": 3},
    "maml++ (msl+lslr)": {"multi_step_loss": True, "learn_inner_lr": "per-layer-per-step"},
}


def _problem(family, model_cfg, tasks, dtype, cfg, shots=3, queries=4, ways=0):
    store = build_in_memory(family, tasks, seed=11, shots=shots, queries=queries, split="train", ways=ways)
    model = models.build(model_cfg, store.info, seed=5, dtype=dtype)
    params = with_learned_lrs(cfg, {k: v.detach() for k, v in model.named_parameters()}, cfg.inner_lr)
    params = {k: v.to(dtype) for k, v in params.items()}
    batch = maml.TaskBatch.from_numpy(store.rows(np.arange(tasks)), dtype=dtype)
    return store.info.kind, models.functional(model), params, batch


def _both(kind, forward, params, batch, cfg, task_map, version=5):
    plain, pm = maml.meta_gradient(forward, kind, params, batch, cfg, task_map, before=True, version=version)
    ckpt = dataclasses.replace(cfg, checkpoint_inner=True)
    chk, cm = maml.meta_gradient(forward, kind, params, batch, ckpt, task_map, before=True, version=version)
    # recomputing each step's weights from the initial ones: the same operations, the same bits
    again = dataclasses.replace(ckpt, checkpoint_recompute=True)
    rec, rm = maml.meta_gradient(forward, kind, params, batch, again, task_map, before=True, version=version)
    assert all(torch.equal(rec[k], chk[k]) for k in chk) and rm == cm
    return plain, chk, pm, cm


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    return num / sum(float(a[k].norm() ** 2) for k in a) ** 0.5


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("task_map", ["vmap", "loop"])
def test_checkpointed_equals_the_plain_meta_gradient_in_float64(variant, task_map):
    cfg = MamlConfig(inner_steps=4, inner_lr=0.05, **VARIANTS[variant])
    kind, forward, params, batch = _problem("sinusoid", ModelConfig(name="sinusoid_mlp"), 3, torch.float64, cfg)
    plain, chk, pm, cm = _both(kind, forward, params, batch, cfg, task_map)
    assert set(plain) == set(chk)
    assert _rel(plain, chk) <= 1e-10, _rel(plain, chk)
    assert abs(pm["loss_after"] - cm["loss_after"]) <= 1e-10 * abs(pm["loss_after"])


@pytest.mark.parametrize("task_map", ["vmap", "loop"])
def test_checkpointed_equals_the_plain_path_on_conv4_with_per_task_batchnorm(task_map):
    """conv4 (BatchNorm with per-task statistics), classification, float32: <= 1e-5."""
    cfg = MamlConfig(inner_steps=3, inner_lr=0.1)
    model_cfg = ModelConfig(name="conv4", channels=4)
    kind, forward, params, batch = _problem("glyphs", model_cfg, 2, torch.float32, cfg, shots=1, queries=2, ways=3)
    plain, chk, pm, cm = _both(kind, forward, params, batch, cfg, task_map)
    assert _rel(plain, chk) <= 1e-5, _rel(plain, chk)
    assert pm["acc_after"] == cm["acc_after"]


def test_zero_weighted_padding_adds_nothing_to_the_checkpointed_sums():
    cfg = MamlConfig(inner_steps=3, inner_lr=0.05, checkpoint_inner=True)
    kind, forward, params, batch = _problem("sinusoid", ModelConfig(name="sinusoid_mlp"), 3, torch.float64, cfg)
    plan = maml.step_plan(cfg, 0)
    g3, l3, _ = maml.batch_sums(forward, kind, params, batch, cfg, plan)
    padded = maml.TaskBatch(*(torch.cat([t, t[:1]]) for t in batch.tensors()))
    g4, l4, _ = maml.batch_sums(
        forward, kind, params, padded, cfg, plan, torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    )
    for k in g3:  # a padding task weighted 0 adds nothing (reduction order aside: float64 rounding)
        torch.testing.assert_close(g3[k], g4[k], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(l3, l4, rtol=1e-12, atol=1e-14)


def test_checkpoint_inner_with_a_first_order_or_reptile_run_is_one_clear_line():
    for bad in ({"first_order": True}, {"algorithm": "fomaml"}, {"algorithm": "reptile"}):
        with pytest.raises(ConfigError, match="checkpoint_inner"):
            MamlConfig(checkpoint_inner=True, **bad)
    assert_user_error(
        run_cli("train", "--set", "maml.checkpoint_inner=true", "--set", "maml.algorithm=reptile", "--no-progress"),
        "maml.checkpoint_inner",
    )


@pytest.mark.cluster  # three fresh interpreters (the benchmark measures each row alone, ~16 s): with the shell-heavy tier
def test_bench_memory_prints_every_row_and_its_json(capsys):
    """`bench --memory`: one row per (mode, inner steps), each from a fresh process, and the JSON
    line last; a bad mode is one line. (Its numbers are a benchmark's: docs/benchmarks.md.)"""
    proc = run_cli(
        "bench",
        "--memory",
        "--inner-steps",
        "3",
        "--meta-batch",
        "2",
        "--channels",
        "4",
        "--modes",
        "second,checkpointed",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    got = {(r["mode"], r["inner_steps"]) for r in result["rows"]}
    assert got == {("second", 3), ("checkpointed", 3)}
    for r in result["rows"]:
        assert r["mib_per_task"] > 0 and r["tasks_per_s"] > 0 and r["max_meta_batch"] >= 1
        assert r["memory_vs_second"] is not None and r["cost_vs_second"] is not None
    assert "checkpointed | 3 |" in proc.stdout
    assert_user_error(cli_in_process(capsys, "bench", "--memory", "--modes", "second,nosuch"), "--modes")
    bad = cli_in_process(capsys, "bench", "--memory", "--backbone", "vgg")
    assert_user_error(bad, "--backbone must be one of conv4, resnet12")
    from distributed_maml.bench import memory as bench_memory

    (row,) = bench_memory.memory_per_task("resnet12", (2,), 2, ("recompute",), channels=2)  # --backbone resnet12
    assert row["model"] == "resnet12-2-5-10-20" and row["mib_per_task"] > 0 and row["tasks_per_s"] > 0


def test_a_checkpointed_run_trains_to_the_plain_runs_weights(tmp_path, store_path):
    """Through the training loop (sampler, executor, learner): 5 steps with and without
    maml.checkpoint_inner end at the same weights, to float32 rounding."""
    base = ["scaling.num_workers=0", "task.meta_batch=8", "training.steps=5", "maml.inner_steps=3"]
    plain, _ = train_on(tmp_path / "plain", store_path, base)
    chk, _ = train_on(tmp_path / "chk", store_path, [*base, "maml.checkpoint_inner=true"])
    np.testing.assert_allclose(chk.weights, plain.weights, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(chk.weights, train_on(tmp_path / "one", store_path, [*base[:-1]])[0].weights)
