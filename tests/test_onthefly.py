"""On-the-fly stores: a task is the documented function of (seed, id), the keyed sampler is a
bijection of up to 2**63 - 1 ids, a run on variable episodes trains, resumes bit-identical and
evaluates by ways, and the CLI builds and describes such stores (one line on bad input)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distributed_maml import config
from distributed_maml.data import TaskStore, episodes, padding
from distributed_maml.data.families import FAMILIES
from distributed_maml.data.onthefly import plan_stream
from distributed_maml.data.sampler import ROUNDS, Sampler, _mix, keyed_permutation
from distributed_maml.data.writing import write_batches
from distributed_maml.training import checkpoint, run, train

from .conftest import assert_user_error, cli_in_process, run_cli

GLYPH_SPEC = episodes.EpisodeSpec(ways=(3, 6), shots=(1, 4), queries=(1, 3), max_support=16)


def _write(tmp_path, family, spec, name="s.arrow", seed=7, split="train", num_tasks=episodes.TASK_IDS):
    p = plan_stream(family, spec, seed, split, num_tasks)
    return write_batches(tmp_path / name, p.info, p.batches(), overwrite=False)


# -- the task as a function of (seed, id) -----------------------------------------------------


def _documented_image_episode(x, labels, seed, task_id, spec):
    """The module doc's definition, written out: Philox(key=[seed, id]), shape, classes, examples."""
    rng = np.random.Generator(np.random.Philox(key=np.array([seed, task_id], dtype=np.uint64)))
    ways = rng.integers(spec.ways[0], spec.ways[1] + 1)
    queries = rng.integers(spec.queries[0], spec.queries[1] + 1)
    shots = rng.integers(spec.shots[0], spec.shots[1] + 1, size=ways)
    if shots.sum() > spec.max_support:
        shots = 1 + (shots - 1) * (spec.max_support - ways) // (shots.sum() - ways)
    counts = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    classes = rng.choice(len(counts), ways, replace=False)
    keys = rng.random((ways, counts[classes].max()))
    xs, ys, xq, yq = [], [], [], []
    for i, (c, s) in enumerate(zip(classes, shots)):
        keys[i, counts[c] :] = np.inf
        picks = starts[c] + np.argsort(keys[i])[: s + queries]
        xs += list(x[picks[:s]])
        xq += list(x[picks[s:]])
        ys += [i] * s
        yq += [i] * queries
    return np.array(xs), np.array(ys), np.array(xq), np.array(yq)


def test_an_image_episode_is_the_documented_function_of_seed_and_id(tmp_path):
    path = _write(tmp_path, "glyphs", GLYPH_SPEC)
    store = TaskStore.open(path)
    table = FAMILIES["glyphs"].table("train")
    for task_id in (0, 12345, 2**62 + 17):
        xs, ys, xq, yq = _documented_image_episode(table.images, table.labels, 7, task_id, GLYPH_SPEC)
        got = padding.unpad(store.rows(np.array([task_id])), 0, "classification")
        assert np.array_equal(got["x_support"], xs) and np.array_equal(got["y_support"], ys)
        assert np.array_equal(got["x_query"], xq) and np.array_equal(got["y_query"], yq)


def test_a_fixed_shape_family_episode_is_the_family_s_own_draw(tmp_path):
    spec = episodes.EpisodeSpec.fixed_shape(2, 3, 4)
    store = TaskStore.open(_write(tmp_path, "seed", spec))
    rows = store.rows(np.array([5, 2**40]))
    for i, task_id in enumerate((5, 2**40)):
        rng = episodes.task_rng(7, task_id)
        episodes.draw_shape(rng, spec)  # the shape's draws come first, even when fixed
        want = FAMILIES["seed"].generate(rng, 1, 3, 4)
        for k in ("x_support", "y_support", "x_query", "y_query"):
            assert np.array_equal(rows[k][i], want[k][0])
    assert rows["y_support"].shape == (2, 6)  # plain labels: no padding when the shape is fixed


def test_held_out_splits_draw_other_episodes_and_a_reopened_store_the_same(tmp_path):
    spec = episodes.EpisodeSpec((1, 1), (2, 8), (3, 5))
    a = TaskStore.open(_write(tmp_path, "sinusoid", spec, "a.arrow"))
    b = TaskStore.open(_write(tmp_path, "sinusoid", spec, "b.arrow", split="test"))
    again = TaskStore.open(tmp_path / "a.arrow")
    ids = np.arange(6)
    ra, rb, r2 = a.rows(ids), b.rows(ids), again.rows(ids)
    assert all(np.array_equal(ra[k], r2[k]) for k in ra)
    assert not np.array_equal(ra["x_query"][:, :3], rb["x_query"][:, :3])
    assert (tmp_path / "a.arrow").stat().st_size < 4096  # a generated family's store: metadata only


# -- the keyed sampler --------------------------------------------------------------------------


def _inverse(ids: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """The keyed permutation undone (Feistel rounds backwards, cycle-walking backwards)."""
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half, mask = np.uint64(bits // 2), np.uint64((1 << (bits // 2)) - 1)
    keys = np.random.SeedSequence([seed, epoch, 0xFE15]).generate_state(ROUNDS, np.uint64)

    def back(x):
        left, right = x >> half, x & mask
        for k in keys[::-1]:
            left, right = right ^ (_mix(left ^ k) & mask), left
        return (left << half) | right

    with np.errstate(over="ignore"):
        out = back(np.asarray(ids, dtype=np.uint64))
        walk = out >= np.uint64(n)
        while walk.any():
            out[walk] = back(out[walk])
            walk = out >= np.uint64(n)
    return out.astype(np.int64)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 1023, 1025])
def test_the_keyed_permutation_is_a_bijection(n):
    ids = keyed_permutation(np.arange(n, dtype=np.uint64), n, 3, 1)
    assert sorted(ids.tolist()) == list(range(n))
    assert not np.array_equal(ids, keyed_permutation(np.arange(n, dtype=np.uint64), n, 3, 2)) or n < 3


@pytest.mark.parametrize("n", [10**9, 2**63 - 1])
def test_a_run_over_huge_id_spaces_never_repeats_a_task(n):
    """Every position maps to one id in [0, n) that maps back to it: no two steps share a task."""
    rng = np.random.default_rng(0)
    positions = np.unique(np.concatenate([np.arange(200_000), rng.integers(0, n, 200_000)]))
    ids = keyed_permutation(positions.astype(np.uint64), n, 11, 0)
    assert ids.min() >= 0 and ids.max() < n
    assert len(np.unique(ids)) == len(ids)
    assert np.array_equal(_inverse(ids, n, 11, 0), positions)


def test_the_sampler_visits_every_id_once_per_epoch_and_sorts_a_step_by_shape(tmp_path):
    small = TaskStore.open(_write(tmp_path, "glyphs", GLYPH_SPEC, num_tasks=30))
    s = Sampler.of(small, 4, 10)
    assert s.order == "keyed" and s.shapes is not None
    for epoch in range(3):
        seen = np.concatenate([s.ids(epoch * 3 + k) for k in range(3)])
        assert sorted(seen.tolist()) == list(range(30))
    shapes = s.shapes.of(s.ids(4))
    keys = [tuple(r) for r in shapes]
    assert keys == sorted(keys)  # contiguous shards hold episodes of similar shape
    assert Sampler(**s.state()).order == "keyed"


# -- runs -----------------------------------------------------------------------------------------

SMALL = [
    "task.family=glyphs",
    "task.ways=[2, 4]",
    "task.shots=[1, 3]",
    "task.queries=2",
    "task.meta_batch=6",
    "model.name=mlp",
    "model.hidden=[16]",
    "maml.inner_steps=1",
    "training.log_every=2",
    "scaling.num_workers=0",
]


def _train(tmp, name, steps, resume=False, extra=()):
    """A SMALL run (with `extra` settings) trained in-process to `steps` in tmp/name."""
    if resume:
        r = run.resume(tmp / name, overrides=[f"training.steps={steps}"])
    else:
        r = run.prepare(config.load(None, [*SMALL, *extra, f"training.steps={steps}"]), tmp / name, progress=False)
    ex = train.make_executor(r)
    try:
        return train.train(r, ex, progress=False)
    finally:
        ex.close()


def test_a_variable_episode_run_resumes_bit_identical(tmp_path):
    _train(tmp_path, "straight", 6)
    _train(tmp_path, "stopped", 3)
    _train(tmp_path, "stopped", 6, resume=True)
    a = checkpoint.load(checkpoint.latest(tmp_path / "straight"))
    b = checkpoint.load(checkpoint.latest(tmp_path / "stopped"))
    assert a.step == b.step == 6
    for k in a.model:
        assert np.array_equal(a.model[k].numpy(), b.model[k].numpy()), k
    store = TaskStore.open(tmp_path / "straight" / run.STORE_NAME)
    assert store.info.on_the_fly and store.info.output_dim == 4
    assert (tmp_path / "straight" / run.STORE_NAME).stat().st_size < 30 * 2**20  # the glyph table, no task rows
    logged = {
        name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("straight", "stopped")
    }
    assert [x["step"] for x in logged["stopped"]] == [1, 2, 3, 4, 6]
    assert logged["stopped"][-1]["meta_loss"] == logged["straight"][-1]["meta_loss"]


def test_a_store_whose_episodes_differ_from_the_config_is_one_line(tmp_path):
    path = _write(tmp_path, "glyphs", GLYPH_SPEC)
    cfg = config.load(None, [*SMALL, "training.steps=2"])
    with pytest.raises(Exception) as e:
        run.prepare(cfg, tmp_path / "r", tasks=path, progress=False)
    assert "shots" in str(e.value) and "[1, 4]" in str(e.value) and not (tmp_path / "r").exists()


def test_cli_builds_describes_trains_and_evaluates_on_the_fly(tmp_path, capsys):
    """The commands on a store given with --tasks (in this interpreter; the shell's train is the
    two-source test's)."""
    out = tmp_path / "g.arrow"
    r = cli_in_process(
        capsys,
        "tasks", "build", "--family", "glyphs", "--on-the-fly", "--ways", "2:4", "--shots", "1:3",
        "--queries", "2", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0 and "drawn on the fly" in r.stdout, r.stderr
    info = json.loads(cli_in_process(capsys, "tasks", "info", str(out), "--json").stdout)
    assert info["layout"] == "stream" and info["episodes"] == "2-4-way 1-3-shot, 2 queries"
    sets = [f"--set={s}" for s in [*SMALL, "training.steps=4"]]
    r = cli_in_process(capsys, "train", "--tasks", out, "--output-dir", tmp_path / "run", "--no-progress", *sets)
    assert r.returncode == 0, r.stderr
    assert "glyphs episodes drawn on the fly (2-4-way 1-3-shot, 2 queries" in r.stdout
    r = cli_in_process(
        capsys, "eval", "--run", tmp_path / "run", "--num-tasks", "12", "--steps", "0,1", "--no-baselines"
    )
    assert r.returncode == 0, r.stderr
    assert "2-4-way 1-3-shot" in r.stdout and "by ways" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--family", "glyphs", "--ways", "5:3", "--on-the-fly"], "expected n or lo:hi"),
        (["--family", "glyphs", "--ways", "3:5"], "add --on-the-fly"),
        (["--family", "seed", "--ways", "2:5", "--on-the-fly"], "at most that many"),
        (["--family", "glyphs", "--on-the-fly", "--ways", "3:9", "--max-support", "4"], "max_support"),
        (["--family", "glyphs"], "--num-tasks"),
    ],
)
def test_bad_on_the_fly_builds_are_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "x.arrow"
    if "5:3" in args:  # argparse's own refusal: as a shell sees it
        r = run_cli("tasks", "build", *args, "--out", str(out))
    else:
        r = cli_in_process(capsys, "tasks", "build", *args, "--out", str(out))
    assert_user_error(r, message)
    assert not out.exists()


def test_a_corrupt_on_the_fly_store_is_one_line(tmp_path):
    path = _write(tmp_path, "glyphs", GLYPH_SPEC)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    r = run_cli("tasks", "info", str(path))  # as a shell sees it
    assert_user_error(r, "truncated or corrupt")


# -- several sources ------------------------------------------------------------------------------


def _alphabets(tmp_path, split="train", ranges=((0, 600), (600, 1200))):
    spec = episodes.EpisodeSpec((3, 5), (1, 3), (2, 2))
    paths = []
    for i, r in enumerate(ranges):
        p = plan_stream("glyphs", spec, 0, split, classes=r)
        paths.append(write_batches(tmp_path / f"{split}{i}.arrow", p.info, p.batches(), overwrite=False))
    return paths


def test_each_episode_takes_its_classes_from_one_source_picked_by_weight(tmp_path):
    from distributed_maml.data.onthefly import plan_sources

    a, b = (TaskStore.open(p) for p in _alphabets(tmp_path))
    p = plan_sources([a, b], ["a", "b"], [3.0, 1.0], None, 9, episodes.TASK_IDS)
    path = write_batches(tmp_path / "mixed.arrow", p.info, p.batches(), overwrite=False)
    mixed = TaskStore.open(path)
    ids = np.arange(4000)
    src = mixed.drawer.sources_of(ids)
    assert abs((src == 0).mean() - 0.75) < 0.03  # the weights, normalised
    rows = mixed.rows(ids[:40], ("x_support", "y_support", "x_query", "y_query", "params"))
    first_b = 600  # source b's classes follow source a's 600
    for t in range(40):  # every class of an episode is its source's, and its images are that class's
        ways = rows["y_support"][t][:, 1].max()
        classes = rows["params"][t][:ways]
        assert len(set(classes)) == ways and ((classes >= first_b) == (src[t] == 1)).all()
    image = rows["x_support"][0][0]
    cls = int(rows["params"][0][rows["y_support"][0][0][0]])
    owner = a if cls < first_b else b
    local = cls - (0 if cls < first_b else first_b)
    pool = owner.drawer.examples.x[owner.drawer.examples.labels == local]
    assert any(np.array_equal(image, x) for x in pool)


def test_sources_of_another_shape_or_split_are_one_line(tmp_path):
    from distributed_maml.data.onthefly import plan_sources
    from distributed_maml.errors import StoreError

    a = TaskStore.open(_alphabets(tmp_path)[0])
    odd = TaskStore.open(_write(tmp_path, "sinusoid", episodes.EpisodeSpec((1, 1), (2, 3), (2, 2))))
    with pytest.raises(StoreError, match="not an on-the-fly store of examples"):
        plan_sources([a, odd], ["a", "s"], [1, 1], None, 0, 10)
    test = TaskStore.open(_alphabets(tmp_path, "test", ((0, 150),))[0])
    with pytest.raises(StoreError, match="mix splits"):
        plan_sources([a, test], ["a", "t"], [1, 1], None, 0, 10)


def test_per_source_metrics_are_the_per_task_metrics_grouped():
    """meta_gradient's loss_after@source sums exactly that source's tasks (the per-task loop)."""
    import torch

    from distributed_maml.core import maml, models
    from distributed_maml.core.shards import ShardResult, reduce_shards

    drawer = episodes.Drawer(3, GLYPH_SPEC, "classification", examples=_tiny_examples())
    forward = models.functional(torch.nn.Sequential(torch.nn.Linear(6, 6)))
    params = {k: v.detach() for k, v in torch.nn.Sequential(torch.nn.Linear(6, 6)).named_parameters()}
    rows = drawer.rows(np.arange(8))
    batch = maml.TaskBatch.from_numpy(rows)
    cfg = config.MamlConfig(inner_steps=1, inner_lr=0.2)
    groups = ["a", "b", "a", "a", "b", "a", "b", "b"]
    _, m = maml.meta_gradient(forward, "classification", params, batch, cfg, groups=groups)
    singles = [
        maml.meta_gradient(
            forward, "classification", params, maml.TaskBatch(*(t[i : i + 1] for t in batch.tensors())), cfg
        )[1]
        for i in range(8)
    ]
    for g in "ab":
        idx = [i for i, x in enumerate(groups) if x == g]
        assert m[f"tasks@{g}"] == len(idx)
        assert m[f"loss_after@{g}"] == pytest.approx(sum(singles[i]["loss_after"] for i in idx), rel=1e-6)
        assert m[f"acc_after@{g}"] == pytest.approx(sum(singles[i]["acc_after"] for i in idx), rel=1e-6)
    reduced = reduce_shards([ShardResult(np.zeros(1, np.float32), 8, m)])
    assert reduced.metrics["tasks@a"] == 0.5
    assert reduced.metrics["loss_after@a"] == pytest.approx(m["loss_after@a"] / 4)


def _tiny_examples():
    rng = np.random.default_rng(1)
    return episodes.Examples(rng.normal(size=(60, 6)).astype(np.float32), np.repeat(np.arange(6), 10).astype(np.int32))


def test_a_run_on_two_sources_reports_each_and_evaluates_by_source(tmp_path, capsys):
    """Trained as a shell runs it; the log line, metrics.jsonl, TensorBoard and eval by source."""
    a, b = _alphabets(tmp_path)
    sets = [
        *[s for s in SMALL if not s.startswith(("task.ways", "task.shots"))],
        "task.ways=[3, 5]",
        "task.shots=[1, 3]",
        f'task.sources=[{{store="{a}", name="alpha", weight=2}}, {{store="{b}", name="beta"}}]',
        "training.steps=4",
    ]
    r = run_cli("train", "--output-dir", tmp_path / "run", "--no-progress", *[f"--set={s}" for s in sets])
    assert r.returncode == 0, r.stderr
    assert "By source: alpha " in r.stdout and ", beta " in r.stdout
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    assert last["tasks@alpha"] + last["tasks@beta"] == pytest.approx(1.0)
    share = last["tasks@alpha"]
    assert last["acc_after"] == pytest.approx(share * last["acc_after@alpha"] + (1 - share) * last["acc_after@beta"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert {"source/alpha/acc_after", "source/beta/loss_after", "source/beta/tasks"} <= set(events.Tags()["scalars"])
    logged = {e.step: e.value for e in events.Scalars("source/alpha/acc_after")}
    assert logged[4] == pytest.approx(last["acc_after@alpha"])
    at, bt = _alphabets(tmp_path, "test", ((0, 150), (150, 300)))
    out = tmp_path / "test.arrow"
    built = cli_in_process(capsys, "tasks", "build", "--on-the-fly", "--sources", f"alpha={at},beta={bt}", "--out", out)
    assert built.returncode == 0, built.stderr
    r = cli_in_process(capsys, "eval", "--run", tmp_path / "run", "--tasks", out, "--num-tasks", "16", "--steps", "1",
                       "--no-baselines", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    by = result["by_source"]
    assert set(by) == {"alpha", "beta"} and by["alpha"]["num_tasks"] + by["beta"]["num_tasks"] == 16
    n = {k: v["num_tasks"] for k, v in by.items()}
    mean = sum(by[k]["accuracy_mean"][0] * n[k] for k in by) / 16
    assert mean == pytest.approx(result["accuracy_mean"][0])
    r = cli_in_process(capsys, "eval", "--run", tmp_path / "run", "--num-tasks", "16", "--no-baselines")
    assert_user_error(r, "several sources", "--tasks")


def test_a_bucketed_shard_gives_the_per_task_loop_s_meta_gradient(tmp_path):
    """ShardComputer.compute cuts a large shard of mixed episodes into buckets of similar shape:
    the summed meta-gradient and metrics are the per-task loop's over the unpadded episodes."""
    import torch

    from distributed_maml.core import maml
    from distributed_maml.execution.computer import ShardComputer, buckets

    spec = episodes.EpisodeSpec((3, 12), (1, 8), (2, 8), max_support=60)
    st = TaskStore.open(_write(tmp_path, "glyphs", spec))
    computer = ShardComputer(st, config.ModelConfig(name="mlp", hidden=(16,)), config.MamlConfig(inner_steps=1))
    ids = Sampler.of(st, 0, 64).ids(0)
    assert len(buckets(ids, st.drawer.shapes)) > 1
    weights = computer.spec.flatten(dict(computer.model.named_parameters())).detach().numpy()
    got = computer.compute(weights, ids, before=True)
    params = computer.spec.unflatten(torch.tensor(weights))
    rows = st.rows(ids)
    want = torch.zeros(computer.spec.numel)
    loss = acc = 0.0
    for t in range(len(ids)):
        one = padding.unpad(rows, t, "classification")
        ways = int(one["y_support"].max()) + 1
        batch = maml.TaskBatch.from_numpy({k: v[None] for k, v in one.items()})
        g, m = maml.meta_gradient(
            lambda p, x, w=ways: computer.forward(p, x)[..., :w], "classification", params, batch, computer.maml_cfg
        )
        want += computer.spec.flatten(g)
        loss, acc = loss + m["loss_after"], acc + m["acc_after"]
    np.testing.assert_allclose(got.grad_sum, want.numpy(), rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert got.metrics["loss_after"] == pytest.approx(loss, rel=1e-5)
    assert got.metrics["acc_after"] == pytest.approx(acc, rel=1e-5)


@pytest.mark.slow
def test_the_two_source_glyph_job_beats_scratch_by_ways_and_source(tmp_path):
    """jobs/glyphs-sources.toml's setting (variable episodes from two glyph alphabets, drawn on
    the fly) through the CLI, at 100 of its 300 steps (150 steps left the intervals 0.22 apart;
    docs/results.md has the full run): after training, held-out episodes are adapted better
    from the meta-learned initialisation than from scratch (the 95% intervals apart after 5
    inner steps), and eval reports every ways bucket and both alphabets."""
    out = tmp_path / "sources"
    train_ = run_cli(
        "train", "--config", "jobs/glyphs-sources.toml", "--output-dir", out, "--no-progress",
        "--set", "training.eval_every=0", "--set", "training.steps=100", timeout=1500,
    )  # fmt: skip
    assert train_.returncode == 0, train_.stderr
    assert "By source: alphabet-a" in train_.stdout
    ev = run_cli(
        "eval", "--run", out, "--steps", "0,5", "--num-tasks", "200", "--no-pretrained", "--json", timeout=1200
    )
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout)
    scratch = res["baselines"]["scratch"]
    assert set(res["baselines"]) == {"scratch"}  # the pretrained baseline's training skipped (not asserted on)
    assert res["accuracy_mean"][1] - res["accuracy_ci95"][1] > scratch["accuracy_mean"][1] + scratch["accuracy_ci95"][1]
    assert set(res["by_source"]) == {"alphabet-a", "alphabet-b"}
    assert sum(b["num_tasks"] for b in res["by_ways"].values()) == 200


def test_a_fixed_shape_on_the_fly_step_is_a_materialized_store_s_bits(tmp_path):
    """The same tasks, drawn on the fly or read from a materialized store's rows, give the
    same meta-gradient and metrics, bit for bit: fixed shapes run today's path unchanged."""
    from distributed_maml.data.families import FAMILIES
    from distributed_maml.data.format import COLUMNS, _record_batch, family_info
    from distributed_maml.execution.computer import ShardComputer

    st = TaskStore.open(_write(tmp_path, "seed", episodes.EpisodeSpec.fixed_shape(2, 5, 15)))
    ids = Sampler.of(st, 0, 16).ids(3)
    info = family_info(FAMILIES["seed"], 16, 0, 5, 15, "train")
    path = write_batches(tmp_path / "m.arrow", info, iter([_record_batch(info, st.rows(ids, COLUMNS))]), False)
    materialized = TaskStore.open(path)
    a = ShardComputer(st, config.ModelConfig(), config.MamlConfig(inner_steps=2))
    b = ShardComputer(materialized, config.ModelConfig(), config.MamlConfig(inner_steps=2))
    weights = a.spec.flatten(dict(a.model.named_parameters())).detach().numpy()
    ga, gb = a.compute(weights, ids), b.compute(weights, np.arange(16))
    assert np.array_equal(ga.grad_sum, gb.grad_sum) and ga.metrics == gb.metrics


def test_a_variable_episode_run_adapts_to_a_user_s_task_of_fewer_ways_and_exports(tmp_path):
    """The run's way out: its network has the most ways' outputs; a user's 3-way support set
    adapts, predicts only its own labels, and an export predicts the same."""
    import distributed_maml as dm
    from distributed_maml.data.families import FAMILIES

    _train(tmp_path, "run", 2)
    table = FAMILIES["glyphs"].table("train")  # (rendered for this module already; any images do)
    names = np.array(["a", "b", "c"])
    xs = np.concatenate([table.images[table.labels == c][:2] for c in range(3)])
    xq = np.concatenate([table.images[table.labels == c][2:5] for c in range(3)])
    model = dm.open_run(tmp_path / "run").meta_model()
    assert model.info.output_dim == 4
    got = model.adapt(xs, np.repeat(names, 2)).predict(xq)
    assert set(got) <= set(names)
    dm.export(tmp_path / "run", tmp_path / "export")
    assert np.array_equal(dm.load(tmp_path / "export").adapt(xs, np.repeat(names, 2)).predict(xq), got)


def _twelve_way_task(tmp_path):
    """12 glyph classes (2 support and 2 query images each), named c00..c11, and the same task
    as image folders (one per class) and a query folder, for the command line."""
    from PIL import Image

    table = FAMILIES["glyphs"].table("train")
    names = np.array([f"c{k:02d}" for k in range(12)])
    pick = [table.images[table.labels == c] for c in range(100, 112)]  # classes no 3-5-way draw needs
    xs, xq = np.concatenate([p[:2] for p in pick]), np.concatenate([p[2:4] for p in pick])
    for i, img in enumerate(xs):
        (tmp_path / "support" / names[i // 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0]).save(tmp_path / "support" / names[i // 2] / f"{i}.png")
    (tmp_path / "query").mkdir()
    for i, img in enumerate(xq):
        Image.fromarray(img[0]).save(tmp_path / "query" / f"q{i:02d}.png")
    return xs, names, xq


@pytest.fixture(scope="module")
def head_runs(tmp_path_factory):
    """One short run of 3-5 ways per maml.head, trained when a test first asks (module scope)."""
    import functools

    @functools.cache
    def trained(head: str):
        tmp = tmp_path_factory.mktemp(f"head-{head}")
        _train(tmp, "run", 3, extra=["task.ways=[3, 5]", f"maml.head={head}"])
        return tmp / "run"

    return trained


@pytest.mark.parametrize("head", ["unicorn", "proto"])
def test_a_head_run_is_evaluated_beside_both_baselines(head, head_runs):
    """eval of a unicorn or proto run with its baselines: each baseline starts its tasks' heads
    as the run does (its weights in the run's layout). Unicorn's reference at 0 steps: every
    row the same, every query is given label 0, so each task scores 1 / its ways (2 queries a
    class), for the meta-model and scratch alike; proto's scratch is the prototype classifier
    of the untrained features, above chance."""
    from distributed_maml.evaluation import evaluate

    res = evaluate.evaluate(head_runs(head), steps=[0, 1], num_tasks=24, pretrain_steps=2, workers=0)
    assert set(res["baselines"]) == {"pretrained", "scratch"}
    buckets = res["by_ways"]  # 3-5 ways: one bucket a count
    assert sorted(buckets) == ["3", "4", "5"] and sum(b["num_tasks"] for b in buckets.values()) == 24
    chance = sum(b["num_tasks"] / int(w) for w, b in buckets.items()) / 24
    scratch = res["baselines"]["scratch"]["accuracy_mean"][0]
    if head == "unicorn":
        assert res["accuracy_mean"][0] == pytest.approx(chance, abs=1e-6) and scratch == pytest.approx(chance, abs=1e-6)
    else:
        assert scratch > chance + 0.1, (scratch, chance)
    assert all(np.isfinite(r["accuracy_mean"]).all() for r in (res, *res["baselines"].values()))


@pytest.mark.parametrize("head", ["unicorn", "proto"])
def test_a_run_of_3_to_5_ways_adapts_a_12_way_task_by_every_path_and_renaming_renames(tmp_path, head, head_runs):
    """maml.head unicorn or proto: a run trained on 3-5 ways adapts a 12-way task; the API, an
    export and `distributed-maml adapt` (image folders) answer the same bits; the classes renamed
    (a permutation of the names), each query's prediction is its old one renamed and its
    probabilities the same, to float rounding. A fixed head refuses the task in one line that
    names the heads that take it."""
    import pyarrow.parquet as pq

    import distributed_maml as dm
    from distributed_maml.errors import InputError

    trained = head_runs(head)
    xs, names, xq = _twelve_way_task(tmp_path)
    meta = dm.open_run(trained).meta_model(device="cpu")
    assert meta.info.output_dim == 5 and meta.most_ways == 1000
    adapted = meta.adapt(xs, np.repeat(names, 2))
    got, proba = adapted.predict(xq), adapted.predict_proba(xq)
    assert proba.shape == (24, 12) and set(got) <= set(names) and adapted.classes == tuple(names)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)

    renamed = names[np.random.default_rng(0).permutation(12)]  # class k is now called renamed[k]
    again = meta.adapt(xs, np.repeat(renamed, 2))
    assert list(again.predict(xq)) == [renamed[list(names).index(g)] for g in got]
    columns = [list(again.classes).index(n) for n in renamed]  # each class's column in the new order
    np.testing.assert_allclose(again.predict_proba(xq)[:, columns], proba, rtol=1e-5, atol=1e-6)

    dm.export(trained, tmp_path / "export")
    card = json.loads((tmp_path / "export" / "card.json").read_text())
    assert card["adaptation"]["head"] == head and card["adaptation"]["most_ways"] == 1000
    np.testing.assert_array_equal(
        dm.load(tmp_path / "export", device="cpu").adapt(xs, np.repeat(names, 2)).predict_proba(xq), proba
    )
    out = tmp_path / "predictions.parquet"
    proc = run_cli("adapt", "--run", tmp_path / "export", "--support", tmp_path / "support", "--query",
                   tmp_path / "query", "--out", out, "--device", "cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(out)
    assert table["prediction"].to_pylist() == list(got)
    shell = np.stack([table[f"p_{n}"].to_numpy() for n in names], 1)
    np.testing.assert_array_equal(shell.astype(np.float32), proba)

    _train(tmp_path, "fixed", 1)  # SMALL's fixed head, 2-4 ways
    with pytest.raises(InputError, match=r"at most 4 apart \(it was trained .* maml.head = unicorn or proto"):
        dm.open_run(tmp_path / "fixed").meta_model(device="cpu").adapt(xs, np.repeat(names, 2))


def test_a_relabelling_is_a_permutation_of_each_task_s_own_classes():
    """Every assignment maps each task's real labels through a bijection of its own ways (the
    same one in its support and query sets); padded examples are untouched; assignment j is the
    same for a task wherever it is drawn."""
    from distributed_maml.evaluation.permutations import relabelled

    st = episodes.Drawer(3, episodes.EpisodeSpec(ways=(2, 5), shots=(1, 3), queries=(1, 2)), "classification",
                         examples=_tiny_examples())  # fmt: skip
    ids = np.arange(12)
    rows = st.rows(ids)
    seen = set()
    for j in (1, 2):
        new = relabelled(rows, ids, 5, j)
        for t in range(12):
            ways = int(rows["y_support"][t, :, 1].max())
            for key in ("y_support", "y_query"):
                real = rows[key][t, :, 1] > 0
                assert np.array_equal(new[key][t, ~real], rows[key][t, ~real]) and np.array_equal(
                    new[key][t, :, 1], rows[key][t, :, 1]
                )
            pairs = {(int(a), int(b)) for key in ("y_support", "y_query")
                     for a, b, r in zip(rows[key][t, :, 0], new[key][t, :, 0], rows[key][t, :, 1] > 0, strict=True) if r}  # fmt: skip
            mapping = dict(pairs)
            assert len(mapping) == len(pairs) == ways and sorted(mapping.values()) == list(range(ways))  # a bijection
            seen.add(tuple(sorted(mapping.items())))
        again = relabelled({k: v[3:4] for k, v in rows.items()}, ids[3:4], 5, j)
        assert np.array_equal(again["y_query"][0], new["y_query"][3])  # keyed by (assignment, id), not position
    assert len(seen) > 12  # the assignments differ
    assert np.array_equal(rows["y_support"], st.rows(ids)["y_support"])  # the input is not changed


def test_a_relabelling_of_fixed_shape_tasks_maps_each_through_a_permutation_of_the_ways():
    """Plain labels [T, N] (a fixed-shape store): each task's support and query labels go
    through one bijection of the store's ways, keyed by (assignment, task id)."""
    from distributed_maml.evaluation.permutations import relabelled

    ways, ids = 5, np.arange(10, 16)
    rows = {"y_support": np.tile(np.arange(ways), (6, 2)), "y_query": np.tile(np.arange(ways)[::-1], (6, 3))}
    new = relabelled(rows, ids, ways, 1)
    maps = []
    for t in range(6):
        mapping = dict(zip(rows["y_support"][t], new["y_support"][t], strict=True))
        assert sorted(mapping.values()) == list(range(ways)) and len(mapping) == ways
        assert [mapping[int(a)] for a in rows["y_query"][t]] == list(new["y_query"][t])  # the same map in its query set
        maps.append(tuple(mapping.values()))
    assert len(set(maps)) > 1 and np.array_equal(rows["y_support"][0], np.tile(np.arange(ways), 2))  # input kept
    assert np.array_equal(
        relabelled({k: v[2:3] for k, v in rows.items()}, ids[2:3], ways, 1)["y_query"][0], new["y_query"][2]
    )


@pytest.mark.parametrize("algorithm", ["anil", "imaml"])
def test_eval_permutations_adapts_as_the_run_does(algorithm, tmp_path):
    """Assignment 0 of `--permutations 2` is the run's own evaluation at that step: ANIL's head
    alone adapts and iMAML's proximal inner loop runs, as eval's curve does; with two
    assignments the std is their sample std."""
    from distributed_maml.evaluation import evaluate

    _train(tmp_path, "run", 2, extra=[f"maml.algorithm={algorithm}"])
    res = evaluate.evaluate(tmp_path / "run", steps=[0, 1], num_tasks=24, baselines=False, workers=0, permutations=2)
    p = res["permutations"]
    assert p["accuracy"][0] == pytest.approx(res["accuracy_mean"][1], abs=1e-6)
    assert p["std"] == pytest.approx(abs(p["accuracy"][0] - p["accuracy"][1]) / np.sqrt(2)) and p["std"] > 0


def test_eval_permutations_shows_what_a_fixed_head_costs(head_runs, tmp_path, capsys):
    """`eval --permutations 4`: a fixed head's accuracy moves with the label assignment, a
    unicorn or proto head's does not (to float rounding); the table says so in one line."""
    from distributed_maml.cli import main as cli
    from distributed_maml.evaluation import evaluate

    _train(tmp_path, "fixed", 3)
    spread = {}
    for name, folder in [
        ("fixed", tmp_path / "fixed"),
        ("unicorn", head_runs("unicorn")),
        ("proto", head_runs("proto")),
    ]:
        res = evaluate.evaluate(folder, steps=[0, 1], num_tasks=40, baselines=False, workers=0, permutations=4)
        p = res["permutations"]
        assert p["assignments"] == 4 and len(p["accuracy"]) == 4 and p["steps"] == 1
        assert p["accuracy"][0] == pytest.approx(res["accuracy_mean"][1], abs=1e-6)  # assignment 0: the tasks as stored
        assert p["mean"] == pytest.approx(np.mean(p["accuracy"])) and p["std"] == pytest.approx(
            np.std(p["accuracy"], ddof=1)
        )
        spread[name] = p["spread"]
    assert spread["fixed"] > 1e-3 and spread["unicorn"] < 1e-5 and spread["proto"] < 1e-5, spread
    code = cli.main(["eval", "--run", str(head_runs("unicorn")), "--steps", "0,1", "--num-tasks", "20", "--no-baselines",
                     "--workers", "0", "--permutations", "3"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "label assignments (3, accuracy after 1 inner steps): mean" in out, out
    for bad in ("1", "1001"):
        proc = cli_in_process(capsys, "eval", "--run", head_runs("unicorn"), "--permutations", bad, "--workers", "0")
        assert_user_error(proc, "--permutations must be in [2, 1000]")
