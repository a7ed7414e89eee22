"""Variable episodes: a meta-batch of episodes of different shapes, padded and vmapped, gives the
per-task loop's meta-gradient over the unpadded episodes (float64, every algorithm, an MLP and
conv4 with per-task BatchNorm, classification and regression), and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distributed_maml.config import MamlConfig
from distributed_maml.core import maml, models
from distributed_maml.data import episodes, padding
from distributed_maml.data.families import FAMILIES

VARIANTS = {
    "maml": {},
    "fomaml": {"algorithm": "fomaml"},
    "anil": {"algorithm": "anil"},
    "meta-sgd": {"algorithm": "meta-sgd"},
    "maml++": {"multi_step_loss": True, "learn_inner_lr": "per-layer-per-step", "msl_anneal_steps": 4},
    "reptile": {"algorithm": "reptile"},
    "imaml": {"algorithm": "imaml", "imaml_lambda": 1.0, "imaml_cg_steps": 4},
    "checkpointed": {"checkpoint_inner": True},
}
SPEC = episodes.EpisodeSpec(ways=(2, 5), shots=(1, 4), queries=(1, 3), max_support=12)


def vector_examples(classes=7, per_class=10, dim=6, seed=0) -> episodes.Examples:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2
    x = (centres[:, None] + rng.normal(size=(classes, per_class, dim))).reshape(-1, dim).astype(np.float32)
    return episodes.Examples(x, np.repeat(np.arange(classes), per_class).astype(np.int32))


def image_examples(classes=6, per_class=8, seed=0) -> episodes.Examples:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(classes * per_class, 1, 16, 16), dtype=np.uint8)
    return episodes.Examples(x, np.repeat(np.arange(classes), per_class).astype(np.int32))


def mixed_ids(drawer: episodes.Drawer, n: int) -> np.ndarray:
    """n task ids whose episodes differ in ways, support size and query size."""
    ids = np.arange(200, dtype=np.int64)
    shapes = drawer.shapes.of(ids)
    picked = [int(ids[0])]
    for i in range(1, len(ids)):
        if len(picked) == n:
            break
        if all(tuple(shapes[i]) != tuple(shapes[j]) for j in picked):
            picked.append(int(ids[i]))
    s = drawer.shapes.of(np.array(picked))
    ways_vary = drawer.spec.ways[0] < drawer.spec.ways[1]
    assert (len(set(s[:, 0])) > 1 or not ways_vary) and len(set(s[:, 1])) > 1 and len(set(s[:, 2])) > 1
    return np.array(picked)


def tensors(rows, dtype=torch.float64) -> maml.TaskBatch:
    return maml.TaskBatch.from_numpy(rows, dtype=dtype)


def loop_meta_gradient(forward, kind, params, rows, cfg, out_dim):
    """The oracle: each unpadded episode alone, as a batch of one with plain labels; a task with
    w ways scores only its first w outputs (the padded classes are not there)."""
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    loss = 0.0
    for t in range(len(rows["x_support"])):
        one = padding.unpad(rows, t, kind)
        ways = int(one["y_support"].max()) + 1 if kind == "classification" else out_dim

        def fwd(p, x, ways=ways):
            return forward(p, x)[..., :ways]

        batch = tensors({k: v[None] for k, v in one.items()})
        g, m = maml.meta_gradient(fwd, kind, params, batch, cfg, task_map="loop", version=1)
        total = {k: total[k] + g[k] for k in total}
        loss += m["loss_after"]
    return total, loss


def mlp(d_in, d_out, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, d_out)).double()


def conv(d_out, seed=0):
    torch.manual_seed(seed)
    return models.per_task_batch_norm_(models.conv4((1, 16, 16), d_out, channels=3)).double()


def check_against_loop(model, kind, drawer, variant, out_dim, task_map="vmap"):
    cfg = MamlConfig(inner_steps=2, inner_lr=0.3, **VARIANTS[variant])
    forward = models.functional(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    params = maml.with_learned_lrs(cfg, params, cfg.inner_lr)
    ids = mixed_ids(drawer, 5)
    rows = drawer.rows(ids)
    g, m = maml.meta_gradient(forward, kind, params, tensors(rows), cfg, task_map=task_map, version=1)
    want, want_loss = loop_meta_gradient(forward, kind, params, rows, cfg, out_dim)
    assert any(float(v.abs().sum()) > 0 for v in g.values())
    for k in want:
        torch.testing.assert_close(g[k], want[k], rtol=1e-9, atol=1e-11, msg=f"{variant}: {k}")
    assert m["loss_after"] == pytest.approx(want_loss, rel=1e-9)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixed_classification_episodes_equal_the_per_task_loop(variant):
    drawer = episodes.Drawer(3, SPEC, "classification", examples=vector_examples())
    check_against_loop(mlp(6, 5), "classification", drawer, variant, 5)


@pytest.mark.parametrize("variant", ["maml", "anil", "meta-sgd", "maml++", "reptile", "imaml"])
def test_mixed_episodes_on_conv4_batch_norm_equal_the_per_task_loop(variant):
    """Per-task BatchNorm over the real examples only: a padded image changes no statistic."""
    drawer = episodes.Drawer(4, SPEC, "classification", examples=image_examples())
    check_against_loop(conv(5), "classification", drawer, variant, 5)


@pytest.mark.parametrize("variant", ["maml", "meta-sgd", "reptile", "imaml"])
def test_mixed_regression_episodes_equal_the_per_task_loop(variant):
    spec = episodes.EpisodeSpec(ways=(1, 1), shots=(2, 9), queries=(1, 6))
    drawer = episodes.Drawer(5, spec, "regression", generate=FAMILIES["sinusoid"].generate)
    check_against_loop(mlp(1, 1), "regression", drawer, variant, 1)


@pytest.mark.parametrize("variant", ["maml", "meta-sgd", "imaml"])
def test_conv4_by_the_loop_task_map_computes_each_episode_unpadded(variant):
    drawer = episodes.Drawer(4, SPEC, "classification", examples=image_examples())
    check_against_loop(conv(5), "classification", drawer, variant, 5, task_map="loop")


@pytest.mark.parametrize("variant", ["maml", "fomaml", "meta-sgd", "anil", "maml++", "reptile", "imaml"])
def test_the_loop_computes_no_padding_for_any_algorithm(variant):
    """By the loop task map, the network computes each episode's real examples only: the batches
    it is called on, and their sizes, are those of the per-task loop over the unpadded episodes
    (never a padded length), for every algorithm (the loop of one graph at a time included),
    with that loop's meta-gradient."""
    drawer = episodes.Drawer(3, SPEC, "classification", examples=vector_examples())
    model = mlp(6, 5)
    cfg = MamlConfig(inner_steps=2, inner_lr=0.3, **VARIANTS[variant])
    net = models.functional(model)

    def recording(seen: list[int]):
        def forward(p, x):
            seen.append(x.shape[0])
            return net(p, x)

        return forward

    params = maml.with_learned_lrs(cfg, {k: v.detach() for k, v in model.named_parameters()}, cfg.inner_lr)
    rows = drawer.rows(mixed_ids(drawer, 5))
    seen, unpadded = [], []
    g, _ = maml.meta_gradient(recording(seen), "classification", params, tensors(rows), cfg, task_map="loop", version=1)
    want, _ = loop_meta_gradient(recording(unpadded), "classification", params, rows, cfg, 5)
    padded = (rows["x_support"].shape[1], rows["x_query"].shape[1])
    assert sorted(seen) == sorted(unpadded), (padded, sorted(seen), sorted(unpadded))
    assert sum(seen) < len(seen) // 2 * sum(padded)  # smaller than the padded batches' rows
    for k in want:
        torch.testing.assert_close(g[k], want[k], rtol=1e-9, atol=1e-11, msg=k)


def test_the_loop_task_map_pads_the_same_way():
    drawer = episodes.Drawer(3, SPEC, "classification", examples=vector_examples())
    check_against_loop(mlp(6, 5), "classification", drawer, "maml", 5, task_map="loop")


def test_padded_meta_gradient_matches_finite_differences():
    drawer = episodes.Drawer(3, SPEC, "classification", examples=vector_examples())
    model = mlp(6, 5)
    forward = models.functional(model)
    cfg = MamlConfig(inner_steps=2, inner_lr=0.3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = tensors(drawer.rows(mixed_ids(drawer, 4)))
    g, _ = maml.meta_gradient(forward, "classification", params, batch, cfg)
    spec = models.ParamSpec.of(model)
    vec = spec.flatten(params)
    gv = spec.flatten(g)

    def value(v):
        with torch.enable_grad():
            _, m = maml.meta_gradient(forward, "classification", spec.unflatten(v), batch, cfg, before=False)
        return m["loss_after"]

    rng = np.random.default_rng(0)
    for _ in range(4):
        d = torch.tensor(rng.normal(size=vec.shape))
        d /= d.norm()
        eps = 1e-5
        fd = (value(vec + eps * d) - value(vec - eps * d)) / (2 * eps)
        assert fd == pytest.approx(float(gv @ d), rel=1e-6, abs=1e-9)


def test_a_padded_class_is_never_predicted_and_a_padded_example_weighs_nothing():
    """Outputs strongly favouring a padded class: the accuracy counts real examples only and
    the prediction is among the task's ways; changing a padded example changes nothing."""
    y = torch.tensor([[0, 2], [1, 2], [0, 0]])  # 2 ways, the third example is padding
    out = torch.tensor([[0.0, 1.0, 9.0], [0.0, 1.0, 9.0], [5.0, 0.0, 0.0]])
    from distributed_maml.core.inner import accuracy, class_masked, cross_entropy

    assert float(accuracy(out, y)) == 0.5  # example 0 predicts 1 (not 2), example 1 right, padding ignored
    assert class_masked(out, y).argmax(-1).tolist()[:2] == [1, 1]
    changed = out.clone()
    changed[2] = torch.tensor([-50.0, 80.0, 3.0])
    assert float(cross_entropy(out, y)) == float(cross_entropy(changed, y))
    want = torch.nn.functional.cross_entropy(out[:2, :2], y[:2, 0])
    torch.testing.assert_close(cross_entropy(out, y), want)


def test_fixed_shape_episodes_are_plain_batches_and_today_s_bits():
    """A fixed spec gives unpadded rows (plain labels): the step runs exactly today's ops."""
    spec = episodes.EpisodeSpec.fixed_shape(5, 2, 3)
    drawer = episodes.Drawer(3, spec, "classification", examples=vector_examples())
    rows = drawer.rows(np.array([4, 9, 2**62]))
    assert rows["y_support"].shape == (3, 10) and rows["x_query"].shape == (3, 15, 6)
    again = episodes.Drawer(3, spec, "classification", examples=vector_examples()).rows(np.array([9]))
    assert all(np.array_equal(again[k][0], rows[k][1]) for k in rows)  # a pure function of (seed, id)
