"""Scaling benchmark: meta-training throughput (tasks/s) in-process and with N Ray workers.

    python benchmarks/scaling.py                                  # this machine: in-process, 1, 2 workers at 4096
    python benchmarks/scaling.py --meta-batch 65536 --workers 1,2,4,8 --gpu-workers 1   # a GPU machine

Each configuration runs the real training step (sampler -> shards -> workers -> reduction ->
Adam) for --warmup steps, then times --steps steps. The in-process row uses one torch thread,
as one worker does, so that "overhead" compares like with like. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed_maml import config  # noqa: E402
from distributed_maml.core.shards import reduce_shards  # noqa: E402
from distributed_maml.data.sampler import Sampler, split_shards  # noqa: E402
from distributed_maml.data.writing import build  # noqa: E402
from distributed_maml.training import run, train  # noqa: E402


def measure(store: Path, meta_batch: int, workers: int, gpus: float, steps: int, warmup: int, tmp: Path) -> dict:
    name = f"w{workers}-g{gpus}-mb{meta_batch}"
    cfg = config.load(
        None,
        [
            f"task.meta_batch={meta_batch}",
            f"scaling.num_workers={workers}",
            f"scaling.gpus_per_worker={gpus}",
            "task.queries=15",
            "task.shots=5",
        ],
    )
    r = run.prepare(cfg, tmp / name, tasks=store, progress=False)
    if workers == 0:
        torch.set_num_threads(1)
    ex = train.make_executor(r)
    learner = train.make_learner(r)
    sampler = Sampler(0, len(r.store), meta_batch)
    compute, overhead = [], []
    try:
        for step in range(warmup + steps):
            if step == warmup:
                start = time.perf_counter()
            t0 = time.perf_counter()
            results = ex.compute(learner.weights(), learner.version, split_shards(sampler.ids(step), ex.num_shards))
            t1 = time.perf_counter()
            learner.apply(reduce_shards(results).grad)
            if step >= warmup:
                compute.append(max(x.compute_s for x in results))
                overhead.append(t1 - t0 - compute[-1])
        elapsed = time.perf_counter() - start
    finally:
        ex.close()
    return {
        "workers": workers,
        "gpus_per_worker": gpus,
        "meta_batch": meta_batch,
        "tasks_per_s": meta_batch * steps / elapsed,
        "step_ms": 1e3 * elapsed / steps,
        "slowest_shard_ms": 1e3 * float(np.mean(compute)),
        "overhead_ms": 1e3 * float(np.mean(overhead)),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--meta-batch", type=int, default=4096)
    p.add_argument("--workers", default="0,1,2", help="comma-separated CPU worker counts (0 = in-process)")
    p.add_argument("--gpu-workers", default="", help="comma-separated GPU worker counts (one GPU each)")
    p.add_argument("--shared-gpu", action="store_true", help="also 2 workers at 0.5 GPU each")
    p.add_argument("--overhead-meta-batch", type=int, default=1000, help="also in-process vs 1 worker here (0 = skip)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the JSON here")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="dmaml-bench-"))
    store = tmp / "tasks.arrow"
    build(store, "seed", max(4 * args.meta_batch, 16384), seed=0, progress=False)
    rows = [
        measure(store, args.meta_batch, int(w), 0.0, args.steps, args.warmup, tmp) for w in args.workers.split(",") if w
    ]
    rows += [
        measure(store, args.meta_batch, int(w), 1.0, args.steps, args.warmup, tmp)
        for w in args.gpu_workers.split(",")
        if w
    ]
    if args.shared_gpu:
        rows.append(measure(store, args.meta_batch, 2, 0.5, args.steps, args.warmup, tmp))
    overhead = []
    if args.overhead_meta_batch:
        overhead = [measure(store, args.overhead_meta_batch, w, 0.0, args.steps * 3, args.warmup, tmp) for w in (0, 1)]
    base = {r["workers"]: r["tasks_per_s"] for r in rows if r["gpus_per_worker"] == 0}
    one = base.get(1)
    result = {
        "benchmark": "meta-training throughput, seed family (10-64-2 MLP, 5 inner steps, second order)",
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "rows": rows,
        "speedup_vs_1_worker": {w: v / one for w, v in base.items()} if one else {},
        "overhead": overhead,
        "ray_overhead_1_worker": 1 - overhead[1]["tasks_per_s"] / overhead[0]["tasks_per_s"] if overhead else None,
    }
    print(result["machine"], "| torch", result["torch"], "| ray", result["ray"])
    print("workers | GPU/worker | meta-batch | tasks/s | step ms | slowest shard ms | Ray overhead ms")
    print("------- | ---------- | ---------- | ------- | ------- | ---------------- | ---------------")
    for r in rows + overhead:
        label = "in-process" if r["workers"] == 0 else str(r["workers"])
        print(
            f"{label:>7} | {r['gpus_per_worker']:>10g} | {r['meta_batch']:>10} | {r['tasks_per_s']:>7,.0f} | "
            f"{r['step_ms']:>7.1f} | {r['slowest_shard_ms']:>16.1f} | {r['overhead_ms']:>15.1f}"
        )
    if one:
        print("speedup vs 1 worker:", ", ".join(f"{w}: {v:.2f}x" for w, v in result["speedup_vs_1_worker"].items()))
    if overhead:
        print(
            f"Ray overhead of 1 worker vs in-process at meta-batch {args.overhead_meta_batch}: "
            f"{100 * result['ray_overhead_1_worker']:.1f}%"
        )
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
