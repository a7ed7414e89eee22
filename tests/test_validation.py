"""Meta-validation while training, and the best checkpoints it keeps: val splits for every
family, val_loss / val_acc with their intervals in the log, best.json and checkpoints/best as
the argmax of what was logged, kept across a stop and resume, and `eval --checkpoint`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_maml import config, data
from distributed_maml.data.families import glyphs
from distributed_maml.data.families.images import split_classes
from distributed_maml.evaluation import evaltable, evaluate
from distributed_maml.training import checkpoint, run, train

from .conftest import assert_user_error, cli_in_process, run_cli

GLYPHS = [
    "task.family=glyphs",
    "model.name=conv4",
    "model.channels=8",
    "task.shots=1",
    "task.queries=3",
    "task.meta_batch=4",
    "task.num_tasks=64",
    "maml.inner_steps=1",
    "maml.inner_lr=0.4",
    "scaling.num_workers=0",
    "training.log_every=5",
    "training.eval_every=5",
    "training.eval_tasks=12",
    "training.keep_best=2",
    "training.keep_checkpoints=1",
]
SINUSOID = [
    "task.family=sinusoid",
    "model.name=sinusoid_mlp",
    "task.shots=5",
    "task.queries=5",
    "task.meta_batch=8",
    "task.num_tasks=80",
    "maml.inner_steps=1",
    "maml.inner_lr=0.01",
    "optimizer.lr=0.01",
    "scaling.num_workers=0",
    "training.log_every=3",
    "training.eval_every=3",
    "training.eval_tasks=16",
    "training.keep_best=3",
    "training.checkpoint_every=6",
    "training.keep_checkpoints=1",
]


def _train(run_dir, overrides, steps, resume=False):
    if resume:
        r = run.resume(run_dir, overrides=[f"training.steps={steps}"])
    else:
        r = run.prepare(config.load(None, [*overrides, f"training.steps={steps}"]), run_dir, progress=False)
    ex = train.make_executor(r)
    try:
        return train.train(r, ex, progress=False)
    finally:
        ex.close()


def _logged(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_split_classes_adds_val_classes_without_moving_the_test_classes():
    two = split_classes(40, 3, 0.25, 7, "t")
    three = split_classes(40, 3, 0.25, 7, "t", val_fraction=0.2)
    assert np.array_equal(two["test"], three["test"]) and len(two["val"]) == 0
    parts = [set(three[s].tolist()) for s in ("train", "val", "test")]
    assert len(parts[1]) == 8 and sum(map(len, parts)) == 40 and set.union(*parts) == set(range(40))
    assert set(three["train"].tolist()) == set(two["train"].tolist()) - parts[1]


def test_glyph_val_classes_are_neither_train_nor_test_classes():
    ids = {s: set(glyphs.class_ids(s).tolist()) for s in ("train", "val", "test")}
    assert len(ids["val"]) == glyphs.VAL_CLASSES
    assert not ids["val"] & ids["train"] and not ids["val"] & ids["test"] and not ids["train"] & ids["test"]


def test_best_is_the_argmax_of_the_logged_validation_accuracy_and_eval_takes_it(tmp_path, capsys):
    out = tmp_path / "g"
    _train(out, GLYPHS, 30)
    val = [r for r in _logged(out) if "val_acc" in r]
    assert [r["step"] for r in val] == [5, 10, 15, 20, 25, 30]
    assert all(0 < r["val_acc_ci95"] < 0.5 and r["val_loss_ci95"] > 0 for r in val)
    ranked = sorted(val, key=lambda r: (-r["val_acc"], r["step"]))[:2]  # ties: the earlier step
    best = checkpoint.read_best(out)
    assert [(b.step, b.metric) for b in best] == [(r["step"], "val_acc") for r in ranked]
    assert [b.value for b in best] == pytest.approx([r["val_acc"] for r in ranked], rel=1e-6)
    assert (out / "checkpoints" / "best").read_text() == f"step_{ranked[0]['step']}"
    kept = {p.name for p in (out / "checkpoints").glob("step_*")}
    assert kept == {f"step_{r['step']}" for r in ranked} | {"step_30"}  # keep_checkpoints = 1 spares the best
    assert checkpoint.load(checkpoint.resolve(out)).step == ranked[0]["step"]

    res = evaluate.evaluate(out, steps=(1,), num_tasks=20, baselines=False, workers=0)
    assert (res["checkpoint"], res["checkpoint_step"]) == ("best", ranked[0]["step"])
    assert f"checkpoint step {ranked[0]['step']} (best)" in evaltable.format_table(res)
    latest = evaluate.evaluate(out, steps=(1,), num_tasks=20, baselines=False, workers=0, which="latest")
    assert (latest["checkpoint"], latest["checkpoint_step"]) == ("latest", 30)
    assert (out / "eval" / "eval-1shots-step_30.json").exists()  # a checkpoint by name keeps its own file
    assert_user_error(run_cli("eval", "--run", out, "--checkpoint", "step_4", "--no-baselines"), "no checkpoint step_4")
    assert_user_error(
        cli_in_process(capsys, "eval", "--run", out, "--checkpoint", "worst", "--no-baselines"),
        "best, latest or step_N",
    )


def test_a_stopped_and_resumed_run_keeps_the_same_best(tmp_path):
    """Regression (select_by auto = val_loss, lower is better): a run stopped at step 12 and
    resumed, and one whose latest checkpoint fell back to its earliest kept one (a crash, with
    best entries after it, which are validated again), end with the
    straight run's best.json, pointer and folders."""
    straight, stopped, crashed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _train(straight, SINUSOID, 24)
    _train(stopped, SINUSOID, 12)
    _train(stopped, SINUSOID, 24, resume=True)
    _train(crashed, SINUSOID, 18)
    earliest = min(int(p.name[5:]) for p in (crashed / "checkpoints").glob("step_*"))
    assert earliest < 18 and any(b.step > earliest for b in checkpoint.read_best(crashed))
    (crashed / "checkpoints" / "latest").write_text(f"step_{earliest}")  # as if it died after that checkpoint
    _train(crashed, SINUSOID, 24, resume=True)
    val = [r for r in _logged(straight) if "val_loss" in r]
    ranked = sorted(val, key=lambda r: (r["val_loss"], r["step"]))[:3]
    want = checkpoint.read_best(straight)
    assert [b.step for b in want] == [r["step"] for r in ranked] and want[0].metric == "val_loss"
    for other in (stopped, crashed):
        assert checkpoint.read_best(other) == want
        assert (other / "checkpoints" / "best").read_text() == (straight / "checkpoints" / "best").read_text()
        assert {p.name for p in (other / "checkpoints").glob("step_*")} == {
            p.name for p in (straight / "checkpoints").glob("step_*")
        }


def test_select_by_val_acc_on_regression_is_refused_before_the_folder_is_made(tmp_path):
    from distributed_maml.errors import ConfigError

    with pytest.raises(ConfigError, match="select_by = val_acc needs a classification family"):
        run.prepare(config.load(None, [*SINUSOID, "training.select_by=val_acc"]), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def digit_stores(tmp_path_factory):
    """2-way digit tasks from a table: train and val stores built with --val-fraction 0.2, and a
    train store built without it (its classes include the val ones)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    folder = tmp_path_factory.mktemp("digits")
    table = folder / "digits.parquet"
    pq.write_table(pa.table({**{f"px{i}": d.data[:, i] for i in range(64)}, "digit": d.target}), table)
    args = ["--from-table", table, "--label-column", "digit", "--ways", "2", "--shots", "2", "--queries", "4"]
    for name, split, extra in (
        ("train", "train", ["--val-fraction", "0.2"]),
        ("val", "val", ["--val-fraction", "0.2"]),
        ("train-all", "train", []),
    ):
        built = run_cli(
            "tasks",
            "build",
            *args,
            "--num-tasks",
            "200",
            "--classes-split",
            split,
            *extra,
            "--out",
            folder / f"{name}.arrow",
        )
        assert built.returncode == 0, built.stderr
    return folder


def test_a_table_run_validates_on_its_val_store_through_the_cli(digit_stores, tmp_path, capsys):
    stores = {n: data.TaskStore.open(digit_stores / f"{n}.arrow").info for n in ("train", "val", "train-all")}
    assert stores["val"].split == "val" and len(stores["val"].classes) == 2
    assert not set(stores["val"].classes) & set(stores["train"].classes)
    assert set(stores["val"].classes) <= set(stores["train-all"].classes)
    out = tmp_path / "run"
    common = [
        "--set",
        "task.family=table",
        "--set",
        "model.name=mlp",
        "--set",
        "task.shots=2",
        "--set",
        "task.queries=4",
    ]
    common += ["--set", "scaling.num_workers=0", "--set", "training.steps=20", "--set", "training.eval_every=10"]
    proc = run_cli(
        "train",
        "--tasks",
        digit_stores / "train.arrow",
        "--val-tasks",
        digit_stores / "val.arrow",
        "--output-dir",
        out,
        "--no-progress",
        *common,
        "--set",
        "training.eval_tasks=50",
    )
    assert proc.returncode == 0, proc.stderr
    assert "validated on 50 tasks from the" in proc.stdout and "Val Accuracy:" in proc.stdout
    assert [r["step"] for r in _logged(out) if "val_acc" in r] == [10, 20]
    assert checkpoint.read_best(out) and (out / "checkpoints" / "best").is_file()
    # validating on training classes, or on a train store, is refused before anything is made
    for train_store, val_store, needle in (
        ("train-all", "val", "shares 2 class(es) with the training store"),
        ("train", "train", "is a train store"),
    ):
        bad = tmp_path / f"bad-{train_store}-{val_store}"
        proc = cli_in_process(  # the parser's error path here; the shell's view is the run above
            capsys,
            "train",
            "--tasks",
            digit_stores / f"{train_store}.arrow",
            "--val-tasks",
            digit_stores / f"{val_store}.arrow",
            "--output-dir",
            bad,
            "--no-progress",
            *common,
        )
        assert_user_error(proc, needle)
        assert not bad.exists()  # checked before the run folder is made
    no_val = cli_in_process(
        capsys,
        "tasks",
        "build",
        "--from-table",
        digit_stores / "digits.parquet",
        "--label-column",
        "digit",
        "--ways",
        "2",
        "--num-tasks",
        "5",
        "--classes-split",
        "val",
        "--out",
        tmp_path / "v.arrow",
    )
    assert_user_error(no_val, "--classes-split val needs --val-fraction > 0")
    assert not (tmp_path / "v.arrow").exists()
