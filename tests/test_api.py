"""A trained run's way out (issue 38), Ray-free: the Python API, `distributed-maml adapt`, and
export/load give the same predictions on the same task bit for bit, and equal `eval`'s
adaptation on a store's tasks (the same accuracy, or query loss for regression), for each
algorithm family: plain MAML, a learned-step-size one (Meta-SGD), ANIL, iMAML and conv4 with
per-task BatchNorm. The served path is tests/test_serve.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import distributed_maml as dm
from distributed_maml.data.store import TaskStore
from distributed_maml.data.writing import build
from distributed_maml.evaluation import evaluate

from .conftest import assert_user_error, cli_in_process, run_cli, trained_once, tree_digest

COMMON = ["scaling.num_workers=0", "training.log_every=5", "task.meta_batch=4", "task.num_tasks=40"]
FAMILIES = {  # name: (overrides, the held-out store's family and ways)
    "maml": (["training.steps=10", "training.eval_every=5", "training.eval_tasks=10"], ("seed", 0)),
    "meta-sgd": (
        ["task.family=sinusoid", "model.name=sinusoid_mlp", "maml.algorithm=meta-sgd", "maml.inner_lr=0.01",
         "training.steps=10", "training.eval_every=0"],
        ("sinusoid", 0),
    ),
    "anil": (["maml.algorithm=anil", "training.steps=10", "training.eval_every=0"], ("seed", 0)),
    "imaml": (["maml.algorithm=imaml", "maml.inner_lr=0.1", "training.steps=6", "training.eval_every=0"], ("seed", 0)),
    "conv4-bn": (
        ["task.family=glyphs", "task.ways=3", "task.shots=1", "task.queries=2", "model.name=conv4",
         "model.channels=4", "maml.inner_steps=1", "maml.inner_lr=0.4", "training.steps=4", "training.eval_every=0",
         "task.meta_batch=2", "task.num_tasks=8"],
        ("glyphs", 3),
    ),
}  # fmt: skip
HELD_OUT = 12


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Each family's trained run and a held-out (test-split) store of its tasks."""
    out = {}
    for name, (sets, (family, ways)) in FAMILIES.items():

        def make(folder: Path, sets=sets, family=family, ways=ways) -> Path:
            dm.train(None, [*COMMON, *sets], output_dir=folder / "run", progress=False)
            build(folder / "test.arrow", family, HELD_OUT, seed=7, split="test", progress=False, ways=ways)
            return folder

        folder = trained_once(tmp_path_factory, f"api-{name}", make)
        out[name] = (folder / "run", folder / "test.arrow")
    return out


def _tasks(store: Path) -> dict[str, np.ndarray]:
    return TaskStore.open(store).rows(np.arange(HELD_OUT))


def _api_predictions(meta: dm.MetaModel, rows: dict[str, np.ndarray]) -> list[dm.Prediction]:
    adapted = meta.adapt_many([(rows["x_support"][i], rows["y_support"][i]) for i in range(HELD_OUT)])
    return meta.predict_many(adapted, [rows["x_query"][i] for i in range(HELD_OUT)])


def _same(a: dm.Prediction, b: dm.Prediction) -> bool:
    if a.probabilities is not None:
        return bool(np.array_equal(a.probabilities, b.probabilities) and np.array_equal(a.labels, b.labels))
    return bool(np.array_equal(a.labels, b.labels))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_api_export_and_eval_agree(runs, tmp_path, family):
    run_dir, store = runs[family]
    run = dm.open_run(run_dir)
    meta = run.meta_model()
    rows = _tasks(store)
    got = _api_predictions(meta, rows)
    # export/load: the same meta-model, bit for bit, without the run (and no pickle)
    exported = dm.export(run_dir, tmp_path / "export")
    loaded = dm.load(exported)
    assert all(torch.equal(loaded.meta[k], meta.meta[k]) for k in meta.meta)
    assert all(_same(a, b) for a, b in zip(got, _api_predictions(loaded, rows), strict=True))
    # one task alone and the same task among others: the same bits (the serve batches by arrival)
    alone = meta.predict(rows["x_support"][5], rows["y_support"][5], rows["x_query"][5])
    assert _same(alone, got[5])
    # eval's adaptation on the same tasks: the same accuracy (regression: the same query loss)
    steps = meta.config.maml.inner_steps
    result = evaluate.evaluate(run_dir, store, steps=(steps,), num_tasks=HELD_OUT, baselines=False)
    if meta.kind == "classification":
        acc = [float((p.labels == rows["y_query"][i]).mean()) for i, p in enumerate(got)]
        # eval averages float32 accuracies: equal up to their rounding, while one prediction
        # apart would move the mean by 1 / (tasks x queries) >= 1/360
        assert np.mean(acc) == pytest.approx(result["accuracy_mean"][0], abs=1e-6)
        assert 0 < np.mean(acc) <= 1
    else:
        loss = [float(np.mean((p.labels - rows["y_query"][i]) ** 2)) for i, p in enumerate(got)]
        np.testing.assert_allclose(np.mean(loss), result["loss_mean"][0], rtol=1e-6)
    # the meta-weights never change
    assert all(torch.equal(dm.open_run(run_dir).meta_model().meta[k], meta.meta[k]) for k in meta.meta)


def _write_task(rows: dict[str, np.ndarray], i: int, meta: dm.MetaModel, root: Path) -> tuple[Path, Path]:
    """Task i as a user would hand it to `adapt`: tables of features (and a label column), or
    image folders (support: a folder per class; queries: image files)."""
    xs, ys, xq = rows["x_support"][i], rows["y_support"][i], rows["x_query"][i]
    if len(meta.example_shape) == 3:
        from PIL import Image

        for j, (img, label) in enumerate(zip(xs, ys, strict=True)):
            folder = root / "support" / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0]).save(folder / f"{j}.png")
        (root / "query").mkdir()
        for j, img in enumerate(xq):
            Image.fromarray(img[0]).save(root / "query" / f"q{j:03d}.png")
        return root / "support", root / "query"
    cols = {f"f{k}": xs[:, k] for k in range(xs.shape[1])}
    cols["label"] = ys.reshape(len(xs), -1)[:, 0]
    pq.write_table(pa.table(cols), root / "support.parquet")
    pq.write_table(pa.table({f"f{k}": xq[:, k] for k in range(xq.shape[1])}), root / "query.parquet")
    return root / "support.parquet", root / "query.parquet"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_adapt_command_predicts_what_the_api_does(runs, tmp_path, capsys, family):
    """`distributed-maml adapt` on the task written as files (tables, or PNG image folders with
    class folder names as labels) writes the API's predictions, bit for bit."""
    run_dir, store = runs[family]
    meta = dm.open_run(run_dir).meta_model()
    rows = _tasks(store)
    support, query = _write_task(rows, 3, meta, tmp_path)
    out = tmp_path / "pred.parquet"
    proc = cli_in_process(capsys, "adapt", "--run", run_dir, "--support", support, "--query", query, "--out", out)
    assert proc.returncode == 0, proc.stderr
    got = pq.read_table(out)
    labels = np.asarray([f"class{v}" for v in rows["y_support"][3]]) if len(meta.example_shape) == 3 else None
    want = meta.predict(
        rows["x_support"][3], labels if labels is not None else rows["y_support"][3], rows["x_query"][3]
    )
    if want.probabilities is None:
        np.testing.assert_array_equal(got["prediction"].to_numpy(), want.labels[:, 0])
    else:
        probs = np.column_stack([got[f"p_{c}"].to_numpy() for c in want.classes])
        np.testing.assert_array_equal(probs, want.probabilities)
        assert got["prediction"].to_pylist() == want.labels.tolist()


def test_readme_adapt_and_export_commands_in_a_shell(runs, tmp_path):
    """The README's `adapt` and `export` lines as a shell runs them; the export adapts alike."""
    run_dir, store = runs["maml"]
    meta = dm.open_run(run_dir).meta_model()
    support, query = _write_task(_tasks(store), 2, meta, tmp_path)
    a = run_cli("adapt", "--run", run_dir, "--support", support, "--query", query, "--out", tmp_path / "a.csv")
    assert a.returncode == 0 and "wrote" in a.stdout, a.stderr
    e = run_cli("export", "--run", run_dir, "--out", tmp_path / "exported")
    assert e.returncode == 0, e.stderr
    card = json.loads((tmp_path / "exported" / "card.json").read_text())
    assert card["adaptation"]["algorithm"] == "maml" and card["model"]["input_shape"] == [10]
    b = run_cli(
        "adapt", "--run", tmp_path / "exported", "--support", support, "--query", query, "--out", tmp_path / "b.csv"
    )
    assert b.returncode == 0, b.stderr
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_learned_step_sizes_anil_heads_and_imaml_reach_the_card(runs, tmp_path):
    cards = {}
    for family in ("meta-sgd", "anil", "imaml", "conv4-bn"):
        dm.export(runs[family][0], tmp_path / family)
        cards[family] = json.loads((tmp_path / family / "card.json").read_text())["adaptation"]
    assert cards["meta-sgd"]["learned_inner_lr"] == "per-element"
    assert cards["anil"]["anil_head"] == ["2.bias", "2.weight"]
    assert cards["imaml"]["imaml"] == {"lambda": 1.0, "solver": "backtracking"}
    assert "per-task" in cards["conv4-bn"]["batch_norm"]


def test_open_run_reads_metrics_checkpoints_and_best(runs):
    run = dm.open_run(runs["maml"][0])
    table = run.metrics
    assert table.column("step").to_pylist() == [1, 5, 10]
    assert "val_acc" in table.column_names and table.column("val_acc").to_pylist()[0] is None  # validated steps only
    assert [c.step for c in run.checkpoints][-1] == 10 and run.latest.step == 10
    assert run.best is not None and run.best.score[0] == "val_acc"
    assert run.config.training.steps == 10


def test_a_task_with_fewer_classes_than_outputs_never_predicts_the_missing_ones(runs):
    run_dir, store = runs["conv4-bn"]
    meta = dm.open_run(run_dir).meta_model()
    rows = _tasks(store)
    keep = rows["y_support"][0] < 2  # two of the three classes
    adapted = meta.adapt(rows["x_support"][0][keep], rows["y_support"][0][keep])
    assert adapted.classes == (0, 1)
    probs = adapted.predict_proba(rows["x_query"][0])
    assert probs.shape == (len(rows["x_query"][0]), 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert set(adapted.predict(rows["x_query"][0]).tolist()) <= {0, 1}


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--support", "missing.csv"), "does not exist"),
        (("--label-column", "nope"), "has no label column 'nope'"),
        (("--out", "pred.txt"), "must end in .csv or .parquet"),
        (("--steps", "-1"), "steps must be in [0, 1000]"),
        (("--checkpoint", "step_999"), "has no checkpoint step_999"),
        (("--out", "no/such/folder/p.csv"), "--out no/such/folder/p.csv cannot be written"),
    ],
)
def test_bad_adapt_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, monkeypatch, args, needle):
    run_dir, store = runs["maml"]
    meta = dm.open_run(run_dir).meta_model()
    support, query = _write_task(_tasks(store), 1, meta, tmp_path)
    monkeypatch.chdir(tmp_path)
    base = {"--run": str(run_dir), "--support": str(support), "--query": str(query), "--out": "pred.csv"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    before = tree_digest(run_dir)
    proc = cli_in_process(capsys, "adapt", *[a for kv in base.items() for a in kv])
    assert_user_error(proc, needle)
    assert not (tmp_path / "pred.csv").exists() and not (tmp_path / "pred.txt").exists()
    assert tree_digest(run_dir) == before


def test_a_corrupt_or_foreign_export_is_one_line(runs, tmp_path, capsys):
    exported = dm.export(runs["maml"][0], tmp_path / "e")
    weights = exported / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    proc = cli_in_process(
        capsys, "adapt", "--run", exported, "--support", "s.csv", "--query", "q.csv", "--out", tmp_path / "p.csv"
    )
    assert_user_error(proc, "does not match its card's sha-256")
    assert_user_error(cli_in_process(capsys, "export", "--run", runs["maml"][0], "--out", exported), "already exists")
    (tmp_path / "not-a-run").mkdir()
    assert_user_error(
        cli_in_process(capsys, "export", "--run", tmp_path / "not-a-run", "--out", tmp_path / "x"),
        "not a distributed-maml run",
    )
    assert not (tmp_path / "x").exists()


def test_the_api_train_is_the_cli_train_bit_for_bit(tmp_path):
    """dm.train and `distributed-maml train` (which calls it) make the same run; the metrics
    table reads back what the log holds (pandas where installed)."""
    sets = [*COMMON, "training.steps=6", "training.eval_every=3", "training.eval_tasks=10"]
    api = dm.train(None, sets, output_dir=tmp_path / "api", progress=False)
    proc = run_cli("train", "--output-dir", tmp_path / "cli", "--no-progress", *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr
    assert f"done: 6 steps; checkpoint {tmp_path / 'cli' / 'checkpoints' / 'step_6'}" in proc.stdout
    a = torch.load(api.latest.path / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "cli" / "checkpoints" / "step_6" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    frame = dm.open_run(tmp_path / "cli").metrics_dataframe()
    assert list(frame["step"]) == [1, 3, 5, 6] and frame["val_acc"].notna().sum() == 2


def test_loading_an_export_never_unpickles(runs, tmp_path, monkeypatch):
    """dm.load reads safetensors and JSON only: with every unpickler made to fail, it still loads."""
    import pickle

    exported = dm.export(runs["imaml"][0], tmp_path / "e")

    def refuse(*args, **kwargs):
        raise AssertionError("an export load unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    meta = dm.load(exported, device="cpu")
    assert meta.config.maml.algorithm == "imaml" and meta.kind == "classification"


def test_a_table_runs_raw_rows_are_standardised_as_its_store_was(tmp_path):
    """A run trained on a table takes the user's raw rows: standardised with the training table's
    statistics (kept in the store's metadata), they are the store's own inputs bit for bit; and
    `adapt` reads the feature columns the run trained on by name, in any column order."""
    from distributed_maml import data
    from distributed_maml.data.families import table as table_mod

    rng = np.random.default_rng(0)
    raw = rng.normal(3.0, 2.0, size=(120, 4)) * np.array([1, 10, 100, 0.1])
    labels = np.repeat(np.arange(6), 20)
    cols = {f"f{k}": raw[:, k] for k in range(4)}
    pq.write_table(pa.table({**cols, "kind": labels}), tmp_path / "t.parquet")
    store = tmp_path / "train.arrow"
    data.build_from_table(tmp_path / "t.parquet", store, "kind", 2, 3, 3, 20, "train", 0, 0.3)
    run = dm.train(None, [*COMMON, "task.family=table", "task.shots=3", "task.queries=3", "model.name=mlp",
                          "training.steps=2", "training.eval_every=0", "task.num_tasks=0"],
                   output_dir=tmp_path / "run", tasks=store, progress=False)  # fmt: skip
    meta = run.meta_model(device="cpu")
    assert meta.info.features == ("f0", "f1", "f2", "f3")
    want = table_mod.load(tmp_path / "t.parquet", "kind", 2, 3, 3, "train", 0.3, 0).features  # the store's inputs
    np.testing.assert_array_equal(meta.standardize(raw), want)
    # the support table with its columns shuffled and an extra one: read by name
    first = np.flatnonzero(labels < 2)
    shuffled = {"note": np.zeros(len(first)), "f2": raw[first, 2], "kind": labels[first], "f0": raw[first, 0],
                "f3": raw[first, 3], "f1": raw[first, 1]}  # fmt: skip
    pq.write_table(pa.table(shuffled), tmp_path / "s.parquet")
    pq.write_table(pa.table({f"f{k}": raw[first, k] for k in range(4)}), tmp_path / "q.parquet")
    out = tmp_path / "p.parquet"
    proc = run_cli("adapt", "--run", run.path, "--support", tmp_path / "s.parquet", "--query", tmp_path / "q.parquet",
                   "--out", out, "--label-column", "kind")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    expect = meta.predict(raw[first], labels[first], raw[first])
    got = pq.read_table(out)
    np.testing.assert_array_equal(np.column_stack([got["p_0"], got["p_1"]]), expect.probabilities)


def test_the_package_top_offers_exactly_the_api_names():
    """`distributed_maml.X` loads api.X on first use (the top stays free of torch): the two lists agree."""
    import distributed_maml.api as api

    assert set(dm.__all__) - {"__version__"} == set(api.__all__)
    assert all(getattr(dm, name) is getattr(api, name) for name in api.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        dm.nope  # noqa: B018


def test_a_run_trained_by_ray_workers_adapts_in_this_process(runs):
    """The meta-model of a run whose [scaling] names Ray workers, a collective group or pools
    adapts here, on this process's device: the run's scaling is where it trained, not where it adapts."""
    from distributed_maml import config

    run_dir, store = runs["maml"]
    ckpt_model = dm.open_run(run_dir).meta_model(device="cpu")
    rows = _tasks(store)
    want = ckpt_model.predict(rows["x_support"][0], rows["y_support"][0], rows["x_query"][0])
    for sets in (
        ["scaling.num_workers=4", "scaling.mode=collective"],
        ["scaling.num_workers=-1", "scaling.pools=[{num_workers = 2, gpus_per_worker = 0.5}]"],
    ):
        cfg = config.from_dict(config.apply_overrides(ckpt_model.config.to_dict(), sets))
        meta = dm.MetaModel(cfg, ckpt_model.info, ckpt_model.meta, device="cpu")
        got = meta.predict(rows["x_support"][0], rows["y_support"][0], rows["x_query"][0])
        assert _same(got, want), sets
