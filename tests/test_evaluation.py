"""The meta-test protocol: confidence intervals, baselines on the very same tasks, table-built
stores with disjoint classes, and the digits demonstration."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_maml import data
from distributed_maml.errors import StoreError
from distributed_maml.evaluation import evaltable, evaluate
from distributed_maml.training import validation

from .conftest import assert_user_error, cli_in_process, run_cli, train_on


def test_ci_of_the_mean_matches_a_hand_computation():
    values = np.array([[1.0], [2.0], [3.0], [4.0]])
    mean, ci = validation.mean_ci95(values)
    # sample sd of 1..4 = sqrt(5/3) = 1.290994; 1.96 * 1.290994 / sqrt(4) = 1.265174
    assert mean[0] == pytest.approx(2.5) and ci[0] == pytest.approx(1.265174, rel=1e-6)


@pytest.mark.parametrize(
    "best, note, tried",
    [
        (1.0, "as given", 5),  # interior: the grid as given
        (10**1.5, "extended", 7),  # past the top: two more points find it inside
        (1e-4, "edge", 8),  # far below: three more points, still on the edge, and said so
    ],
)
def test_the_step_size_grid_extends_past_an_edge_best(best, note, tried):
    calls = []

    def score(lr):
        calls.append(lr)
        return (np.log10(lr) - np.log10(best)) ** 2

    got, tuning = evaluate.search_grid(score, [0.1 * 10 ** (i / 2) for i in range(5)])
    assert tuning["grid"] == note and len(calls) == len(set(calls)) == tried == len(tuning["scores"])
    if note != "edge":
        assert got == pytest.approx(best)
    else:
        assert got == min(calls)


def test_a_diverging_edge_is_not_extended():
    got, tuning = evaluate.search_grid(lambda lr: float("inf"), [0.1, 1.0, 10.0])
    assert len(tuning["scores"]) == 3


def test_blow_ups_are_reported_apart_from_tasks_that_got_worse():
    # bound 20: task 1 is non-finite, task 2 passes the bound (blow-ups); task 4 rose from a tiny
    # start (0.01 -> 0.3: "got worse", not a blow-up); tasks 0 and 3 improved
    losses = np.array([[1.0, 0.5], [1.0, np.inf], [2.0, 30.0], [1.0, 0.4], [0.01, 0.3]])
    s = evaltable.summarize(losses, None, [0, 1], bound=20.0)
    assert s["blow_up_fraction"] == [0.0, 0.4] and s["worse_fraction"] == [0.0, 0.2]
    assert s["loss_median"][1] == pytest.approx(0.5) and not np.isfinite(s["loss_mean"][1])


def _state(family: str, shots: int, queries: int):
    from distributed_maml import config
    from distributed_maml.data.sampler import Sampler
    from distributed_maml.training import checkpoint

    cfg = config.load(None, [f"task.family={family}", f"task.shots={shots}", f"task.queries={queries}"])
    return checkpoint.RunState(cfg, Sampler(0, 10, 2), checkpoint.StoreRef("x", family, 0, 0, 10))


def test_regression_held_out_tasks_score_k_points_at_k_shots():
    """The paper's K-shot regression protocol: K points to adapt, K to score; classification
    keeps the run's queries per class."""
    assert evaluate.generated_held_out(_state("sinusoid", 10, 10), 4, shots=5, seed=0).info.queries == 5
    assert evaluate.generated_held_out(_state("sinusoid", 10, 10), 4, shots=None, seed=0).info.queries == 10
    assert evaluate.generated_held_out(_state("seed", 5, 15), 4, shots=1, seed=0).info.queries == 15


def test_the_blow_up_bound_is_the_best_constant_guess_times_ten(tmp_path):
    reg = data.build_in_memory("sinusoid", 50, seed=0, shots=5, queries=5)
    y = reg.rows(np.arange(50), columns=("y_query",))["y_query"]
    assert evaluate.blow_up_bound(reg, 50) == pytest.approx(10 * np.mean(y.astype(np.float64) ** 2))
    cls = data.build_in_memory("seed", 10, seed=0, shots=5, queries=15)
    assert evaluate.blow_up_bound(cls, 10) == pytest.approx(10 * np.log(2))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from sklearn.datasets import load_digits

    d = load_digits()
    path = tmp_path_factory.mktemp("digits") / "digits.parquet"
    pq.write_table(pa.table({**{f"px{i}": d.data[:, i] for i in range(64)}, "digit": d.target}), path)
    return path


def _build(table, out, split, shots=5, num=2000, seed=0, frac=0.3):
    return data.build_from_table(table, out, "digit", 5, shots, 10, num, split, seed, frac)


@pytest.mark.parametrize("seed, frac", [(0, 0.3), (1, 0.5), (5, 0.3)])
def test_table_stores_never_share_a_class_between_splits(digits, tmp_path, seed, frac):
    tr = _build(digits, tmp_path / "tr.arrow", "train", num=300, seed=seed, frac=frac)
    te = _build(digits, tmp_path / "te.arrow", "test", num=300, seed=seed, frac=frac)
    assert tr.classes and te.classes and not set(tr.classes) & set(te.classes)
    assert sorted(tr.classes + te.classes) == [str(i) for i in range(10)]
    ids = [
        set(np.unique(data.TaskStore.open(tmp_path / f"{n}.arrow").rows(np.arange(300), ("params",))["params"]))
        for n in ("tr", "te")
    ]
    assert not ids[0] & ids[1]
    s = data.TaskStore.open(tmp_path / "tr.arrow")
    t = s.task(0)
    assert (
        s.info.input_dim == 64 and t["x_support"].shape == (25, 64) and np.bincount(t["y_query"]).tolist() == [10] * 5
    )


def test_table_tasks_hold_real_rows_of_their_classes(digits, tmp_path):
    _build(digits, tmp_path / "tr.arrow", "train", num=20)
    s = data.TaskStore.open(tmp_path / "tr.arrow")
    table = pq.read_table(digits)
    x = np.column_stack([table[f"px{i}"].to_numpy() for i in range(64)]).astype(np.float64)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)
    labels = table["digit"].to_numpy()
    t = s.task(3)
    for label, cls in enumerate(t["params"].astype(int)):
        rows = t["x_support"][t["y_support"] == label]
        members = x[labels == cls]  # class ids index the sorted labels '0'..'9', so id == digit
        for r in rows:  # every support example is a standardised row of its class
            assert np.abs(members - r).max(axis=1).min() < 1e-4


def test_table_build_bad_input(digits, tmp_path, capsys):
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,label\n1,x,0\n2,y,1\n")
    cases = [
        (["--from-table", digits, "--label-column", "nope"], "has no column 'nope'"),
        (["--from-table", csv, "--label-column", "label"], "feature columns must be numeric; not numeric: b"),
        (["--from-table", tmp_path / "t.xlsx", "--label-column", "x"], "does not exist"),
        (["--from-table", digits, "--label-column", "digit", "--ways", "6"], "too few for 6-way"),
        (
            ["--from-table", digits, "--label-column", "digit", "--shots", "150", "--queries", "50"],
            "fewer than shots + queries",
        ),
        (["--from-table", digits], "--from-table needs --label-column"),
    ]
    for i, (args, needle) in enumerate(cases):  # the first in a fresh interpreter, the rest in this one
        out = tmp_path / "o.arrow"
        call = run_cli if i == 0 else lambda *a: cli_in_process(capsys, *a)
        assert_user_error(call("tasks", "build", *args, "--num-tasks", "10", "--out", out), needle)
        assert not out.exists()
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(StoreError, match="must be one of"):
        data.build_from_table(tmp_path / "t.xlsx", tmp_path / "o.arrow", "x", 5, 1, 1, 10)


def test_baselines_see_exactly_the_same_tasks_and_steps(tmp_path, monkeypatch):
    out = tmp_path / "r"
    assert (
        run_cli(
            "train",
            "--output-dir",
            out,
            "--no-progress",
            "--set",
            "scaling.num_workers=0",
            "--set",
            "training.steps=20",
        ).returncode
        == 0
    )
    seen = []
    real = evaluate.curves

    def spy(executor, spec, params, n, steps, lr):
        store_ = executor.computer.store
        seen.append((id(store_), n, tuple(steps), lr, float(store_.rows(np.arange(n))["x_query"].sum())))
        return real(executor, spec, params, n, steps, lr)

    monkeypatch.setattr(evaluate, "curves", spy)
    res = evaluate.evaluate(out, steps=[0, 3], num_tasks=50, pretrain_steps=20, workers=0)
    assert len(seen) == 3 and len({x[:3] + x[4:] for x in seen}) == 1  # same store, tasks, steps
    assert set(res["baselines"]) == {"pretrained", "scratch"}
    # the step sizes: the run's for maml and scratch, the tuned one for pretrained
    pre = res["baselines"]["pretrained"]
    tuning = pre["inner_lr_tuning"]
    assert [x[3] for x in seen] == [0.5, pre["inner_lr"], 0.5] and res["baselines"]["scratch"]["inner_lr"] == 0.5
    scores = tuning["scores"]
    assert len(scores) >= len(evaluate.PRETRAINED_LR_GRID) and pre["inner_lr"] == float(min(scores, key=scores.get))
    assert seen[0][2] == (0, 3)  # the query sets are scored at the asked-for steps only
    assert json.loads((out / "eval" / "eval-5shots.json").read_text())["steps"] == [0, 3]
    # scratch only (eval --no-pretrained): two curves, no step-size search, scratch's numbers the same
    monkeypatch.setattr(evaluate, "tune_lr", lambda *a: pytest.fail("the pretrained baseline's search ran"))
    only = evaluate.evaluate(out, steps=[0, 3], num_tasks=50, pretrain_steps=20, workers=0, pretrained=False)
    assert set(only["baselines"]) == {"scratch"} and len(seen) == 5
    assert only["baselines"]["scratch"]["accuracy_mean"] == res["baselines"]["scratch"]["accuracy_mean"]


def test_meta_sgd_runs_are_evaluated_with_their_learned_step_sizes(tmp_path, capsys):
    """The maml init adapts with the checkpoint's learned step sizes (zeroed, it cannot move:
    the loss after one step is the loss before); the baselines with a fixed one."""
    import torch

    from distributed_maml.training import checkpoint

    out = tmp_path / "r"
    train_on(out, None, ["scaling.num_workers=0", "training.steps=6", "maml.algorithm=meta-sgd", "task.meta_batch=8"])
    cli = run_cli(
        "eval", "--run", out, "--steps", "0,1", "--num-tasks", "20", "--pretrain-steps", "5", "--workers", "0"
    )
    assert cli.returncode == 0 and "inner lr learned" in cli.stdout, cli.stderr  # the table, then the plots
    assert any(p.suffix == ".png" for p in (out / "plots").iterdir())
    res = json.loads((out / "eval" / "eval-5shots.json").read_text())
    assert res["inner_lr"] == "learned" and res["baselines"]["scratch"]["inner_lr"] == 0.5
    assert res["loss_mean"][1] != pytest.approx(res["loss_mean"][0], rel=1e-6)
    path = checkpoint.latest(out) / "inner_lr.pt"
    torch.save({k: torch.zeros_like(v) for k, v in torch.load(path).items()}, path)
    frozen = evaluate.evaluate(out, steps=[0, 1], num_tasks=20, baselines=False, workers=0)
    assert frozen["loss_mean"][1] == pytest.approx(frozen["loss_mean"][0], rel=1e-6)
    assert frozen["loss_mean"][0] == pytest.approx(res["loss_mean"][0], rel=1e-6)
    path.unlink()  # a checkpoint without its learned step sizes is refused, not evaluated at a fixed one
    gone = cli_in_process(capsys, "eval", "--run", out, "--num-tasks", "20", "--no-baselines", "--workers", "0")
    assert_user_error(gone, "inner_lr.pt is missing")
    assert gone.stderr.strip().endswith("from an older checkpoint folder of the run")


@pytest.mark.slow  # a learning demonstration (18 s): the default suite's share goes to correctness
def test_digits_demonstration_beats_scratch(digits, tmp_path):
    """jobs/digits.toml at 5 shots: after the trained number of inner steps (5), MAML's
    initialisation classifies unseen digit classes better than the run's random one."""
    _build(digits, tmp_path / "tr.arrow", "train", num=12800)
    _build(digits, tmp_path / "te.arrow", "test", num=600)
    out = tmp_path / "run"
    proc = run_cli(
        "train",
        "--config",
        "jobs/digits.toml",
        "--tasks",
        tmp_path / "tr.arrow",
        "--output-dir",
        out,
        "--set",
        "scaling.num_workers=0",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    assert_user_error(run_cli("eval", "--run", out), "needs --tasks")
    # scratch is the baseline this demonstration beats; the pretrained one is trained briefly (its cost, not its number)
    evaluated = run_cli(
        "eval", "--run", out, "--tasks", tmp_path / "te.arrow", "--steps", "0,5", "--pretrain-steps", "20", "--json"
    )
    res = json.loads(evaluated.stdout)
    maml, scratch = res["accuracy_mean"][1], res["baselines"]["scratch"]["accuracy_mean"][1]
    assert maml - res["accuracy_ci95"][1] > scratch + res["baselines"]["scratch"]["accuracy_ci95"][1], res
    assert res["accuracy_mean"][0] < 0.3  # unadapted: chance among 5 ways


def test_cli_eval_passes_every_flag(monkeypatch, tmp_path):
    """The CLI hands --workers (and the rest) to evaluate(): a flag the parser takes and drops
    would silently evaluate somewhere else."""
    from distributed_maml.cli import main as cli
    from distributed_maml.evaluation import evaluate, plots

    seen = {}

    def spy(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(evaluate, "evaluate", spy)
    monkeypatch.setattr(plots, "plot_run", lambda *_: [])
    with pytest.raises(SystemExit):
        cli.main(["eval", "--run", str(tmp_path), "--workers", "3", "--inner-lr", "0.1", "--num-tasks", "7",
                  "--no-pretrained"])  # fmt: skip
    assert seen["kwargs"]["workers"] == 3 and seen["kwargs"]["inner_lr"] == 0.1 and 7 in seen["args"]
    assert seen["kwargs"]["pretrained"] is False


def test_bench_eval_times_every_phase_of_the_protocol_against_training(monkeypatch, capsys):
    """`bench --eval` at a toy size: the eval's phases, the training time, and their ratio."""
    from distributed_maml.bench import evaluation as bench_eval

    monkeypatch.setattr(evaluate, "VALIDATION_TASKS", 4)
    monkeypatch.setattr(bench_eval, "measure", _tiny(bench_eval.measure))
    # the smallest run of the benchmark's kind: the assertions are of its bookkeeping, not its size
    # (at the benchmark's own conv4-32, 15 queries and 2,000 tasks it once passed 300 s under load)
    small = {"task.queries": "2", "task.meta_batch": "2", "task.num_tasks": "16", "model.channels": "4"}
    monkeypatch.setattr(
        bench_eval,
        "GLYPH_RUN",
        [
            f"{o.split('=')[0]}={small[o.split('=')[0]]}" if o.split("=")[0] in small else o
            for o in bench_eval.GLYPH_RUN
        ],
    )
    out = bench_eval.eval_main(quick=True)
    assert set(out["eval_phases_s"]) == {"baselines", "tuning", "curves"}
    assert all(v > 0 for v in out["eval_phases_s"].values()) and out["train_s"] > 0
    assert out["ratio"] == pytest.approx(out["eval_s"] / out["train_s"])
    assert out["pretrained_lr_grid"] in ("as given", "extended", "edge")
    assert (
        out["scoring_floor_s"] == pytest.approx(4 * 3 * 4 * out["query_scoring_s_per_task"])
        and out["scoring_floor_s"] > 0
    )
    printed = capsys.readouterr().out
    assert (
        "eval / training:" in printed
        and "the protocol's floor" in printed
        and json.loads(printed.strip().splitlines()[-1])["eval_tasks"] == 4
    )


def _tiny(measure):
    return lambda train_tasks, eval_tasks, pretrain_steps: measure(16, 4, 1)


def test_a_table_on_the_fly_holds_its_split_s_rows_once(digits, tmp_path):
    """`--from-table --on-the-fly`: the train split's standardised rows once; episodes draw only
    those classes (the same classes as a materialized train store of that seed)."""
    out = tmp_path / "fly.arrow"
    r = run_cli(
        "tasks", "build", "--from-table", digits, "--label-column", "digit", "--on-the-fly", "--ways", "3:5",
        "--shots", "1:4", "--queries", "3", "--out", out,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    fly = data.TaskStore.open(out)
    fixed = _build(digits, tmp_path / "fixed.arrow", "train", num=10)
    assert fly.info.on_the_fly and fly.info.classes == fixed.classes and fly.info.features == fixed.features
    pool = fly.drawer.examples
    assert pool.x.shape[1] == 64 and pool.x.dtype == np.float32 and int(pool.labels.max()) + 1 == len(fixed.classes)
    rows = fly.rows(np.arange(20))
    assert rows["x_support"].shape[0] == 20 and rows["y_support"].shape[-1] == 2  # padded, masks in the labels
