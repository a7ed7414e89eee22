"""Soak: a long run with 2 Ray workers at a small meta-batch; driver and worker RSS and the
object store are sampled along the way and must stay flat. Prints a table and JSON.

    python benchmarks/soak.py --steps 20000 --meta-batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed_maml import config  # noqa: E402
from distributed_maml.training import run, train  # noqa: E402


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def plasma() -> str:
    from ray._private.internal_api import memory_summary

    line = [x for x in memory_summary(stats_only=True).splitlines() if "Plasma memory usage" in x]
    return line[0].strip() if line else "?"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    core = ray._private.worker.global_worker.core_worker
    tmp = Path(tempfile.mkdtemp(prefix="dmaml-soak-"))
    cfg = config.load(
        None,
        [
            "scaling.num_workers=2",
            f"task.meta_batch={args.meta_batch}",
            f"training.steps={args.steps}",
            f"training.log_every={args.steps}",
            "task.num_tasks=4096",
            "training.checkpoint_every=0",
        ],
    )
    r = run.prepare(cfg, tmp / "run", progress=False)
    ex = train.make_executor(r)
    pids = [i.pid for i in ex.worker_info()]
    every = max(1, args.steps // args.samples)
    samples, original, calls, start = [], ex.compute, {"n": 0}, time.perf_counter()

    def sampled(weights, version, shards):
        if calls["n"] % every == 0 or calls["n"] == args.steps - 1:
            samples.append(
                {
                    "step": calls["n"],
                    "elapsed_s": time.perf_counter() - start,
                    "driver_rss_mib": rss_mib(os.getpid()),
                    "worker_rss_mib": [rss_mib(pid) for pid in pids],
                    "driver_refs": len(core.get_all_reference_counts()),
                    "plasma": plasma(),
                }
            )
        calls["n"] += 1
        return original(weights, version, shards)

    ex.compute = sampled
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        train.train(r, ex, progress=False)
    ex.close()
    print(f"soak: {args.steps} steps, 2 workers, meta-batch {args.meta_batch}, {time.perf_counter() - start:.0f} s")
    print("step | driver RSS MiB | worker RSS MiB | driver refs | object store")
    print("---- | -------------- | -------------- | ----------- | ------------")
    for s in samples:
        print(
            f"{s['step']:>6} | {s['driver_rss_mib']:>14.1f} | {', '.join(f'{x:.1f}' for x in s['worker_rss_mib']):>14} | "
            f"{s['driver_refs']:>11} | {s['plasma']}"
        )
    result = {
        "steps": args.steps,
        "meta_batch": args.meta_batch,
        "samples": samples,
        "driver_rss_growth_mib": samples[-1]["driver_rss_mib"] - samples[1]["driver_rss_mib"],
        "worker_rss_growth_mib": [b - a for a, b in zip(samples[1]["worker_rss_mib"], samples[-1]["worker_rss_mib"])],
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
