"""Meta-Dataset's sampler (task.sampler = "meta-dataset"): each drawn episode equals the paper's
definition written out here from its `sampling.py` (the same generator, draw for draw), its
deterministic parts hold exactly (queries, the budget, one shot per class, ways up to the classes
there are), and its random parts have the stated distributions at a fixed seed (chi-squared)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distributed_maml.data import episodes, metadataset
from distributed_maml.errors import ConfigError, StoreError

from .conftest import assert_user_error, cli_in_process, train_on

PAPER = episodes.EpisodeSpec((5, 50), (100, 100), (10, 10), 500, "meta-dataset")


def uneven_examples(sizes: list[int], seed: int = 0) -> episodes.Examples:
    """Classes of the given sizes (examples are their own indices, so a test can trace them)."""
    labels = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    return episodes.Examples(np.arange(len(labels), dtype=np.float32)[:, None], labels)


def paper_episode(rng: np.random.Generator, counts: np.ndarray, spec: episodes.EpisodeSpec):
    """Triantafillou et al. 2020, sampling.py, one source: sample_num_ways_uniformly, the classes,
    compute_num_query, sample_support_set_size, sample_num_support_per_class (their arguments:
    min_ways, max_ways_upper_bound, max_num_query, max_support_size_contrib_per_class,
    max_support_set_size, min/max_log_weight = log 0.5, log 2)."""
    min_ways, max_ways = spec.ways
    num_ways = rng.integers(low=min_ways, high=min(max_ways, len(counts)) + 1)
    class_ids = rng.choice(len(counts), num_ways, replace=False)
    images_per_class = counts[class_ids]
    num_query = np.minimum(spec.queries[1], (images_per_class // 2).min())
    num_remaining_per_class = images_per_class - num_query
    beta = rng.uniform()
    support_size_contributions = np.minimum(spec.shots[1], num_remaining_per_class)
    support_set_size = np.minimum(np.floor(beta * support_size_contributions + 1).sum(), spec.max_support or 10**9)
    remaining_support_set_size = support_set_size - len(num_remaining_per_class)
    unnormalized = images_per_class * np.exp(rng.uniform(math.log(0.5), math.log(2), size=images_per_class.shape))
    proportions = unnormalized / unnormalized.sum()
    num_desired = np.floor(proportions * remaining_support_set_size).astype("int32") + 1
    return class_ids, np.minimum(num_desired, num_remaining_per_class), int(num_query), int(support_set_size)


def test_every_episode_is_the_paper_s_definition_and_its_examples_are_its_classes():
    sizes = [2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 7, 9, 11, 40, 60, 75, 120, 300, 4]
    ex = uneven_examples(sizes)
    counts = np.array(sizes)
    spec = episodes.EpisodeSpec((3, 12), (100, 100), (10, 10), 60, "meta-dataset")
    drawer = episodes.Drawer(7, spec, "classification", examples=ex)
    shapes = drawer.shapes.of(np.arange(300))
    for t in range(300):
        classes, shots, queries, budget = paper_episode(episodes.task_rng(7, t), counts, spec)
        e = drawer.episode(t)
        assert np.array_equal(e["params"].astype(np.int64), classes)
        assert np.array_equal(np.bincount(e["y_support"], minlength=len(classes)), shots)
        assert np.array_equal(np.bincount(e["y_query"], minlength=len(classes)), np.full(len(classes), queries))
        assert tuple(shapes[t]) == (len(classes), shots.sum(), len(classes) * queries)
        # the examples: each label's from its class, support and query apart
        owner = ex.labels[e["x_support"][:, 0].astype(np.int64)]
        assert np.array_equal(owner, classes[e["y_support"]])
        assert np.array_equal(ex.labels[e["x_query"][:, 0].astype(np.int64)], classes[e["y_query"]])
        assert not set(e["x_support"][:, 0]) & set(e["x_query"][:, 0])
        # the exact parts: one shot per class at least, within the budget and each class's rest
        assert shots.min() >= 1 and shots.sum() <= budget <= spec.max_support
        assert queries == min(10, counts[classes].min() // 2) and np.all(shots <= counts[classes] - queries)


def test_the_boundaries_two_examples_a_class_and_fewer_classes_than_ways():
    """A class of 2 examples gives 1 query and 1 shot; ways never pass the classes there are and
    reach them; a budget of the most ways gives one shot per class."""
    ex = uneven_examples([2] + [50] * 5)
    drawer = episodes.Drawer(
        0, episodes.EpisodeSpec((2, 50), (100, 100), (10, 10), 6, "meta-dataset"), "classification", examples=ex
    )
    ways_seen = set()
    for t in range(400):
        e = drawer.episode(t)
        ways = int(e["y_support"].max()) + 1
        ways_seen.add(ways)
        assert len(e["y_support"]) <= 6
        if 0 in e["params"]:  # the 2-example class picked: one query per class, and it has one shot
            assert len(e["y_query"]) == ways and np.sum(e["y_support"] == list(e["params"]).index(0)) == 1
        else:
            assert len(e["y_query"]) == 10 * ways
        if ways == 6:  # the budget of 6 across 6 classes: one each
            assert np.array_equal(np.bincount(e["y_support"]), np.ones(6, dtype=np.int64))
    assert ways_seen == set(range(2, 7))


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-squared 0.999 quantile (Wilson-Hilferty; z the normal's 0.999 quantile)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(observed: np.ndarray) -> float:
    expected = observed.sum() / len(observed)
    return float(((observed - expected) ** 2 / expected).sum())


def test_ways_and_the_support_budget_are_uniform_at_a_fixed_seed():
    """At equal class sizes (20 each, so q = 10 and each class adds floor(10 beta) + 1 to the
    budget): ways uniform on 5..min(50, classes) and S / ways uniform on 1..10 (beta ~ U[0, 1)),
    both by chi-squared at 0.999; a wrong bound (6..50) or beta's draw in (0, 1] would move them."""
    counts = np.full(30, 20)
    pool = metadataset.Pool(counts, np.array([0, 30]))
    drawn = [metadataset.draw(episodes.task_rng(3, t), PAPER.ways, 100, 10, 500, pool) for t in range(3000)]
    w = np.array([len(d.classes) for d in drawn])
    ways = np.bincount(w, minlength=31)[5:]
    assert len(ways) == 26 and ways.min() > 0 and w.max() == 30
    assert chi2(ways) < chi2_critical(len(ways) - 1)
    budget = np.array([d.budget for d in drawn])
    assert np.all(budget % w == 0) and all(d.queries == 10 and d.shots.sum() <= d.budget for d in drawn)
    per_class = np.bincount(budget // w, minlength=11)[1:]
    assert len(per_class) == 10 and per_class.min() > 0
    assert chi2(per_class) < chi2_critical(9)


def test_imbalance_follows_class_size():
    """A class twice another's size gets about twice its shots (the log-uniform factor's mean
    is the same for both): over many episodes holding classes of 40 and 80 examples, the shots'
    ratio lies within 10% of 2."""
    ex = uneven_examples([40, 80] * 6)
    drawer = episodes.Drawer(
        1, episodes.EpisodeSpec((5, 12), (100, 100), (10, 10), 0, "meta-dataset"), "classification", examples=ex
    )
    small = large = 0
    for t in range(800):
        e = drawer.episode(t)
        per = np.bincount(e["y_support"])
        size = np.array([40, 80])[e["params"].astype(np.int64) % 2]
        small, large = (
            small + per[size == 40].sum() / max(1, (size == 40).sum()),
            large + per[size == 80].sum() / max(1, (size == 80).sum()),
        )
    assert 1.8 < large / small < 2.2


def test_several_sources_cap_the_ways_at_their_own_classes():
    ex = uneven_examples([10] * 6 + [10] * 40)
    spec = episodes.EpisodeSpec((5, 50), (100, 100), (3, 3), 0, "meta-dataset")
    drawer = episodes.Drawer(0, spec, "classification", examples=ex, sources=((1.0, 6), (3.0, 40)))
    ids = np.arange(600)
    src, shapes = drawer.sources_of(ids), drawer.shapes.of(ids)
    assert shapes[src == 0, 0].max() == 6 and shapes[src == 1, 0].max() > 6
    assert abs(np.mean(src == 1) - 0.75) < 0.05
    for t in ids[:50]:
        classes = drawer.episode(int(t))["params"]
        assert np.all((classes < 6) == (src[t] == 0))


def test_the_sampler_is_kept_in_the_store_and_the_uniform_draw_s_bits_stay():
    """A meta-dataset store's metadata holds an eighth number, the uniform's seven as before
    (so stores built before the sampler read unchanged); a store naming no sampler we know is refused."""
    assert PAPER.to_tuple() == (5, 50, 100, 100, 10, 10, 500, 1)
    assert episodes.EpisodeSpec.from_tuple(PAPER.to_tuple()) == PAPER
    uniform = episodes.EpisodeSpec((2, 5), (1, 4), (1, 3), 12)
    assert uniform.to_tuple() == (2, 5, 1, 4, 1, 3, 12) and not PAPER.fixed
    with pytest.raises(StoreError, match="sampler must be one of uniform, meta-dataset"):
        episodes.EpisodeSpec((2, 5), (1, 4), (1, 3), 0, "zipf").check(False)
    with pytest.raises(StoreError, match='use sampler = "uniform" for a regression family'):
        episodes.EpisodeSpec((1, 1), (5, 5), (5, 5), 0, "meta-dataset").check(True)


def test_a_class_of_one_example_or_too_few_classes_is_one_line():
    with pytest.raises(StoreError, match="class 2 has 1 example; the meta-dataset sampler needs 2"):
        uneven_examples([5, 5, 1, 5, 5, 5]).check(PAPER, "the store")
    with pytest.raises(StoreError, match="has 4 classes: too few for 5-way"):
        uneven_examples([5] * 4).check(PAPER, "the store")


@pytest.mark.parametrize(
    "sets, needles",
    [
        (["task.sampler=zipf"], ['task.sampler must be "uniform" or "meta-dataset"']),
        (["task.sampler=meta-dataset", "task.family=glyphs", "task.shots=[1, 5]"], ["give task.shots"]),
        (["task.sampler=meta-dataset", "task.family=sinusoid"], ["for a regression family"]),
        (["task.sampler=meta-dataset"], ["seed generates its tasks"]),
    ],
)
def test_bad_sampler_settings_are_one_line(capsys, tmp_path, sets, needles):
    args = [a for s in sets for a in ("--set", s)]
    assert_user_error(cli_in_process(capsys, "train", "--output-dir", tmp_path / "r", "--no-progress", *args), *needles)
    assert not (tmp_path / "r").exists()


def test_a_meta_dataset_run_trains_and_keeps_the_sampler(tmp_path):
    """Through the library as `train` runs it: glyphs drawn by the sampler (3-8 ways), a few
    steps of an MLP; the run's store keeps the sampler, so its episodes are drawn
    the same way (ways spread, query sizes from the classes), and the loss is finite."""
    from distributed_maml.data import TaskStore
    from distributed_maml.training.run import STORE_NAME

    sets = [
        "task.family=glyphs", "task.sampler=meta-dataset", "task.ways=[3, 8]", "task.shots=6", "task.queries=4",
        "task.max_support=24", "task.meta_batch=4", "model.name=mlp", "training.steps=3",
        "training.eval_every=0", "training.log_every=1", "scaling.num_workers=0",
    ]  # fmt: skip
    result, _ = train_on(tmp_path / "run", None, sets)
    assert result.step == 3 and np.isfinite(result.last_metrics["loss_after"])
    store = TaskStore.open(tmp_path / "run" / STORE_NAME)
    assert store.info.spec.sampler == "meta-dataset" and store.info.spec.ways == (3, 8)
    shapes = store.drawer.shapes.of(np.arange(200))
    assert set(shapes[:, 0]) == set(range(3, 9)) and np.all(shapes[:, 2] == 4 * shapes[:, 0])
    assert shapes[:, 1].max() <= 24


def test_the_draw_needs_a_pool_of_classes():
    with pytest.raises(StoreError, match="generated family has none"):
        episodes.Drawer(0, PAPER, "classification", generate=lambda *a: {})
    assert metadataset.MIN_LOG_WEIGHT == pytest.approx(-math.log(2)) and metadataset.MAX_LOG_WEIGHT == pytest.approx(
        math.log(2)
    )
    with pytest.raises(ConfigError, match="give task.shots"):
        from distributed_maml.config import TaskConfig

        TaskConfig(family="glyphs", sampler="meta-dataset", queries=(1, 3))


def test_eval_shots_k_of_a_meta_dataset_run_draws_k_shot_episodes():
    """`eval --shots K` asks for K shots a class: a meta-dataset run's held-out episodes are then
    drawn uniformly at its ways and queries, K each, no budget (the sampler would read K as its
    per-class cap and give fewer)."""
    from distributed_maml.data.onthefly import held_out, plan_stream

    spec = episodes.EpisodeSpec((3, 6), (6, 6), (4, 4), 12, "meta-dataset")
    info = plan_stream("glyphs", spec, 0, "train", episodes.TASK_IDS).info
    store = held_out(info, 40, 0, "test", shots=3)
    assert store.info.spec == episodes.EpisodeSpec((3, 6), (3, 3), (4, 4), 0)
    shapes = store.drawer.shapes.of(np.arange(40))
    assert np.array_equal(shapes[:, 1], 3 * shapes[:, 0]) and np.array_equal(shapes[:, 2], 4 * shapes[:, 0])
    assert held_out(info, 40, 0, "test").info.spec.sampler == "meta-dataset"  # without --shots: as trained
