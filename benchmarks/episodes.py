"""Episodes drawn on the fly (issue 39): what the task-id space, mixed shapes and padding cost.

Three tables, one JSON:

1. **id space**: an on-the-fly store of 10^3, 10^6 and 10^9 task ids (the seed family's MLP, and
   glyphs, whose store holds its 24,000 images): the store's open time and an in-process
   meta-step's time (the sampler's ids, the draw, the meta-gradient; seed MLP, meta-batch 32).
   Target: flat within 1.1x from 10^3 to 10^9.
2. **padding**: Meta-Dataset-like mixed episodes on glyphs (5-30 ways, 1-10 shots per class,
   support <= 150, 1-5 queries per class): the padding fraction of a step's batches (padded
   examples / all) over 1-8 shards, unsorted, sorted by shape (the sampler), and sorted then cut
   into buckets (ShardComputer.compute); and the step time per real example against about as
   many examples in fixed-shape episodes (the mixed batch's mean shape).
3. **vmap vs loop**: a mixed meta-batch's meta-gradient, padded and vmapped (shape-sorted and
   bucketed, as the step runs it), against a per-task loop over the unpadded episodes (what
   peers do). Target: >= 3x the loop for the MLP families.
4. **conv4 by the loop** (issue 44): conv4-32 with per-task BatchNorm on mixed glyph episodes,
   the CPU's default task map, its meta-gradient with each episode cut to its real examples
   (core/inner.task_of) against the same loop on the padded tensors (the code before the cut),
   in one run; and a fixed-shape batch's gradient by both, which must be the same bits.
5. **samplers** (issue 45): Meta-Dataset's sampler beside the uniform draw (the padding table's
   episodes): mean shape, padding and an MLP step's cost per real example.

    python benchmarks/episodes.py [--repeats 5] [--only conv4_loop] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from distributed_maml.config import MamlConfig, ModelConfig  # noqa: E402
from distributed_maml.core import maml, models  # noqa: E402
from distributed_maml.data import episodes  # noqa: E402
from distributed_maml.data import padding as pads  # noqa: E402
from distributed_maml.data.onthefly import plan_stream  # noqa: E402
from distributed_maml.data.sampler import Sampler, split_shards  # noqa: E402
from distributed_maml.data.store import TaskStore  # noqa: E402
from distributed_maml.data.writing import write_batches  # noqa: E402
from distributed_maml.execution.computer import ShardComputer, buckets  # noqa: E402

SIZES = (10**3, 10**6, 10**9)
META_DATASET = episodes.EpisodeSpec(ways=(5, 30), shots=(1, 10), queries=(1, 5), max_support=150)
MAML = MamlConfig(inner_steps=1, inner_lr=0.4)
SAMPLED = {
    "uniform": META_DATASET,
    "meta-dataset": replace(META_DATASET, shots=(10, 10), queries=(5, 5), sampler="meta-dataset"),
    "meta-dataset (paper)": episodes.EpisodeSpec((5, 50), (100, 100), (10, 10), 500, "meta-dataset"),
}


def timed(fn, repeats: int) -> float:
    """The median seconds of `repeats` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def store(root: Path, family: str, spec: episodes.EpisodeSpec, n: int) -> Path:
    p = plan_stream(family, spec, 0, "train", n)
    path = root / f"{family}-{n}-{'-'.join(map(str, spec.to_tuple()))}.arrow"
    if not path.exists():
        write_batches(path, p.info, p.batches(), overwrite=False)
    return path


def id_space(root: Path, repeats: int) -> list[dict]:
    """Open and step times per id-space size, measured in interleaved rounds (a drift of the
    machine spreads over every size alike)."""
    seed_spec = episodes.EpisodeSpec.fixed_shape(2, 5, 15)
    glyph_spec = episodes.EpisodeSpec((5, 5), (1, 1), (5, 5))
    cases = []
    for n in SIZES:
        seed_path, glyph_path = store(root, "seed", seed_spec, n), store(root, "glyphs", glyph_spec, n)
        s = TaskStore.open(seed_path)
        computer = ShardComputer(s, ModelConfig(name="seed_mlp"), MAML)
        weights = computer.spec.flatten(dict(computer.model.named_parameters())).detach().numpy()
        cases.append((n, seed_path, glyph_path, computer, weights, Sampler.of(s, 0, 32)))
    times: dict[int, dict[str, list[float]]] = {n: {"open_seed": [], "open_glyphs": [], "step_seed": []} for n in SIZES}
    for r in range(repeats * 4 + 1):
        for n, seed_path, glyph_path, computer, weights, sampler in cases:
            for key, fn in (
                ("open_seed", lambda p=seed_path: TaskStore.open(p)),
                ("open_glyphs", lambda p=glyph_path: TaskStore.open(p)),
                # a new step's tasks each time: the sampler and the draw are part of the step
                ("step_seed", lambda c=computer, w=weights, s=sampler, k=r: c.compute(w, s.ids(k), before=False)),
            ):
                t = time.perf_counter()
                fn()
                if r:  # round 0 warms up
                    times[n][key].append(time.perf_counter() - t)
    return [{"task_ids": n, **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times[n].items()}} for n in SIZES]


def fraction(s: TaskStore, order, shards: int, bucketed: bool) -> float:
    """Padded examples / all over 20 steps' batches: the step cut into shards, each (with
    `bucketed`, as ShardComputer.compute does) into buckets, each padded to its largest."""
    real = total = 0
    for k in range(20):
        for shard in split_shards(order(k), shards):
            for part in buckets(shard, s.drawer.shapes) if bucketed else [shard]:
                shapes = s.drawer.shapes.of(part)
                real += int(shapes[:, 1].sum() + shapes[:, 2].sum())
                total += len(part) * int(shapes[:, 1].max() + shapes[:, 2].max())
    return 1 - real / total


def samplers(root: Path, repeats: int) -> list[dict]:
    """Meta-Dataset's sampler beside the uniform draw on glyphs, meta-batch 64, one shard: the
    episodes' mean shape, the padding of a step (sorted and bucketed, as it runs; and unsorted),
    and an in-process MLP step's time per real example. Three rows: the uniform draw of the
    padding table, the sampler at the same bounds (ways 5-30, <= 10 a class toward a budget of
    150, <= 5 queries), and at the paper's constants (5-50 ways, 100, 10 queries, 500)."""
    rows = []
    for name, spec in SAMPLED.items():
        s = TaskStore.open(store(root, "glyphs", spec, episodes.TASK_IDS))
        sampler = Sampler.of(s, 0, 64)
        shapes = np.concatenate([s.drawer.shapes.of(sampler.ids(k)) for k in range(20)])
        computer = ShardComputer(s, ModelConfig(name="mlp", hidden=(64,)), MAML, task_map="vmap")
        weights = computer.spec.flatten(dict(computer.model.named_parameters())).detach().numpy()
        ids = sampler.ids(0)
        real = int(s.drawer.shapes.of(ids)[:, 1:].sum())
        seconds = timed(lambda c=computer, w=weights, b=ids: c.compute(w, b, before=False), repeats)
        rows.append({
            "sampler": name, "spec": spec.describe(),
            "mean_ways": float(shapes[:, 0].mean()), "mean_support": float(shapes[:, 1].mean()),
            "mean_query": float(shapes[:, 2].mean()),
            "padding_step": fraction(s, sampler.ids, 1, True), "padding_unsorted": fraction(s, sampler._drawn, 1, False),
            "step_ms": 1e3 * seconds, "us_per_example": 1e6 * seconds / real,
        })  # fmt: skip
    return rows


def padding(root: Path, repeats: int) -> dict:
    s = TaskStore.open(store(root, "glyphs", META_DATASET, episodes.TASK_IDS))
    sampler = Sampler.of(s, 0, 64)
    out: dict = {"spec": META_DATASET.describe(), "meta_batch": 64, "fraction": {}}

    for shards in (1, 2, 4, 8):
        out["fraction"][shards] = {
            "unsorted": fraction(s, sampler._drawn, shards, False),  # the same ids, not sorted by shape
            "sorted": fraction(s, sampler.ids, shards, False),
            "sorted_bucketed": fraction(s, sampler.ids, shards, True),
        }
    # step time per real example: the mixed batch (shape-sorted, bucketed) vs fixed episodes of its mean shape
    ids = sampler.ids(0)
    shapes = s.drawer.shapes.of(ids)
    ways, support, query = (int(round(v)) for v in shapes.mean(0))
    fixed_spec = episodes.EpisodeSpec.fixed_shape(ways, max(1, support // ways), max(1, query // ways))
    fixed = TaskStore.open(store(root, "glyphs", fixed_spec, 10**6 + 1))
    for name, st, batch_ids in (("mixed", s, ids), ("fixed", fixed, np.arange(64))):
        computer = ShardComputer(st, ModelConfig(name="mlp", hidden=(64,)), MAML, task_map="vmap")
        weights = computer.spec.flatten(dict(computer.model.named_parameters())).detach().numpy()
        rows = st.rows(batch_ids)
        examples = sum(int(pads.real(rows[c], "classification")[1].sum()) for c in ("y_support", "y_query"))
        seconds = timed(lambda c=computer, w=weights, b=batch_ids: c.compute(w, b, before=False), repeats)
        out[name] = {"examples": examples, "step_ms": 1e3 * seconds, "us_per_example": 1e6 * seconds / examples}
    out["fixed"]["shape"] = fixed_spec.describe()
    return out


def vmap_vs_loop(root: Path, repeats: int) -> list[dict]:
    cases = [
        ("seed", episodes.EpisodeSpec((2, 2), (1, 10), (5, 15)), ModelConfig(name="seed_mlp")),
        ("sinusoid", episodes.EpisodeSpec((1, 1), (2, 20), (5, 20)), ModelConfig(name="sinusoid_mlp")),
        ("glyphs", META_DATASET, ModelConfig(name="mlp", hidden=(64,))),
    ]
    rows = []
    for family, spec, model_cfg in cases:
        s = TaskStore.open(store(root, family, spec, episodes.TASK_IDS))
        net = models.build(model_cfg, s.info, seed=0)
        forward = models.functional(net)
        params = {k: v.detach() for k, v in net.named_parameters()}
        ids = Sampler.of(s, 0, 32).ids(0)
        rows_ = s.rows(ids)
        padded = [
            maml.TaskBatch.from_numpy(s.rows(part)) for part in buckets(ids, s.drawer.shapes)
        ]  # as the step batches them
        singles = [
            maml.TaskBatch.from_numpy({k: v[None] for k, v in pads.unpad(rows_, t, s.info.kind).items()})
            for t in range(len(ids))
        ]
        out_dim = s.info.output_dim

        kind = s.info.kind

        def vmapped(forward=forward, kind=kind, params=params, padded=padded) -> None:
            for batch in padded:
                maml.meta_gradient(forward, kind, params, batch, MAML, "vmap", before=False)

        def looped(forward=forward, kind=kind, params=params, singles=singles, out_dim=out_dim) -> None:
            for b in singles:  # each unpadded episode alone, its gradient summed (a peer's loop)
                ways = int(b.y_support.max()) + 1 if kind == "classification" else out_dim
                fwd = (lambda p, x, w=ways: forward(p, x)[..., :w]) if ways < out_dim else forward
                maml.meta_gradient(fwd, kind, params, b, MAML, "vmap", before=False)

        v, lp = timed(vmapped, repeats), timed(looped, repeats)
        rows.append({"family": family, "spec": spec.describe(), "meta_batch": 32, "vmap_ms": 1e3 * v,
                     "loop_ms": 1e3 * lp, "speedup": lp / v})  # fmt: skip
    return rows


def conv4_loop(root: Path, repeats: int) -> dict:
    spec = episodes.EpisodeSpec(ways=(3, 10), shots=(1, 5), queries=(1, 4), max_support=30)
    s = TaskStore.open(store(root, "glyphs", spec, episodes.TASK_IDS))
    net = models.build(ModelConfig(name="conv4", channels=32), s.info, seed=0)
    forward = models.functional(net)
    params = {k: v.detach() for k, v in net.named_parameters()}
    ids = Sampler.of(s, 0, 8).ids(0)
    batch = maml.TaskBatch.from_numpy(s.rows(ids))  # one shard of 8 mixed episodes, padded
    real = int((batch.y_support[..., 1] > 0).sum()), int((batch.y_query[..., 1] > 0).sum())

    def step(task_of=maml.task_of, batch=batch) -> dict:
        return loop_gradient(forward, params, batch, task_of)

    after, before = timed(step, repeats), timed(lambda: step(padded_loop), repeats)
    g_cut, g_pad = step(), step(padded_loop)
    fixed = TaskStore.open(store(root, "glyphs", episodes.EpisodeSpec.fixed_shape(5, 1, 3), episodes.TASK_IDS))
    fixed_batch = maml.TaskBatch.from_numpy(fixed.rows(np.arange(8)))
    a, b = step(batch=fixed_batch), step(padded_loop, fixed_batch)
    same_bits = all(torch.equal(a[k], b[k]) for k in a)
    return {
        "spec": spec.describe(),
        "model": "conv4-32, per-task BatchNorm",
        "meta_batch": 8,
        "support_rows": {"padded": int(batch.y_support.shape[0] * batch.y_support.shape[1]), "real": real[0]},
        "query_rows": {"padded": int(batch.y_query.shape[0] * batch.y_query.shape[1]), "real": real[1]},
        "padded_loop_ms": 1e3 * before,
        "cut_loop_ms": 1e3 * after,
        "speedup": before / after,
        "max_gradient_difference": max(float((g_cut[k] - g_pad[k]).abs().max()) for k in g_cut),
        "fixed_shape_same_bits": same_bits,
    }


def padded_loop(tensors, i):
    """The loop before issue 44: each task's padded tensors as they are."""
    return [t[i] for t in tensors]


def loop_gradient(forward, params, batch, task_of) -> dict:
    """meta_gradient by the loop, each task's tensors taken by `task_of` (the cut, or the old way)."""
    cut = maml.task_of
    maml.task_of = task_of
    try:
        return maml.meta_gradient(forward, "classification", params, batch, MAML, "loop", before=False)[0]
    finally:
        maml.task_of = cut


SECTIONS = ("id_space", "padding", "vmap_vs_loop", "conv4_loop", "samplers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=SECTIONS, nargs="+", default=list(SECTIONS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    run = {
        "id_space": id_space, "padding": padding, "vmap_vs_loop": vmap_vs_loop, "conv4_loop": conv4_loop,
        "samplers": samplers,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        result = {"machine": f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"}
        result.update({name: run[name](root, args.repeats) for name in args.only})
    if "conv4_loop" in result:
        r = result["conv4_loop"]
        print(
            f"conv4 by the loop, {r['model']}, {r['spec']}, meta-batch {r['meta_batch']}: support rows "
            f"{r['support_rows']['real']} real of {r['support_rows']['padded']}, query rows {r['query_rows']['real']} "
            f"of {r['query_rows']['padded']}\n  padded loop {r['padded_loop_ms']:.1f} ms, cut loop "
            f"{r['cut_loop_ms']:.1f} ms: {r['speedup']:.2f}x; gradients differ by at most "
            f"{r['max_gradient_difference']:.1e}; a fixed-shape batch the same bits: {r['fixed_shape_same_bits']}\n"
        )
    if "samplers" in result:
        print("sampler               mean ways  support  query  padding (step / unsorted)  step (ms)  us/example")
        for r in result["samplers"]:
            print(
                f"{r['sampler']:<21} {r['mean_ways']:<10.1f} {r['mean_support']:<8.1f} {r['mean_query']:<6.1f} "
                f"{100 * r['padding_step']:>5.1f}% / {100 * r['padding_unsorted']:5.1f}%{'':14} {r['step_ms']:<10.1f} "
                f"{r['us_per_example']:.2f}"
            )
        print()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if "id_space" not in result:
        return
    ids = result["id_space"]
    print("task ids      open seed (ms)  open glyphs (ms)  step seed MLP (ms)")
    for r in ids:
        print(f"{r['task_ids']:<13.0e} {r['open_seed_ms']:<15.3f} {r['open_glyphs_ms']:<17.3f} {r['step_seed_ms']:.2f}")
    for key in ("open_seed_ms", "open_glyphs_ms", "step_seed_ms"):
        values = [r[key] for r in ids]
        result.setdefault("flatness", {})[key] = max(values) / min(values)
    print("max/min over the sizes: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["flatness"].items()))
    pad = result["padding"]
    print(f"\npadding, {pad['spec']}, meta-batch {pad['meta_batch']} (padded examples / all):")
    for shards, f in pad["fraction"].items():
        print(
            f"  {shards} shard(s): unsorted {100 * f['unsorted']:.1f}%, sorted by shape {100 * f['sorted']:.1f}%, "
            f"sorted and bucketed (the step) {100 * f['sorted_bucketed']:.1f}%"
        )
    for name in ("mixed", "fixed"):
        r = pad[name]
        what = "mixed (1 shard, bucketed)" if name == "mixed" else f"fixed ({r['shape']})"
        print(
            f"  {what}: {r['examples']} real examples, {r['step_ms']:.1f} ms a step, {r['us_per_example']:.2f} us each"
        )
    print("\nfamily    episodes                              vmap (ms)  loop (ms)  speedup")
    for r in result["vmap_vs_loop"]:
        print(f"{r['family']:<9} {r['spec']:<37} {r['vmap_ms']:<10.1f} {r['loop_ms']:<10.1f} {r['speedup']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
