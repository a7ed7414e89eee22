"""The README's main command, end to end through the real CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distributed_maml.config import ModelConfig
from distributed_maml.core import maml, models
from distributed_maml.data.writing import build_in_memory

from .conftest import assert_user_error, cli_in_process, run_cli, train_on


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _random_init_curve(family, model_name, shots, queries, inner_lr, seed, steps, n=600):
    """The baseline: a random initialisation adapted exactly as MAML's is, on the same tasks
    `eval` generates (the run's seed, split test)."""
    store = build_in_memory(family, n, seed=seed, shots=shots, queries=queries, split="test")
    model = models.build(ModelConfig(name=model_name), store.info, seed=1234)
    batch = maml.TaskBatch.from_numpy(store.rows(np.arange(n)))
    params = {k: v.detach() for k, v in model.named_parameters()}
    losses, accs = maml.adaptation_curve(models.functional(model), store.info.kind, params, batch, steps, inner_lr)
    pick = lambda t: t.mean(0).tolist() if t is not None else None  # noqa: E731
    return pick(losses), pick(accs)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])  # a second seed: -m slow
def test_default_train_lowers_the_meta_loss_and_beats_both_baselines(tmp_path, seed):
    out = tmp_path / "run"
    proc = run_cli("train", "--output-dir", out, "--set", f"training.seed={seed}", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "Step 500, Meta Loss:" in proc.stdout and "Step 25, Meta Loss:" in proc.stdout
    assert "eager steps (graphs need CUDA)" in proc.stdout.splitlines()[0]  # the run's first line says so
    m = _metrics(out)
    first, last = m[0]["meta_loss"], np.mean([x["meta_loss"] for x in m[-5:]])
    assert last < 0.8 * first, (first, last)

    # in-process (--workers 0): the run's two Ray workers again cost a Ray start; eval through
    # workers equals it (test_ray.py::test_evaluation_through_ray_workers_matches_in_process)
    ev = run_cli("eval", "--run", out, "--steps", "0,5", "--json", "--no-baselines", "--workers", "0")
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout)
    assert res["steps"] == [0, 5] and res["num_tasks"] == 600
    maml_acc0, maml_acc5 = res["accuracy_mean"]
    _, rand_acc = _random_init_curve("seed", "seed_mlp", 5, 15, 0.5, seed, [0, 5])
    # adapted MAML init beats the same init unadapted, and a random init adapted the same way,
    # by margins far outside the 95% intervals (about +-0.01 at 600 tasks)
    assert maml_acc5 > maml_acc0 + 0.2, res
    assert maml_acc5 > rand_acc[1] + 0.05, (res, rand_acc)
    assert max(res["accuracy_ci95"]) < 0.03


def test_eval_table_and_bad_flags(tmp_path, capsys):
    out = tmp_path / "run"
    train_on(out, None, ["training.steps=5", "scaling.num_workers=0"])  # the shell's view: eval's table below
    table = run_cli("eval", "--run", out, "--steps", "0,1", "--num-tasks", "50")
    assert table.returncode == 0 and "± " in table.stdout and "inner steps" in table.stdout
    # bad flags: the parser's error path in this interpreter (the shell's view is the table above)
    with pytest.raises(SystemExit) as bad:  # argparse's own exit: usage, then the line
        cli_in_process(capsys, "eval", "--run", out, "--steps", "a,b")
    err = capsys.readouterr().err
    assert bad.value.code == 2 and "argument --steps: --steps takes comma-separated whole numbers" in err, err
    assert_user_error(cli_in_process(capsys, "eval", "--run", out, "--tasks", out / "tasks.arrow"), "training store")


ALL_METHODS = ("loop", "bare", "bare_funcgrad", "in_process", "ray_1", "collective_1")


# The default tier times the methods of one process (~6 s); the Ray ones start a local Ray and
# its workers in the shell (~24 s in all), so they run with the cluster tier.
@pytest.mark.parametrize(
    "methods",
    [("loop", "bare", "bare_funcgrad", "in_process"), pytest.param(ALL_METHODS, marks=pytest.mark.cluster)],
    ids=["one-process", "with-ray"],
)
def test_bench_measures_every_method_in_one_run_with_matching_gradients(methods):
    extra = [] if methods == ALL_METHODS else ["--methods", ",".join(methods)]
    proc = run_cli("bench", "--quick", "--seconds", "0.05", "--workers", "1", *extra)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith(f"model | meta-batch | steps | order | {' | '.join(methods)} |") for line in lines), (
        lines
    )
    result = json.loads(lines[-1])
    cells = {(r["method"], r["meta_batch"]) for r in result["rows"]}
    assert cells == {(m, mb) for m in methods for mb in (25, 1000)}
    for r in result["rows"]:
        assert r["tasks_per_s"] > 0 and (r["model"], r["inner_steps"], r["first_order"]) == ("sinusoid_mlp", 1, False)
    assert result["gradients_max_rel_diff"]["sinusoid_mlp"] < 1e-5  # the methods compute the same meta-gradient
    bare = [r for r in result["rows"] if r["method"] == "bare"]  # timed beside the script on its own
    assert all(r["script_alone_ms"] > 0 for r in bare)
    assert sum("bare row vs bench/minimal_script.py on its own" in line for line in lines) == 2
    assert result["machine"]["torch_threads"] == 1


def test_bench_algorithms_times_every_algorithm_through_the_projects_step():
    from distributed_maml.bench import methods as bench

    cells = bench.algorithm_cells()
    assert {c.algorithm for c in cells} == set(bench.ALGORITHMS) and {c.method for c in cells} == {"in_process"}
    row = bench.measure(bench.Cell("in_process", "sinusoid_mlp", 25, 2, False, "maml++ (msl)"), 0.05)
    assert row["algorithm"] == "maml++ (msl)" and row["tasks_per_s"] > 0


@pytest.mark.slow
def test_full_sinusoid_reproduction_matches_the_paper(tmp_path):
    """jobs/sinusoid.toml end to end (70,000 steps, ~8 minutes in-process on 2 cores): at 5 shots
    after one step MAML reaches the paper's 0.67 (within its CI), beats the pretrained baseline's
    2.41 by far and scratch with the intervals apart, and the run's own step-0 weights; its
    validation entries, the task and adaptation plots are there. (A 1,500-step version of these
    checks was the default tier's longest test, ~56 s: its learning claims are this run's.) Run
    with `pytest -m slow`."""
    out = tmp_path / "sin"
    proc = run_cli(
        "train",
        "--config",
        "jobs/sinusoid.toml",
        "--output-dir",
        out,
        "--no-progress",
        "--set",
        "scaling.num_workers=0",
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(
        run_cli("eval", "--run", out, "--steps", "1", "--shots", "5", "--json", "--workers", "0", timeout=600).stdout
    )
    assert res["loss_mean"][0] - res["loss_ci95"][0] < 0.67 * 1.15
    assert res["loss_mean"][0] < 0.5 * res["baselines"]["pretrained"]["loss_mean"][0]
    scratch = res["baselines"]["scratch"]
    assert res["loss_mean"][0] + res["loss_ci95"][0] < scratch["loss_mean"][0] - scratch["loss_ci95"][0], res
    assert (out / "plots" / "sinusoid-tasks.png").stat().st_size > 10_000
    assert (out / "plots" / "adaptation-5shots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert [v["step"] for v in val] == list(range(5000, 70001, 5000))
    assert val[-1]["val_loss"] < 1.0 and 0 < val[-1]["val_loss_ci95"] < 0.3
    # the run's own step-0 weights are models.build(seed=0): one step from them is far worse
    store = build_in_memory("sinusoid", 600, seed=0, shots=5, queries=10, split="test")
    init = models.build(ModelConfig(name="sinusoid_mlp"), store.info, seed=0)
    batch = maml.TaskBatch.from_numpy(store.rows(np.arange(600)))
    before, _ = maml.adaptation_curve(
        models.functional(init), "regression", {k: v.detach() for k, v in init.named_parameters()}, batch, (0, 1), 0.01
    )
    assert res["loss_mean"][0] < 0.6 * float(before[:, 1].mean()), (res, before[:, 1].mean())
