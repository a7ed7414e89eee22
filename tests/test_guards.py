"""Guards for the way out and for episodes (issue 43), Ray-free: each test checks a value against
an independent reference, or a boundary, where a one-line bug would otherwise pass the suite.

| kind of bug (put in by hand)                                | the test that fails                |
| ----------------------------------------------------------- | ---------------------------------- |
| adapting fewer classes than outputs leaves one unmasked     | test_adapting_fewer_classes_...    |
| the test-time inner loop takes another step's learned size  | test_learned_per_step_sizes_...    |
| export --checkpoint step_N writes another checkpoint        | test_export_of_a_named_checkpoint_ |
| the served cache turns FIFO; steps ignored; a limit off by 1| test_the_task_cache_..., test_a_request_s_steps_..., test_a_request_at_each_limit_... |
| a capped episode gets a class without support examples      | test_a_capped_episode_...          |
| a step that straddles two epochs draws from one bijection   | test_keyed_epochs_...              |
| eval's groups report every task's numbers                   | test_each_group_s_numbers_...      |

Invariants over many inputs are Hypothesis properties with a fixed seed (derandomize): the same
examples on every run, in CI and here.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distributed_maml as dm
from distributed_maml.core import inner
from distributed_maml.core.adaptation import adaptation_curve
from distributed_maml.data import episodes
from distributed_maml.data.sampler import Sampler, keyed_permutation
from distributed_maml.evaluation import evaltable
from distributed_maml.training import checkpoint
from distributed_maml.use.adaptbatch import DIVERGED, CachedTask, Job, TaskCache, answer
from distributed_maml.use.adaptrequest import Limits, RequestError, parse

from .conftest import assert_user_error, cli_in_process, run_cli, trained_once

PROPERTY = settings(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WAYS, STEPS = 5, 2  # the run's outputs and inner steps
SIZES = (0.3, 0.02)  # distinct per-step sizes set by hand: a wrong step's size moves the weights far


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 5-way glyph MLP with MAML++'s learned per-step sizes, checkpoints at steps 1, 2 and 3."""
    sets = ["scaling.num_workers=0", "task.family=glyphs", "model.name=mlp", f"task.ways={WAYS}", "task.shots=1",
            "task.queries=2", "task.meta_batch=2", "task.num_tasks=8", "training.steps=3", "training.eval_every=0",
            "training.log_every=1", "training.checkpoint_every=1", f"maml.inner_steps={STEPS}",
            "maml.learn_inner_lr=per-layer-per-step"]  # fmt: skip
    return trained_once(
        tmp_path_factory, "glyph-lslr", lambda out: dm.train(None, sets, output_dir=out, progress=False).path
    )


@pytest.fixture(scope="module")
def meta(run) -> dm.MetaModel:
    """The run's meta-model with per-step sizes SIZES for every tensor (by hand, so each step's
    size differs from the other's by 15x)."""
    m = dm.open_run(run).meta_model("latest", device="cpu")
    for k in [k for k in m.meta if k.startswith(inner.PER_STEP)]:
        assert m.meta[k].shape == (STEPS,)
        m.meta[k] = torch.tensor(SIZES)
    return m


def _task(ways: int, shots: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A task as a user gives it: uint8 images, string labels in shuffled order, and queries."""
    rng = np.random.default_rng(seed)
    names = np.array(["cat", "dog", "emu", "fox", "gnu", "hen", "ibis"][:ways])
    xs = rng.integers(0, 256, size=(ways * shots, 1, 28, 28), dtype=np.uint8)
    ys = rng.permutation(np.repeat(names, shots))
    return xs, ys, rng.integers(0, 256, size=(6, 1, 28, 28), dtype=np.uint8)


def _by_hand(meta: dm.MetaModel, x: torch.Tensor, y: torch.Tensor, ways: int, steps: int) -> dict[str, torch.Tensor]:
    """The reference inner loop, written out: SGD on the masked cross-entropy (outputs past the
    task's ways at -inf) with step i's own learned size (the last one past the trained steps)."""
    model = {k: v.clone().requires_grad_(True) for k, v in meta.meta.items() if not k.startswith(inner.LR_PREFIX)}
    for i in range(steps):
        out = meta.network.forward(model, x)
        out = out.masked_fill(torch.arange(out.shape[-1]) >= ways, float("-inf"))
        grads = torch.autograd.grad(F.cross_entropy(out, y), list(model.values()))
        model = {
            k: (p - meta.meta[inner.PER_STEP + k][min(i, STEPS - 1)] * g).detach().requires_grad_(True)
            for (k, p), g in zip(model.items(), grads, strict=True)
        }
    return {k: v.detach() for k, v in model.items()}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# -- 1, 2: adaptation against the training inner loop and a loop written out ---------------------


def test_adapting_fewer_classes_than_outputs_is_the_training_loop_on_its_padded_episode(meta):
    """3 of the model's 5 classes: MetaModel.adapt equals the training inner loop on the task as
    a padded episode (labels [N, 2] = (label, ways)) and the loop written out, and predicts the
    written-out model's probabilities over its 3 classes, in the support set's label names."""
    xs, ys, xq = _task(3)
    adapted = meta.adapt(xs, ys)
    assert adapted.classes == ("cat", "dog", "emu")
    x = meta.inputs(xs, "support")
    index = torch.as_tensor(np.unique(ys, return_inverse=True)[1])
    padded = torch.stack([index, torch.full_like(index, 3)], dim=-1)  # as data/padding.pad writes it
    trained = inner.adapt(meta.network.forward, "classification", meta.meta, x, padded, STEPS, 0.0, True)
    _close(adapted.params, inner.split_lrs(trained)[0])
    want = _by_hand(meta, x, index, 3, STEPS)
    _close(adapted.params, want)
    probs = meta.network.forward(want, meta.inputs(xq, "query"))[:, :3].softmax(-1)
    np.testing.assert_allclose(adapted.predict_proba(xq), probs.numpy(), rtol=1e-5, atol=1e-6)
    assert adapted.predict(xq).tolist() == np.array(adapted.classes)[probs.argmax(-1).numpy()].tolist()


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_learned_per_step_sizes_take_each_step_s_own_size(meta, steps):
    """A run with MAML++'s per-step sizes (0.3 then 0.02, set by hand) adapts with step i's size
    (steps past the trained 2 take the last), in the API and in eval's and validation's curves."""
    xs, ys, xq = _task(WAYS, seed=steps)
    x, index = meta.inputs(xs, "support"), torch.as_tensor(np.unique(ys, return_inverse=True)[1])
    want = _by_hand(meta, x, index, WAYS, steps)
    _close(meta.adapt(xs, ys, steps=steps).params, want)
    yq = torch.arange(6) % WAYS
    batch = inner.TaskBatch(*(torch.stack([t, t]) for t in (x, index, meta.inputs(xq, "query"), yq)))
    losses, _ = adaptation_curve(meta.network.forward, "classification", meta.meta, batch, [steps], 0.0)
    ref = F.cross_entropy(meta.network.forward(want, batch.x_query[0]), yq)
    torch.testing.assert_close(losses[:, 0], torch.stack([ref, ref]), rtol=1e-5, atol=1e-6)


# -- 3, 6: export of a named checkpoint; what the card holds -----------------------------------------


def test_export_of_a_named_checkpoint_holds_that_checkpoint_and_no_local_path(run, tmp_path, capsys):
    out = tmp_path / "exports" / "step1"
    proc = cli_in_process(capsys, "export", "--run", run, "--checkpoint", "step_1", "--out", out)
    assert proc.returncode == 0, proc.stderr
    loaded = dm.load(out, device="cpu")
    named = checkpoint.load(run / "checkpoints" / "step_1")
    latest = checkpoint.load(run / "checkpoints" / "step_3")
    want = {**named.model, **named.inner_lr}
    assert loaded.meta.keys() == want.keys()
    assert all(torch.equal(loaded.meta[k], want[k].float()) for k in want)
    assert not all(torch.equal(loaded.meta[k], latest.model[k].float()) for k in latest.model)  # it moved since
    card = json.loads((out / "card.json").read_text())
    assert card["provenance"]["checkpoint"] == "step_1" and card["provenance"]["step"] == 1
    assert card["provenance"]["run"] == run.name
    text = json.dumps(card)
    for folder in {str(run.parent), str(tmp_path), str(Path.cwd())}:  # nothing of this machine's folders
        assert folder not in text, folder


def test_the_card_says_what_the_run_is(run, tmp_path):
    """Every field of an export's card against the run's own config, store info and checkpoint,
    and the weights file's own sha-256; the files a plain folder's modes; load_any takes the
    export as best or latest only; a card of another format is refused."""
    import datetime
    import hashlib
    import os
    from dataclasses import asdict

    from distributed_maml.errors import CheckpointError, UserError
    from distributed_maml.use.export import CARD, FORMAT, FORMAT_VERSION, WEIGHTS, export, load, load_any

    out = export(run, tmp_path / "e", "latest")
    card = json.loads((out / CARD).read_text())
    ckpt = checkpoint.load(run / "checkpoints" / "step_3")
    cfg, meta = ckpt.state.config, dm.open_run(run).meta_model("latest", device="cpu")
    info = meta.info
    assert (card["format"], card["format_version"]) == (FORMAT, FORMAT_VERSION)
    assert card["model"] == {
        "name": "mlp", "factory": None, "arguments": cfg.to_dict()["model"], "input_shape": [1, 28, 28],
        "outputs": WAYS, "kind": "classification", "parameters": {k: list(v.shape) for k, v in meta.meta.items()},
    }  # fmt: skip
    assert card["trained_for"] == {"family": "glyphs", "ways": WAYS, "shots": 1, "queries": 2}
    assert card["adaptation"] == {
        "algorithm": "maml", "inner_steps": STEPS, "inner_lr": cfg.maml.inner_lr,
        "learned_inner_lr": "per-layer-per-step", "first_order": cfg.maml.always_first_order(), "anil_head": None,
        "head": "fixed", "most_ways": WAYS, "imaml": None, "batch_norm": None, "precision": cfg.scaling.precision,
    }  # fmt: skip
    assert card["inputs"] == {"classes_trained_on": list(info.classes), "table_features": [], "standardised": False}
    assert card["validation"] is None  # the run validated nothing (eval_every = 0)
    prov = card["provenance"]
    assert (prov["run"], prov["checkpoint"], prov["step"], prov["version"]) == (run.name, "step_3", 3, ckpt.version)
    assert prov["weights_sha256"] == hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest()
    when = datetime.datetime.fromisoformat(prov["exported_at"])
    assert (
        when.utcoffset() == datetime.timedelta(0)
        and abs(datetime.datetime.now(datetime.timezone.utc) - when).total_seconds() < 600
    )
    assert prov["torch"] == torch.__version__ and prov["distributed_maml"] not in ("", None)
    assert card["config"] == cfg.to_dict() and card["store_info"] == json.loads(json.dumps(asdict(info)))
    umask = os.umask(0)
    os.umask(umask)
    assert {(f.name, f.stat().st_mode & 0o777) for f in out.iterdir()} == {(f, 0o666 & ~umask) for f in (CARD, WEIGHTS)}
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert [p.name for p in out.parent.iterdir()] == ["e"]  # no temporary folder left beside it
    for which in (None, "best", "latest"):
        assert all(torch.equal(load_any(out, which, "cpu").meta[k], meta.meta[k]) for k in meta.meta)
    with pytest.raises(UserError, match="is an export"):
        load_any(out, "step_1", "cpu")
    for key, value in (("format", "other"), ("format_version", FORMAT_VERSION + 1)):
        (out / CARD).write_text(json.dumps({**card, key: value}))
        with pytest.raises(CheckpointError, match="is format"):
            load(out, "cpu")


def test_an_answer_holds_what_the_schema_says_and_a_diverged_task_is_a_422(meta):
    xs, ys, xq = _task(3, seed=4)
    ok = parse(meta, _body(xs, ys, xq, task_id="named"), Limits())
    wild = parse(meta, _body(xs, ys, xq, steps=100), Limits())
    wild = replace(wild, support=(wild.support[0].astype(np.float32) * 1e30, wild.support[1]))
    good, bad = answer(meta, [Job(ok), Job(wild)])
    want = meta.predict(xs, ys, xq)
    assert good.status == 200 and good.body == {
        "task_id": "named", "cached": False, "steps": STEPS, "batch": 2, "predictions": want.labels.tolist(),
        "probabilities": want.probabilities.tolist(), "classes": list(want.classes),
    }  # fmt: skip
    assert good.remember is not None and good.remember.steps == STEPS and good.remember.classes == want.classes
    assert (bad.status, bad.body, bad.remember) == (422, {"error": DIVERGED}, None)


# -- 4: the service's cache, steps and limits (Ray-free: what a replica runs) -----------------------


@PROPERTY
@given(
    size=st.integers(0, 4),
    ops=st.lists(st.tuples(st.sampled_from(["get", "put"]), st.sampled_from("abcdef")), max_size=40),
)
def test_the_task_cache_is_least_recently_used_against_a_written_out_one(size, ops):
    """Any sequence of lookups and stores: the same hits and the same kept ids, in order, as a
    plain list-based LRU (a hit refreshes; a store beyond `size` drops the least recently used)."""
    cache, ref = TaskCache(size), OrderedDict()
    for op, key in ops:
        entry = CachedTask({}, (key,), 1)
        if op == "get":
            hit = cache.get(key)
            assert (hit is not None) == (key in ref)
            if key in ref:
                assert hit == ref[key]
                ref.move_to_end(key)
        elif size:
            ref[key] = entry
            ref.move_to_end(key)
            while len(ref) > size:
                ref.popitem(last=False)
            cache.put(key, entry)
        else:
            cache.put(key, entry)
        assert cache.ids() == list(ref)


def _body(xs, ys, xq, **extra) -> bytes:
    return json.dumps({"support": {"x": xs.tolist(), "y": ys.tolist()}, "query": {"x": xq.tolist()}, **extra}).encode()


def test_a_request_s_steps_are_the_steps_it_adapts_with_and_a_cached_answer_is_fresh_bits(meta):
    xs, ys, xq = _task(4, seed=9)
    jobs = [Job(parse(meta, _body(xs, ys, xq, steps=k, task_id=f"t{k}"), Limits())) for k in (0, 1, 3)]
    replies = answer(meta, jobs)
    for k, reply in zip((0, 1, 3), replies, strict=True):
        assert reply.status == 200 and reply.body["steps"] == k
        want = meta.predict(xs, ys, xq, steps=k).probabilities
        np.testing.assert_array_equal(np.asarray(reply.body["probabilities"], dtype=np.float32), want)
    assert replies[0].body["probabilities"] != replies[2].body["probabilities"]  # the steps mattered
    # the cached weights answer a later request with the fresh answer's bits
    later = parse(meta, json.dumps({"task_id": "t3", "query": {"x": xq.tolist()}}).encode(), Limits())
    again = answer(meta, [Job(later, replies[2].remember)])[0]
    assert again.body["cached"] is True and again.body["probabilities"] == replies[2].body["probabilities"]
    assert again.remember is None  # nothing new to cache


LIMITS = ("max_shots", "max_support", "max_queries", "max_steps", "max_task_id", "max_body_bytes")


def _request_at(meta: dm.MetaModel, name: str, n: int) -> tuple[bytes, Limits]:
    """A request holding exactly n of what limit `name` bounds, and limits that allow n."""
    rng = np.random.default_rng(n)
    img = lambda k: rng.integers(0, 256, size=(k, 1, 28, 28), dtype=np.uint8)  # noqa: E731
    xs, ys, xq, extra = img(2), np.array([0, 1]), img(1), {}
    if name == "max_shots":
        xs, ys = img(n + 1), np.array([0] * n + [1])
    elif name == "max_support":
        xs, ys = img(n), np.arange(n) % 2
    elif name == "max_queries":
        xq = img(n)
    elif name == "max_steps":
        extra = {"steps": n}
    elif name == "max_task_id":
        extra = {"task_id": "x" * n}
    body = _body(xs, ys, xq, **extra)
    limit = len(body) if name == "max_body_bytes" else n
    return body, Limits(**{"max_shots": 50, "max_support": 100, "max_queries": 100, name: limit})


@PROPERTY
@given(name=st.sampled_from(LIMITS), n=st.integers(2, 12))
def test_a_request_at_each_limit_is_accepted_and_one_past_it_refused(meta, name, n):
    body, limits = _request_at(meta, name, n)
    parse(meta, body, limits)  # exactly at the limit: accepted
    tight = Limits(**{**limits.__dict__, name: getattr(limits, name) - 1})
    with pytest.raises(RequestError) as e:
        parse(meta, body, tight)
    assert e.value.status in (413, 422) and "\n" not in e.value.line


def _png(img: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[0]).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_every_bad_request_is_its_status_and_its_whole_line(meta):
    """Each bad request against its exact status and whole line (Ray-free: what a replica
    answers); the good ones beside them (PNG images, a one-character task id) are accepted."""
    xs, ys, xq = _task(2, seed=3)
    good = json.loads(_body(xs, ys, xq))
    png = {"png": [_png(i) for i in xq]}
    cases = [
        (b"{not json", 400, "the request is not JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        (b"[1, 2]", 400, "the request must be a JSON object with 'query' (and 'support' or 'task_id')"),
        (b'{"query": NaN}', 400, "the request is not JSON: NaN is not a finite number"),
        ({**good, "extra": 1, "more": 2}, 422, "unknown field(s) extra, more; a request takes task_id, steps, support, query"),
        ({**good, "task_id": ""}, 422, "task_id must be a string of 1 to 200 characters"),
        ({**good, "task_id": 7}, 422, "task_id must be a string of 1 to 200 characters"),
        ({**good, "steps": True}, 422, "steps must be a whole number in [0, 100], got True"),
        ({**good, "steps": 1.5}, 422, "steps must be a whole number in [0, 100], got 1.5"),
        ({"support": good["support"]}, 422, "the request has no 'query': {'x': [...]} (or 'png') to predict"),
        ({"query": good["query"]}, 422, "the request has neither 'support' nor a 'task_id' adapted before"),
        ({**good, "query": {"x": [[1]], "png": ["a"]}}, 422, "'query' must be an object with 'x' (arrays) or 'png' (base64 images)"),
        ({**good, "query": [1, 2]}, 422, "'query' must be an object with 'x' (arrays) or 'png' (base64 images)"),
        ({**good, "query": {"png": []}}, 422, "'query.png' must be a non-empty list of base64 PNG strings"),
        ({**good, "query": {"png": ["not base64!"]}}, 422, "query.png[0] is not base64"),
        ({**good, "query": {"png": ["aGVsbG8="]}}, 422, "query.png[0] is not a readable image"),
        ({**good, "query": {"x": [[1, 2], [3]]}}, 422, "'query.x' is ragged: every example must have the same shape"),
        ({**good, "query": {"x": [["a"]]}}, 422, "'query.x' must hold numbers, got <U1"),
        ({**good, "support": {"x": good["support"]["x"]}}, 422, "'support.y' must be a list: a label (or target) per support example"),
    ]  # fmt: skip
    for body, status, line in cases:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        with pytest.raises(RequestError) as e:
            parse(meta, raw, Limits())
        assert (e.value.status, e.value.line) == (status, line)
    for ok in ({**good, "task_id": "a"}, {**good, "query": png}, {**good, "steps": 0}):
        got = parse(meta, json.dumps(ok).encode(), Limits())
        assert got.query.shape == (len(xq), 1, 28, 28) and got.support is not None
    np.testing.assert_array_equal(parse(meta, json.dumps({**good, "query": png}).encode(), Limits()).query, xq)


def test_deeply_nested_json_is_one_line_400(meta):
    for depth in (100_000, 2_000):
        with pytest.raises(RequestError) as e:
            parse(meta, b'{"query": {"x": ' + b"[" * depth + b"]" * depth + b"}}", Limits())
        assert e.value.status in (400, 422) and "\n" not in e.value.line
    with pytest.raises(RequestError) as e:
        parse(meta, b"[" * 100_000 + b"]" * 100_000, Limits())
    assert e.value.status == 400 and "nests" in e.value.line


# -- 5, 6: the draw and the keyed sampler --------------------------------------------------------


@st.composite
def specs(draw) -> episodes.EpisodeSpec:
    lo = draw(st.integers(2, 10))
    hi = draw(st.integers(lo, 12))
    s_lo = draw(st.integers(1, 20))
    s_hi = draw(st.integers(s_lo, 40))
    q = draw(st.integers(1, 3))
    cap = draw(st.one_of(st.just(0), st.integers(hi, hi * s_hi + 5)))
    return episodes.EpisodeSpec((lo, hi), (s_lo, s_hi), (1, q), cap)


@PROPERTY
@given(spec=specs(), seed=st.integers(0, 2**32 - 1), ids=st.lists(st.integers(0, 2**63 - 2), min_size=1, max_size=8))
def test_a_capped_episode_gives_every_class_support_and_keeps_the_cap(spec, seed, ids):
    """Any spec in range and any ids: every class of every drawn episode has 1..its drawn shots
    support examples, the support set fits the cap, the ways and queries are in bounds, and no
    example is both support and query."""
    examples = episodes.Examples(np.arange(12 * 44, dtype=np.int64).reshape(-1, 1), np.repeat(np.arange(12), 44))
    drawer = episodes.Drawer(seed, spec, "classification", examples=examples)
    for t in ids:
        e = drawer.episode(t)
        ways = len(e["params"])
        counts = np.bincount(e["y_support"], minlength=ways)
        assert spec.ways[0] <= ways <= spec.ways[1] and len(counts) == ways
        assert counts.min() >= 1 and counts.max() <= spec.shots[1]
        assert len(e["y_support"]) <= (spec.max_support or ways * spec.shots[1])
        assert len(e["y_query"]) % ways == 0 and 1 <= len(e["y_query"]) // ways <= spec.queries[1]
        assert not set(e["x_support"].ravel()) & set(e["x_query"].ravel())
        assert len(set(e["x_support"].ravel())) == len(e["x_support"])  # no example twice


@PROPERTY
@given(
    lo=st.integers(2, 12),
    extra=st.integers(0, 8),
    shots=st.tuples(st.integers(1, 5), st.integers(1, 120)),
    slack=st.integers(0, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_capped_shape_keeps_the_cap_and_a_shot_per_class(lo, extra, shots, slack, seed):
    """The shape's draw alone, 64 tasks an example, caps near the most ways (where scaling bites
    hardest) and shot ranges up to 120: the support set never passes the cap, every class keeps
    1..its drawn shots, and a capped shape is only drawn when the drawn shots passed the cap."""
    spec = episodes.EpisodeSpec((lo, lo + extra), (min(shots), max(shots)), (1, 2), lo + extra + slack)
    for t in range(64):
        rng = episodes.task_rng(seed, t)
        ways, got, _ = episodes.draw_shape(rng, spec)
        assert len(got) == ways and got.min() >= 1 and got.sum() <= spec.max_support, (spec, got)
        _, drawn, _ = episodes.draw_shape(episodes.task_rng(seed, t), replace(spec, max_support=0))  # uncapped
        assert (got <= drawn).all() and (got.sum() < drawn.sum() or (got == drawn).all())


@PROPERTY
@given(n=st.integers(1, 300), data=st.data())
def test_keyed_epochs_are_bijections_whatever_the_batch_and_the_step(n, data):
    """Positions [e * n, (e + 1) * n) of the steps' concatenated ids are a permutation of [0, n)
    for every epoch e, for meta-batches that do and do not divide n (steps straddle epochs), and
    epochs differ (each has its own key)."""
    mb = data.draw(st.integers(1, 2 * n + 3), label="meta_batch")
    for order in ("keyed", "epochs"):
        sampler = Sampler(seed=data.draw(st.integers(0, 2**31), label="seed"), num_tasks=n, meta_batch=mb, order=order)
        steps = -(-3 * n // mb)  # three epochs at least
        ids = np.concatenate([sampler.ids(s) for s in range(steps)])
        for e in range(3):
            assert sorted(ids[e * n : (e + 1) * n].tolist()) == list(range(n)), (order, n, mb, e)
        if n >= 8:
            assert ids[:n].tolist() != ids[n : 2 * n].tolist()


@pytest.mark.parametrize("n", [2**63 - 1, 10**9 + 7])
def test_a_step_straddling_an_epoch_at_a_huge_id_space_takes_each_part_from_its_epoch(n):
    mb = 6
    step = n // mb  # its positions run past n: the first part is epoch 0's end, the rest epoch 1's start
    got = Sampler(seed=3, num_tasks=n, meta_batch=mb, order="keyed").ids(step)
    pos = [step * mb + j for j in range(mb)]
    assert pos[0] < n <= pos[-1]
    want = [int(keyed_permutation(np.array([p % n], dtype=np.uint64), n, 3, p // n)[0]) for p in pos]
    assert got.tolist() == want


def test_the_keyed_order_is_the_one_checkpoints_were_written_with():
    """The keyed bijection's ids against tests/assets/keyed-ids.json (recorded when the order was
    defined): a checkpoint names only (seed, order), so a later version that mixed the bits any
    other way, still a bijection, would resume a run on other tasks."""
    golden = json.loads((Path(__file__).parent / "assets" / "keyed-ids.json").read_text())
    for case in golden["cases"]:
        pos = np.arange(len(case["ids"]), dtype=np.uint64)
        got = keyed_permutation(pos, case["n"], case["seed"], case["epoch"])
        assert got.tolist() == case["ids"], case


@PROPERTY
@given(step=st.integers(0, 10**6), mb=st.integers(2, 24))
def test_a_variable_step_s_ids_are_its_draw_sorted_by_shape(step, mb):
    """Variable episodes: a step's ids are the keyed draw's, reordered so the shapes (ways, then
    support size, then query size) never decrease: the same tasks, contiguous shards of similar
    shape."""
    shapes = episodes.Shapes(5, episodes.EpisodeSpec((2, 9), (1, 6), (1, 3), 20))
    plain = Sampler(seed=5, num_tasks=10**9, meta_batch=mb, order="keyed")
    sorted_ = Sampler(seed=5, num_tasks=10**9, meta_batch=mb, order="keyed", shapes=shapes)
    drawn, got = plain.ids(step), sorted_.ids(step)
    assert sorted(got.tolist()) == sorted(drawn.tolist())
    keys = [tuple(row) for row in shapes.of(got)]
    assert keys == sorted(keys)
    assert len(set(keys)) > 1 or mb < 4  # shapes that differ: the sort had work to do


# -- 7: eval's groups ----------------------------------------------------------------------------------


def test_each_group_s_numbers_are_its_own_tasks():
    """Groups of tasks whose curves differ: each group's mean loss, accuracy and count are those of
    its own tasks (numpy over the mask), and differ from the overall numbers."""
    rng = np.random.default_rng(0)
    losses = rng.uniform(0.1, 1.0, size=(30, 3))
    losses[:10] += 5.0  # group "a" is far above the rest
    accs = rng.uniform(0.0, 1.0, size=(30, 3))
    accs[10:] /= 4
    masks = {"a": np.arange(30) < 10, "b": np.arange(30) >= 10}
    got = evaltable.grouped(losses, accs, masks, [0, 2], bound=100.0)
    overall = evaltable.summarize(losses, accs, [0, 2], bound=100.0)
    for label, m in masks.items():
        assert got[label]["num_tasks"] == m.sum()
        np.testing.assert_allclose(got[label]["loss_mean"], losses[m][:, [0, 2]].mean(0))
        np.testing.assert_allclose(got[label]["accuracy_mean"], accs[m][:, [0, 2]].mean(0))
        assert got[label]["loss_mean"] != overall["loss_mean"]


@pytest.mark.parametrize("ways, most", [((3, 14), 4), ((2, 4), 4), ((5, 6), 3), ((4, 4), 4)])
def test_ways_buckets_hold_each_task_by_its_own_drawn_ways(tmp_path, ways, most):
    """eval's buckets by ways against each task's own drawn episode (its classes): every task in
    exactly one bucket, whose label's range holds its ways; at most `most` buckets, disjoint,
    covering the store's range; none for a store whose ways do not vary."""
    from distributed_maml.data.onthefly import plan_stream
    from distributed_maml.data.store import TaskStore
    from distributed_maml.data.writing import write_batches

    spec = episodes.EpisodeSpec(ways, (1, 2), (1, 1), 0)
    plan = plan_stream("glyphs", spec, 7, "train", episodes.TASK_IDS)
    store = TaskStore.open(write_batches(tmp_path / "s.arrow", plan.info, plan.batches(), overwrite=False))
    n = 120
    buckets = evaltable.ways_buckets(store, n, most)
    if ways[0] == ways[1]:
        assert buckets == {}
        return
    drawn = np.array([len(store.drawer.episode(t)["params"]) for t in range(n)])
    assert 1 < len(buckets) <= most and sum(m.sum() for m in buckets.values()) == n
    covered = []
    for label, mask in buckets.items():
        lo, _, hi = label.partition("-")
        lo, hi = int(lo), int(hi or lo)
        assert ((drawn[mask] >= lo) & (drawn[mask] <= hi)).all(), (label, drawn[mask])
        assert not ((drawn[~mask] >= lo) & (drawn[~mask] <= hi)).any(), label
        covered += list(range(lo, hi + 1))
    assert sorted(covered) == sorted(set(covered)) and set(drawn) <= set(covered) <= set(range(ways[0], ways[1] + 1))


# -- one line, as the user sees it -------------------------------------------------------------------


def test_serving_beyond_loopback_without_a_token_is_one_line(run, tmp_path, capsys):
    """The refusals come before Ray starts; the shell's view once, the rest in this Ray-free
    interpreter (a module that serves would have Ray's own log lines in the captured stderr)."""
    assert_user_error(run_cli("serve", "--run", run, "--host", "0.0.0.0"), "give --token-file FILE")
    short = tmp_path / "short"
    short.write_text("abc\n")
    proc = cli_in_process(capsys, "serve", "--run", run, "--host", "0.0.0.0", "--token-file", short)
    assert_user_error(proc, "at least 16 characters")
    import socket

    with socket.socket() as busy:  # a port in use: one line before Ray starts
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert_user_error(cli_in_process(capsys, "serve", "--run", run, "--port", port), f"127.0.0.1:{port}")
