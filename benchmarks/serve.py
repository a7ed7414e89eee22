"""Served adaptation against in-process `adapt_many`, on the same tasks.

For the seed MLP (2-way, 5 shots, 15 queries) and conv4 on glyph tasks (5-way 1-shot, 5
queries, 32 filters): a short training run is exported, then

- in-process: MetaModel.adapt_many + predict_many over --tasks held-out tasks at a time, on
  one torch thread (a replica's slice), tasks per second;
- served: one replica (1 CPU) of `distributed-maml serve`'s app on 127.0.0.1, batched
  (@serve.batch, up to 64 requests) and unbatched, each at 1, 8 and 64 concurrent clients
  (threads, each with its own HTTP session, a task per request, for --seconds): requests per
  second and p50 / p99 latency.

Targets (issue 38): at 64 clients, served conv4 throughput >= half the in-process throughput,
and batched never slower than unbatched. The clients share this machine's cores with the
replica: on the 2-core machine they take one core of two.

    python benchmarks/serve.py [--seconds 5] [--clients 1,8,64] [--tasks 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402

import distributed_maml as dm  # noqa: E402
from distributed_maml.data.store import TaskStore  # noqa: E402
from distributed_maml.data.writing import build  # noqa: E402
from distributed_maml.use import serving  # noqa: E402

MODELS = {
    "seed-mlp": (["training.steps=20"], ("seed", 0)),
    "conv4-glyphs": (
        ["task.family=glyphs", "task.ways=5", "task.shots=1", "task.queries=5", "model.name=conv4",
         "model.channels=32", "maml.inner_steps=1", "maml.inner_lr=0.4", "training.steps=4", "task.meta_batch=4"],
        ("glyphs", 5),
    ),
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(root: Path, name: str, tasks: int) -> tuple[Path, dict[str, np.ndarray]]:
    sets, (family, ways) = MODELS[name]
    common = ["scaling.num_workers=0", "training.eval_every=0", "task.num_tasks=64", "training.log_every=100"]
    result = dm.train(None, [*common, *sets], output_dir=root / name, progress=False)
    exported = dm.export(result.path, root / f"{name}-export")
    store = root / f"{name}-test.arrow"
    build(store, family, tasks, seed=11, split="test", progress=False, ways=ways)
    return exported, TaskStore.open(store).rows(np.arange(tasks))


def in_process(exported: Path, rows: dict[str, np.ndarray], seconds: float) -> float:
    """Tasks per second of adapt_many + predict_many over all the tasks at once, one thread."""
    torch.set_num_threads(1)
    meta = dm.load(exported, device="cpu")
    n = len(rows["x_support"])
    support = [(rows["x_support"][i], rows["y_support"][i]) for i in range(n)]
    queries = [rows["x_query"][i] for i in range(n)]
    meta.predict_many(meta.adapt_many(support), queries)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        meta.predict_many(meta.adapt_many(support), queries)
        done += n
    return done / (time.perf_counter() - start)


def payloads(rows: dict[str, np.ndarray]) -> list[bytes]:
    return [
        json.dumps(
            {
                "support": {"x": rows["x_support"][i].tolist(), "y": rows["y_support"][i].tolist()},
                "query": {"x": rows["x_query"][i].tolist()},
            }
        ).encode()
        for i in range(len(rows["x_support"]))
    ]


def load(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """`clients` threads posting tasks for `seconds`: requests/s, p50/p99 latency, mean batch."""
    latencies: list[float] = []
    batches: list[int] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        session = requests.Session()
        i = k
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            r = session.post(f"{url}/adapt", data=bodies[i % len(bodies)], timeout=120)
            dt = time.perf_counter() - t0
            with lock:
                if r.status_code == 200:
                    latencies.append(dt)
                    batches.append(r.json()["batch"])
                else:
                    errors[0] += 1
            i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {
        "clients": clients,
        "requests_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "mean_batch": float(np.mean(batches)) if batches else None,
        "errors": errors[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--tasks", type=int, default=64)
    p.add_argument("--json", type=Path, help="write the results here too")
    p.add_argument("--models", default=",".join(MODELS), help=f"which of {', '.join(MODELS)}")
    args = p.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    out: dict = {"machine": f"{torch.get_num_threads()} torch threads host, 1-CPU replica", "models": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in [m for m in MODELS if m in args.models.split(",")]:
                exported, rows = prepare(Path(tmp), name, args.tasks)
                entry: dict = {"in_process_tasks_per_s": in_process(exported, rows, args.seconds), "served": []}
                bodies = payloads(rows)
                for batched in (True, False):
                    settings = serving.ServeSettings(source=str(exported), device="cpu", batched=batched, max_batch=64)
                    serve.run(serving.build(settings), name=serving.APP_NAME)
                    serving.wait_ready(url)
                    load(url, bodies, 4, 1.0)  # warm-up
                    for c in clients:
                        row = {"batched": batched, **load(url, bodies, c, args.seconds)}
                        entry["served"].append(row)
                        print(name, row, flush=True)
                out["models"][name] = entry
    finally:
        serve.shutdown()
        ray.shutdown()
    print_table(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


def print_table(out: dict) -> None:
    print(
        f"\n{'model':<14} {'mode':<10} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}  in-process tasks/s"
    )
    for name, entry in out["models"].items():
        for r in entry["served"]:
            print(
                f"{name:<14} {'batched' if r['batched'] else 'unbatched':<10} {r['clients']:>7} "
                f"{r['requests_per_s']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['mean_batch']:>6.1f}  "
                f"{entry['in_process_tasks_per_s']:.1f}"
            )
    for name, entry in out["models"].items():
        at64 = {
            r["batched"]: r["requests_per_s"]
            for r in entry["served"]
            if r["clients"] == max(x["clients"] for x in entry["served"])
        }
        ratio = at64.get(True, 0) / entry["in_process_tasks_per_s"]
        print(f"{name}: served (batched, most clients) / in-process = {ratio:.2f}; batched / unbatched = "
              f"{at64.get(True, 0) / max(at64.get(False, 1e-9), 1e-9):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
