"""The commands that use a trained run: `adapt` (your own task, to predictions), `export` (a
folder a colleague loads) and `serve` (adaptation on Ray Serve). Thin layers over the public
API (use/metamodel.py, use/export.py, use/serving.py): each gives what the API gives."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from distributed_maml.errors import InputError


def add_parsers(sub: Any) -> None:
    a = sub.add_parser("adapt", help="adapt a run (or an export) to your own support set; predict your queries")
    a.add_argument("--run", type=Path, required=True, help="run folder or export folder")
    a.add_argument(
        "--support", type=Path, required=True, help="a table with a label column, or a folder of class folders"
    )
    a.add_argument("--query", type=Path, required=True, help="a table of examples, or a folder of images")
    a.add_argument("--out", type=Path, required=True, help="predictions: .csv or .parquet")
    a.add_argument("--label-column", default="label", help="the support table's label column (label)")
    a.add_argument("--steps", type=int, help="inner steps (default: the run's maml.inner_steps)")
    a.add_argument("--checkpoint", help="a run's best, latest or step_N (default: best when kept, else latest)")
    a.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")

    x = sub.add_parser("export", help="write a run's meta-model as safetensors plus a card.json")
    x.add_argument("--run", type=Path, required=True, help="run folder")
    x.add_argument("--out", type=Path, required=True, help="a new folder")
    x.add_argument("--checkpoint", help="best, latest or step_N (default: best when kept, else latest)")

    s = sub.add_parser("serve", help="serve adaptation on Ray Serve (POST /adapt); Ctrl-C stops")
    s.add_argument("--run", type=Path, required=True, help="run folder or export folder")
    s.add_argument("--checkpoint", help="a run's best, latest or step_N")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1; beyond loopback: --token-file)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--token-file", type=Path, help="a file whose first line is the bearer token requests must carry")
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--cpus-per-replica", type=float, default=1.0)
    s.add_argument("--gpus-per-replica", type=float, default=0.0, help="> 0: each replica adapts on its GPU slice")
    s.add_argument("--max-batch", type=int, default=64, help="requests adapted together (64)")
    s.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="how long a batch waits to fill (0: it takes what queued while the last batch ran)",
    )
    s.add_argument("--no-batch", action="store_true", help="adapt each request alone")
    s.add_argument("--cache-size", type=int, default=1024, help="adapted tasks kept per replica by task_id (1024)")


def cmd_adapt(args: argparse.Namespace) -> None:
    from distributed_maml.use import usertask
    from distributed_maml.use.export import load_any

    if args.out.suffix.lower() not in usertask.OUT_SUFFIXES:
        raise InputError(f"--out {args.out} must end in {' or '.join(usertask.OUT_SUFFIXES)}")
    meta = load_any(args.run, args.checkpoint, args.device)
    xs, ys = usertask.read_support(meta, args.support, args.label_column)
    xq, names = usertask.read_queries(meta, args.query, args.label_column)
    adapted = meta.adapt(xs, ys, args.steps)
    prediction = meta.predict_many([adapted], [xq])[0]
    if not prediction.finite():
        raise InputError(
            f"adaptation diverged on {args.support} (non-finite outputs): check the examples' scale, or lower --steps"
        )
    usertask.write_predictions(args.out, names, prediction)
    classes = f" into {len(adapted.classes)} classes" if adapted.classes else ""
    print(f"wrote {args.out}: {len(names)} predictions{classes} after {adapted.steps} inner steps ({meta.describe()})")


def cmd_export(args: argparse.Namespace) -> None:
    from distributed_maml.use.export import export

    out = export(args.run, args.out, args.checkpoint)
    print(f"wrote {out}: model.safetensors and card.json (distributed_maml.load({str(out)!r}))")


def cmd_serve(args: argparse.Namespace) -> None:
    from distributed_maml import stopping
    from distributed_maml.use import serving
    from distributed_maml.use.export import load_any

    token = serving.read_token(args.token_file) if args.token_file else None
    serving.check_binding(args.host, token)  # before Ray starts
    serving.check_port(args.host, args.port)
    settings = serving.ServeSettings(
        source=str(args.run.resolve()),
        checkpoint=args.checkpoint,
        replicas=args.replicas,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica,
        max_batch=args.max_batch,
        batch_wait_s=args.batch_wait_ms / 1000,
        batched=not args.no_batch,
        cache_size=args.cache_size,
        token=token,
    )
    meta = load_any(args.run, args.checkpoint, "cpu")  # a bad run or export: one line here, not in a replica
    from ray import serve

    from distributed_maml.execution.driver import connect

    connect()
    stopping.install()  # connecting to Ray replaced the SIGTERM handler
    try:
        url = serving.start(settings, args.host, args.port)
        serving.wait_ready(url)
        stopping.install()  # and Serve's start may have: SIGTERM and Ctrl-C shut the service down
        print(f"serving {meta.describe()} at {url}/adapt ({url}/docs); Ctrl-C stops", flush=True)
        while not stopping.requested():
            time.sleep(0.2)
        print("stopping the service", flush=True)
    finally:
        serve.shutdown()
