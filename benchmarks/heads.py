"""What a head setting costs a meta-step (issue 45): `maml.head` = fixed, unicorn, proto.

The same mixed glyph shard (3-10 ways, 1-5 shots, 1-4 queries, support <= 30; padded, as the
step runs it), the same weights, one meta-gradient (second order, 1 inner step) per head, timed
in interleaved rounds (best of each), so the ratios do not depend on what else the machine did:

- the glyph MLP (784-64-10) under vmap, meta-batch 32;
- conv4-32 with per-task BatchNorm by the loop (the CPU's default task map), meta-batch 8.

Target: unicorn and proto at most 1.1x fixed. Proto takes its prototypes and its first inner
gradient from one pass over the support set (core/heads.py `Head.open`: the features by the
network's body, the head applied to them); unicorn copies one row.

    python benchmarks/heads.py [--seconds 3] [--json benchmarks/results/heads-2core.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from distributed_maml.bench.timing import time_interleaved  # noqa: E402
from distributed_maml.config import MamlConfig, ModelConfig  # noqa: E402
from distributed_maml.core import heads, maml  # noqa: E402
from distributed_maml.core.network import assemble  # noqa: E402
from distributed_maml.data import episodes  # noqa: E402
from distributed_maml.data.onthefly import plan_stream  # noqa: E402
from distributed_maml.data.sampler import Sampler  # noqa: E402
from distributed_maml.data.store import TaskStore  # noqa: E402
from distributed_maml.data.writing import write_batches  # noqa: E402

SPEC = episodes.EpisodeSpec(ways=(3, 10), shots=(1, 5), queries=(1, 4), max_support=30)
NETWORKS = {  # name: (model, meta-batch, task map)
    "mlp-64": (ModelConfig(name="mlp", hidden=(64,)), 32, "vmap"),
    "conv4-32": (ModelConfig(name="conv4", channels=32), 8, "loop"),
}


def glyph_store(root: Path) -> TaskStore:
    p = plan_stream("glyphs", SPEC, 0, "train", episodes.TASK_IDS)
    path = root / "glyphs.arrow"
    write_batches(path, p.info, p.batches(), overwrite=False)
    return TaskStore.open(path)


def measure(store: TaskStore, seconds: float) -> list[dict]:
    rows = []
    for name, (model, meta_batch, task_map) in NETWORKS.items():
        batch = maml.TaskBatch.from_numpy(store.rows(Sampler.of(store, 0, meta_batch).ids(0)))
        steps, grads = {}, {}
        for head in heads.HEADS:
            cfg = MamlConfig(inner_steps=1, inner_lr=0.4, head=head)
            net = assemble(model, cfg, store.info, seed=0)
            params = net.spec.unflatten(net.initial())

            def step(net=net, cfg=cfg, params=params, batch=batch, task_map=task_map) -> dict:
                return maml.meta_gradient(net.forward, "classification", params, batch, cfg, task_map, before=False)[0]

            steps[head] = step
            grads[head] = step()
        times = time_interleaved(steps, seconds)
        for head in heads.HEADS:
            rows.append(
                {
                    "network": name,
                    "meta_batch": meta_batch,
                    "task_map": task_map,
                    "head": head,
                    "step_ms": 1e3 * times[head],
                    "vs_fixed": times[head] / times["fixed"],
                    "finite": all(bool(torch.isfinite(g).all()) for g in grads[head].values()),
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per head and network")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(glyph_store(Path(tmp)), args.seconds)
    print(f"a meta-step's meta-gradient by head, {SPEC.describe()} glyph episodes; best of interleaved rounds")
    print("network   meta-batch  task map  head     step (ms)  vs fixed")
    for r in rows:
        print(
            f"{r['network']:<9} {r['meta_batch']:<11} {r['task_map']:<9} {r['head']:<8} "
            f"{r['step_ms']:<10.2f} {r['vs_fixed']:.3f}x"
        )
    result = {
        "machine": f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "spec": SPEC.describe(),
        "rows": rows,
        "worst_vs_fixed": float(np.max([r["vs_fixed"] for r in rows])),
    }
    print(f"worst head vs fixed: {result['worst_vs_fixed']:.3f}x (target <= 1.1x)")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
