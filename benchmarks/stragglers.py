"""A step with a slow worker: shards handed out by speed against one shard per worker.

Ray workers on this machine (one CPU each), the last one slowed (WorkerActor.slow_down: each of
its shards takes --factor times its compute time, a card or a node at 1/factor speed). For each
scaling.shards_per_worker in --shards, the ms per step of the driver loop over --steps steps
(after --warmup), the shards each worker computed at the last step, and the step time against
the ideal: the step's tasks divided by the workers' summed speed (each worker's tasks per
compute second, measured in the same run by the assignment policy). One shard per worker waits
for the slow worker's whole half; shards by speed let the fast one take more.

    python benchmarks/stragglers.py [--workers 2] [--factor 2] [--shards 1,4,8] [--meta-batch 400] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402

from distributed_maml.config import MamlConfig, ModelConfig, ScalingConfig  # noqa: E402
from distributed_maml.core.learner import Learner  # noqa: E402
from distributed_maml.core.network import assemble  # noqa: E402
from distributed_maml.data.sampler import Sampler  # noqa: E402
from distributed_maml.data.store import TaskStore  # noqa: E402
from distributed_maml.data.writing import build  # noqa: E402
from distributed_maml.execution import factory  # noqa: E402
from distributed_maml.execution.stepping import fan_out_in  # noqa: E402


def measure(store: TaskStore, workers: int, shards: int, factor: float, steps: int, warmup: int, mb: int) -> dict:
    model, maml = ModelConfig(name="sinusoid_mlp"), MamlConfig(inner_steps=5, inner_lr=0.01)
    scaling = ScalingConfig(num_workers=workers, shards_per_worker=shards, task_map="vmap", store_sharing="path")
    ex = factory.make(store, model, maml, scaling)
    try:
        ex.start()
        ray.get(ex.workers[workers - 1].slow_down.remote(factor=factor), timeout=120)
        net = assemble(model, maml, store.info, seed=0)
        learner = Learner(net.spec, net.initial(), 1e-3)
        sampler = Sampler(0, len(store), mb)
        results = []
        for s in range(warmup):
            learner.apply(fan_out_in(ex, learner, sampler.ids(s), before=False)[1].grad)
        start = time.perf_counter()
        for s in range(warmup, warmup + steps):
            results, reduced = fan_out_in(ex, learner, sampler.ids(s), before=False)
            learner.apply(reduced.grad)
        step_s = (time.perf_counter() - start) / steps
        speeds = dict(ex.policy.speeds)
        shares: dict[str, int] = {}
        for r in results:
            shares[r.worker] = shares.get(r.worker, 0) + 1
    finally:
        ex.close()
    ideal_s = mb / sum(speeds.values())
    return {
        "shards_per_worker": shards,
        "shards": workers * shards,
        "step_ms": 1e3 * step_s,
        "ideal_ms": 1e3 * ideal_s,
        "vs_ideal": step_s / ideal_s,
        "last_step_shares": shares,
        "speeds_tasks_per_s": {f"worker-{w}": v for w, v in sorted(speeds.items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--factor", type=float, default=2.0, help="the last worker takes this many times as long")
    ap.add_argument("--shards", default="1,4,8", help="shards_per_worker values")
    ap.add_argument("--meta-batch", type=int, default=400)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance of its own, nothing listens outside
    ray.init(num_cpus=args.workers, include_dashboard=False, object_store_memory=200 * 2**20)
    path = Path("/tmp/dmaml-stragglers.arrow")
    build(path, "sinusoid", 8 * args.meta_batch, seed=0, shots=10, queries=10, progress=False, overwrite=True)
    store = TaskStore.open(path)
    rows = [
        measure(store, args.workers, int(k), args.factor, args.steps, args.warmup, args.meta_batch)
        for k in args.shards.split(",")
    ]
    ray.shutdown()
    out = {
        "benchmark": f"{args.workers} Ray workers (1 CPU each), the last at 1/{args.factor:g} speed; sinusoid MLP, "
        f"meta-batch {args.meta_batch}, 5 inner steps, second order; driver mode",
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    print("shards per worker | shards | ms per step | ideal ms | vs ideal | last step's shares")
    print("----------------- | ------ | ----------- | -------- | -------- | ------------------")
    for r in rows:
        shares = ", ".join(f"{w} {n}" for w, n in sorted(r["last_step_shares"].items()))
        print(
            f"{r['shards_per_worker']} | {r['shards']} | {r['step_ms']:.1f} | {r['ideal_ms']:.1f} | "
            f"{r['vs_ideal']:.2f}x | {shares}"
        )
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
