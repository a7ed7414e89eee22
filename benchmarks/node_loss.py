"""Step time after a host is lost, against a run started with one fewer worker.

Two Ray hosts with their own addresses on this machine (cluster/two-hosts.sh; root), one CPU
each. Per mode (driver, collective): a run with 1 worker (num_workers = 1: one shard a step), a
run with 2 workers spread over both hosts whose host B is cut off at step --cut-at, and, host B
still dead, the same 2-worker run started with one fewer worker (`scaling.min_workers = 1`: the
same two shards a step, so the same weights, on the one worker that could be placed). Reported:
ms per step before the cut, the stall at the cut (the longest gap between logged lines), ms per
step once Ray has declared the node dead (from --settle-s after the cut), and that against both
references: against the same run started on one worker it is what the loss itself costs; against
the 1-worker run it adds the second shard's fixed cost (exactness keeps a step's shards fixed).

    sudo python benchmarks/node_loss.py [--steps 3000] [--meta-batch 25] [--modes driver,collective] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "two-hosts.sh"
NET, PORT = "10.213.72", 6392
NODE = ["--num-cpus=1", "--object-store-memory=100000000"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--cut-at", type=int, default=300)
    ap.add_argument("--settle-s", type=float, default=15.0, help="seconds after the cut before timing (node dead)")
    ap.add_argument("--modes", default="driver,collective")
    ap.add_argument("--worker-timeout-s", type=float, default=5.0)
    ap.add_argument("--meta-batch", type=int, default=25)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="node-loss-"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": str(home),
        "RAY_AUTH_MODE": "token",
        "DM_HOSTS_PREFIX": "dmbench",
        "DM_HOSTS_NET": NET,
        "DM_HOSTS_PORT": str(PORT),
        # Ray declares a silent node dead after ~5 s (default: tens of seconds): same physics, shorter wait
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }

    def sh(*a: str) -> None:
        subprocess.run(["bash", str(SCRIPT), *a], env=env, check=True, capture_output=True)

    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    sh("down")
    sh("up")
    sh("ray", *NODE)
    rows = []
    try:
        for mode in args.modes.split(","):
            base = [
                f"training.steps={args.steps}", "training.log_every=50", "training.eval_every=0",
                "task.num_tasks=5000", f"scaling.worker_timeout_s={args.worker_timeout_s}", f"task.meta_batch={args.meta_batch}",
                "scaling.placement=spread", f"scaling.mode={mode}", "scaling.store_sharing=path",
            ]  # fmt: skip
            one = _run(env, home / f"{mode}-1", [*base, "scaling.num_workers=1"], None, sh)
            two = _run(env, home / f"{mode}-2", [*base, "scaling.num_workers=2"], args.cut_at, sh)
            # host B is dead now: the same run, started on the one worker that can be placed
            short = _run(
                env, home / f"{mode}-2of1", [*base, "scaling.num_workers=2", "scaling.min_workers=1"], None, sh
            )
            sh("rejoin", *NODE)
            settled = [(t, s) for t, s in two if t > two.cut + args.settle_s]
            row = {
                "mode": mode,
                "one_worker_ms": _per_step(one[1:]) * 1e3,
                "same_run_one_worker_ms": _per_step(short[1:]) * 1e3,
                "before_cut_ms": _per_step([x for x in two if x[0] < two.cut][1:]) * 1e3,
                "stall_s": max(b[0] - a[0] for a, b in zip(two, two[1:], strict=False) if b[0] > two.cut),
                "after_loss_ms": _per_step(settled) * 1e3,
            }
            row["after_vs_one_worker"] = row["after_loss_ms"] / row["one_worker_ms"]
            row["after_vs_same_run_one_worker"] = row["after_loss_ms"] / row["same_run_one_worker_ms"]
            rows.append(row)
    finally:
        sh("down")
    print(
        f"{'mode':<11} {'1 worker':>9} {'2 on 1':>8} {'2, before':>10} {'stall s':>8} {'2, after loss':>14} "
        f"{'after / 2 on 1':>15} {'after / 1 worker':>17}"
    )
    for r in rows:
        print(
            f"{r['mode']:<11} {r['one_worker_ms']:>7.1f}ms {r['same_run_one_worker_ms']:>6.1f}ms "
            f"{r['before_cut_ms']:>8.1f}ms {r['stall_s']:>8.1f} {r['after_loss_ms']:>12.1f}ms "
            f"{r['after_vs_same_run_one_worker']:>14.2f}x {r['after_vs_one_worker']:>16.2f}x"
        )
    machine = f"{os.cpu_count()} cores, two network namespaces, 1 CPU per Ray node"
    out = {"machine": machine, "meta_batch": args.meta_batch, "steps": args.steps, "rows": rows}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


class _Lines(list):
    cut: float = float("inf")


def _run(env: dict, out: Path, overrides: list[str], cut_at: int | None, sh) -> _Lines:
    """(wall time, step) of each logged line of a train run on host A; cuts host B at `cut_at`."""
    argv = [sys.executable, "-m", "distributed_maml", "train", "--config", "jobs/sinusoid.toml", "--no-progress"]
    argv += ["--output-dir", str(out), *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "exec", "a", *argv],
        cwd=REPO,
        env={**env, "RAY_ADDRESS": f"{NET}.1:{PORT}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines, metrics = _Lines(), out / "metrics.jsonl"
    while proc.poll() is None or len(lines) < _count(metrics):
        for raw in (metrics.read_text().splitlines() if metrics.exists() else [])[len(lines) :]:
            lines.append((time.monotonic(), json.loads(raw)["step"]))
        if cut_at is not None and lines and lines[-1][1] >= cut_at and lines.cut == float("inf"):
            sh("cut")
            lines.cut = time.monotonic()
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"run {out} failed: {proc.stderr.read()[-2000:]}")
    return lines


def _count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _per_step(lines: list[tuple[float, int]]) -> float:
    (t0, a), (t1, b) = lines[0], lines[-1]
    return (t1 - t0) / (b - a)


if __name__ == "__main__":
    main()
