"""`distributed-maml` subcommands. A user error prints one line and exits with code 2.

Each command imports what it runs inside its function: `--help` and a wrong argument answer at
once, without loading torch or Ray (a start-up cost, not a circle: tests/test_layers.py counts
these imports too)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distributed_maml import stopping
from distributed_maml.app import use_cli
from distributed_maml.app.bench import cli as bench_cli
from distributed_maml.errors import UserError, os_error_line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distributed-maml", description="Distributed MAML meta-training on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="meta-train (default: the seed problem, in-process or on local Ray)")
    t.add_argument("--config", type=Path, help="TOML config (default: the built-in one, = jobs/seed.toml)")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable",
    )
    t.add_argument("--output-dir", type=Path, help="run folder (default: a new folder under runs/)")
    t.add_argument("--tasks", type=Path, help="task store to train on (default: build one in the run folder)")
    t.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    t.add_argument(
        "--val-tasks",
        type=Path,
        metavar="STORE",
        help="validation tasks scored every training.eval_every steps (a --classes-split val store; "
        "= --set task.val_store=STORE)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    tu = sub.add_parser("tune", help="a sweep on Ray Tune: a config with a [tune] table; each trial a run")
    tu.add_argument("sweep", type=Path, nargs="?", help="the sweep file: a config plus a [tune] table")
    tu.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    tu.add_argument("--output-dir", type=Path, help="the sweep's folder (default: runs/sweep-<time>)")
    tu.add_argument("--tasks", type=Path, help="a task store every trial trains on (default: each builds its own)")
    tu.add_argument(
        "--trials",
        type=int,
        default=8,
        help="draws of the random keys, each x every grid combination (8; a grid-only space runs once)",
    )
    tu.add_argument("--max-concurrent", type=int, default=0, help="trials at a time (0: as many as the CPUs fit)")
    tu.add_argument("--no-early-stop", action="store_true", help="run every trial to its last step (no ASHA)")
    tu.add_argument("--resume", type=Path, metavar="SWEEP_DIR", help="continue a stopped sweep")

    e = sub.add_parser("eval", help="adapt on held-out tasks; query loss/accuracy with 95%% CIs")
    e.add_argument("--run", type=Path, required=True, help="run folder")
    e.add_argument("--tasks", type=Path, help="held-out store (default: fresh tasks from the run's family)")
    e.add_argument("--steps", type=bench_cli.steps_list, default=[0, 1, 5, 10], help="inner steps to report (0,1,5,10)")
    e.add_argument("--num-tasks", type=int, default=600, help="held-out tasks (600)")
    e.add_argument("--shots", type=int, help="support shots of generated held-out tasks (default: the run's)")
    e.add_argument("--inner-lr", type=float, help="test-time inner step size (default: the run's maml.inner_lr)")
    e.add_argument("--workers", type=int, help="Ray workers for evaluation (default: the run's; 0 = in-process)")
    e.add_argument("--no-baselines", action="store_true", help="skip the pretrained and scratch baselines")
    e.add_argument(
        "--checkpoint",
        help="best, latest or step_N (default: best when the run keeps one by validation, else latest)",
    )
    e.add_argument("--pretrain-steps", type=int, help="steps of the pretrained baseline (default: min(steps, 10000))")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")

    tasks = sub.add_parser("tasks", help="build or inspect Arrow task stores").add_subparsers(
        dest="tasks_cmd", required=True
    )
    b = tasks.add_parser("build", help="generate a task store")
    b.add_argument("--family", help="seed, sinusoid, glyphs or package.module:Family (or --from-table/--from-images)")
    b.add_argument(
        "--from-table", type=Path, metavar="FILE", help="N-way K-shot tasks from a .parquet/.arrow/.csv table"
    )
    b.add_argument("--label-column", help="with --from-table: the class label column (the rest are features)")
    b.add_argument(
        "--from-images",
        type=Path,
        metavar="DIR",
        help="N-way K-shot image tasks from DIR/<class>/*.png|jpg (see --class-depth)",
    )
    b.add_argument("--image-size", type=int, default=28, help="with --from-images: resize to S x S pixels (28)")
    b.add_argument("--grayscale", action="store_true", help="with --from-images: one channel instead of RGB")
    b.add_argument(
        "--rotations",
        type=bench_cli.steps_list,
        default=[0],
        help="with --from-images: comma-separated degrees; each rotation is a new class (Omniglot: 0,90,180,270)",
    )
    b.add_argument(
        "--class-depth",
        type=int,
        default=1,
        help="with --from-images: folder levels per class (2 for Omniglot's alphabet/character/)",
    )
    b.add_argument(
        "--strict", action="store_true", help="with --from-images: an unreadable image is an error, not skipped"
    )
    b.add_argument(
        "--ways",
        type=bounds,
        default=None,
        help="classes per task, n or lo:hi (--on-the-fly) (--from-table/--from-images: 5; glyphs: 5)",
    )
    b.add_argument(
        "--on-the-fly",
        action="store_true",
        help="hold the examples once and no task rows: each task is drawn from (--seed, its id), no cap "
        "(lo:hi ranges of ways/shots/queries need it)",
    )
    b.add_argument(
        "--max-support",
        type=int,
        default=0,
        help="with --on-the-fly: the most support examples of an episode (0: no cap)",
    )
    b.add_argument(
        "--sources",
        type=sources_arg,
        metavar="NAME=STORE[:WEIGHT],...",
        help="with --on-the-fly: one store over several on-the-fly stores of examples; each episode picks its "
        "source by weight (default 1), e.g. a=a.arrow:0.7,b=b.arrow:0.3",
    )
    b.add_argument(
        "--class-range",
        type=bounds_from_zero,
        metavar="LO:HI",
        help="with --on-the-fly and an image family: only classes LO..HI-1 of the split (an 'alphabet')",
    )
    b.add_argument(
        "--test-fraction",
        type=float,
        default=0.3,
        help="with --from-table/--from-images: share of classes held out for meta-test (at least --ways)",
    )
    b.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="with --from-table/--from-images: share of classes for meta-validation (--classes-split val); give "
        "every build of the data the same value so train leaves them out (default 0: no val classes)",
    )
    b.add_argument("--num-tasks", type=int, help="tasks to write (--on-the-fly: task ids, default 2**63 - 1)")
    b.add_argument("--out", type=Path, required=True, help="the .arrow file to write")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--shots", type=bounds, default=None, help="support examples per class/points, n or lo:hi (seed 5, sinusoid 10)"
    )
    b.add_argument(
        "--queries",
        type=bounds,
        default=None,
        help="query examples per class/points, n or lo:hi (seed 15, sinusoid 10)",
    )
    b.add_argument(
        "--split",
        "--classes-split",
        dest="split",
        default="train",
        help="train, val or test: validation and held-out tasks come from disjoint streams (tables, images, "
        "glyphs: disjoint classes); all: every class of an image folder that ships its own split",
    )
    b.add_argument("--overwrite", action="store_true", help="replace an existing file")
    i = tasks.add_parser("info", help="describe a task store")
    i.add_argument("path", type=Path)
    i.add_argument("--json", action="store_true")

    pl = sub.add_parser("plot", help="redraw a run's plots (PNG in RUN_DIR/plots/)")
    pl.add_argument("run", type=Path)

    bench_cli.add_parser(sub)
    use_cli.add_parsers(sub)
    return p


def bounds(text: str) -> tuple[int, int]:
    """--ways / --shots / --queries: "n" or "lo:hi"."""
    try:
        parts = [int(v) for v in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise argparse.ArgumentTypeError(f"expected n or lo:hi with 1 <= lo <= hi, got {text!r}")
    return parts[0], parts[1]


def bounds_from_zero(text: str) -> tuple[int, int]:
    """--class-range: "lo:hi", 0 <= lo < hi."""
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        lo = hi = -1
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"expected lo:hi with 0 <= lo < hi, got {text!r}")
    return lo, hi


def sources_arg(text: str) -> list[tuple[str, str, float]]:
    """--sources: NAME=STORE[:WEIGHT],... as (name, path, weight)."""
    out = []
    for item in text.split(","):
        name, eq, rest = item.partition("=")
        path, _, weight = rest.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            path, value = rest, 1.0
        if not eq or not name or not path:
            raise argparse.ArgumentTypeError(f"expected NAME=STORE[:WEIGHT],..., got {item!r}")
        out.append((name, path, value))
    return out


DEFAULT_SHOTS = {"seed": (5, 15), "sinusoid": (10, 10), "glyphs": (1, 15)}


def cmd_train(args: argparse.Namespace) -> None:
    from distributed_maml.app import runs

    if args.val_tasks:  # absolute: a resume from another folder finds it
        args.overrides = [*args.overrides, f"task.val_store={str(args.val_tasks.resolve())!r}"]
    result = runs.train(
        args.config, args.overrides, args.output_dir, args.tasks, args.resume, progress=not args.no_progress
    )
    latest = result.latest
    print(f"done: {latest.step} steps; checkpoint {result.path / 'checkpoints' / latest.name}")


def cmd_tune(args: argparse.Namespace) -> None:
    from distributed_maml.app import tune

    if args.resume and (args.sweep or args.overrides or args.output_dir or args.tasks):
        raise UserError(
            "--resume continues a sweep as it was started; drop the sweep file, --set, --output-dir and --tasks"
        )
    tune.tune_main(
        args.sweep,
        args.overrides,
        args.output_dir,
        args.tasks,
        args.trials,
        args.max_concurrent,
        not args.no_early_stop,
        args.resume,
    )


def cmd_eval(args: argparse.Namespace) -> None:
    from distributed_maml.app import evaluate

    result = evaluate.evaluate(
        args.run,
        args.tasks,
        args.steps,
        args.num_tasks,
        args.shots,
        baselines=not args.no_baselines,
        pretrain_steps=args.pretrain_steps,
        inner_lr=args.inner_lr,
        workers=args.workers,
        which=args.checkpoint,
    )
    print(json.dumps(result) if args.json else evaluate.format_table(result))
    from distributed_maml.app import plots

    plots.plot_run(args.run)  # the adaptation plot of this evaluation, with the others


def cmd_tasks(args: argparse.Namespace) -> None:
    from distributed_maml import data

    if args.tasks_cmd == "info":
        d = data.describe(data.TaskStore.open(args.path), args.path)
        print(json.dumps(d) if args.json else "\n".join(f"{k}: {v}" for k, v in d.items()))
        return
    if args.from_table and args.from_images:
        raise UserError("give one of --from-table and --from-images")
    if args.sources:
        _build_sources(args)
        return
    if not (args.family or args.from_table or args.from_images):
        raise UserError("tasks build needs --family seed|sinusoid|glyphs, --from-table FILE or --from-images DIR")
    family = args.family or ""
    default_shots, default_queries = DEFAULT_SHOTS.get(family, (1, 15) if args.from_images else (5, 15))
    ways, shots, queries = (
        (args.ways or (0, 0)),
        (args.shots or (default_shots,) * 2),
        args.queries or (default_queries,) * 2,
    )
    if args.from_table or args.from_images:
        ways = args.ways or (5, 5)
    spec = None
    if args.on_the_fly or args.max_support or any(lo < hi for lo, hi in (ways, shots, queries)):
        if not args.on_the_fly:
            raise UserError("ranges (lo:hi) and --max-support draw tasks on the fly: add --on-the-fly")
        spec = data.episodes_of(family, ways, shots, queries, args.max_support) if family else None
        if spec is None:
            spec = data.EpisodeSpec(ways, shots, queries, args.max_support)
    elif args.num_tasks is None:
        raise UserError("tasks build needs --num-tasks N (or --on-the-fly: tasks drawn from (seed, id), no cap)")
    if spec is not None:
        info = _build_on_the_fly(args, spec)
        what = f"{info.family} episodes ({spec.describe()})"
        held = f"{info.num_images} examples" if info.num_images else "no examples (the family generates them)"
        print(
            f"wrote {args.out}: {what}, drawn on the fly from (seed {info.seed}, id), ids 0..{info.num_tasks - 1}; "
            f"holds {held}, {Path(args.out).stat().st_size / 2**20:.1f} MiB"
        )
        return
    w, k, q = ways[0], shots[0], queries[0]
    if args.from_images:
        info, summary = data.build_from_images(
            args.from_images,
            args.out,
            w,
            k,
            q,
            args.num_tasks,
            args.image_size,
            args.split,
            args.seed,
            args.test_fraction,
            grayscale=args.grayscale,
            rotations=tuple(args.rotations),
            class_depth=args.class_depth,
            strict=args.strict,
            overwrite=args.overwrite,
            val_fraction=args.val_fraction,
        )
        c, h, wd = info.image_shape
        print(
            f"wrote {args.out}: {info.num_tasks} {info.ways}-way {info.shots}-shot tasks over {info.num_images} "
            f"images ({c}x{h}x{wd}) of {len(info.classes)} {info.split} classes from {args.from_images}; skipped "
            f"{summary.unreadable} unreadable file(s), dropped {summary.classes_dropped} class(es) with fewer than "
            f"{info.shots + info.queries} images; {Path(args.out).stat().st_size / 2**20:.1f} MiB"
        )
    elif args.from_table:
        if not args.label_column:
            raise UserError("--from-table needs --label-column NAME")
        info = data.build_from_table(
            args.from_table,
            args.out,
            args.label_column,
            w,
            k,
            q,
            args.num_tasks,
            args.split,
            args.seed,
            args.test_fraction,
            overwrite=args.overwrite,
            val_fraction=args.val_fraction,
        )
        print(
            f"wrote {args.out}: {info.num_tasks} {info.ways}-way {info.shots}-shot tasks from {args.from_table} "
            f"({info.split} classes: {', '.join(info.classes)})"
        )
    else:
        info = data.build(
            args.out, family, args.num_tasks, args.seed, k, q, args.split, overwrite=args.overwrite, ways=w
        )
        images = f" over {info.num_images} images of {len(info.classes)} classes" if info.layout == "images" else ""
        print(
            f"wrote {args.out}: {info.num_tasks} {info.family} tasks{images} ({info.split}, seed {info.seed}), "
            f"{Path(args.out).stat().st_size / 2**20:.1f} MiB"
        )


def _build_sources(args: argparse.Namespace) -> None:
    """`tasks build --sources`: one on-the-fly store over several."""
    from distributed_maml import data
    from distributed_maml.data.writing import plan_sources

    if not args.on_the_fly or args.family or args.from_table or args.from_images:
        raise UserError("--sources combines on-the-fly stores: give it with --on-the-fly and no --family/--from-*")
    stores = [data.TaskStore.open(path) for _, path, _ in args.sources]
    spec = None
    if args.ways or args.shots or args.queries or args.max_support:
        first = stores[0].info.spec
        spec = data.EpisodeSpec(
            args.ways or first.ways, args.shots or first.shots, args.queries or first.queries, args.max_support
        )
    names, weights = [n for n, _, _ in args.sources], [w for _, _, w in args.sources]
    p = plan_sources(stores, names, weights, spec, args.seed, args.num_tasks or data.TASK_IDS)
    data.write_batches(args.out, p.info, p.batches(), args.overwrite)
    mix = ", ".join(f"{n} {w:g}" for n, w in zip(names, weights, strict=True))
    print(
        f"wrote {args.out}: {p.info.family} episodes ({p.info.spec.describe()}) from {len(names)} sources ({mix}), "
        f"{p.info.num_images} examples, drawn on the fly from (seed {p.info.seed}, id)"
    )


def _build_on_the_fly(args: argparse.Namespace, spec: Any) -> Any:
    """`tasks build --on-the-fly`: a family's, a table's or an image folder's on-the-fly store."""
    from distributed_maml import data

    num_tasks = args.num_tasks or data.TASK_IDS
    if args.from_table:
        if not args.label_column:
            raise UserError("--from-table needs --label-column NAME")
        return data.build_from_table(
            args.from_table, args.out, args.label_column, *spec.ways[1:], *spec.shots[1:], *spec.queries[1:],
            num_tasks, args.split, args.seed, args.test_fraction, overwrite=args.overwrite,
            val_fraction=args.val_fraction, spec=spec,
        )  # fmt: skip
    if args.from_images:
        info, _ = data.build_from_images(
            args.from_images, args.out, spec.ways[1], spec.shots[1], spec.queries[1], num_tasks, args.image_size,
            args.split, args.seed, args.test_fraction, grayscale=args.grayscale, rotations=tuple(args.rotations),
            class_depth=args.class_depth, strict=args.strict, overwrite=args.overwrite,
            val_fraction=args.val_fraction, spec=spec,
        )  # fmt: skip
        return info
    p = data.plan_stream(args.family, spec, args.seed, args.split, num_tasks, args.class_range)
    data.write_batches(args.out, p.info, p.batches(), args.overwrite)
    return p.info


def cmd_plot(args: argparse.Namespace) -> None:
    from distributed_maml.app import plots

    for path in plots.plot_run(args.run):
        print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # a signal stops these at a safe point (serve: its loop shuts the service down)
    writes = args.command in ("train", "serve") or (args.command == "tasks" and args.tasks_cmd == "build")
    command = {
        "train": cmd_train,
        "tune": cmd_tune,
        "eval": cmd_eval,
        "tasks": cmd_tasks,
        "plot": cmd_plot,
        "bench": bench_cli.cmd_bench,
        "adapt": use_cli.cmd_adapt,
        "export": use_cli.cmd_export,
        "serve": use_cli.cmd_serve,
    }
    try:
        with stopping.handling() if writes else contextlib.nullcontext():
            command[args.command](args)
    except UserError as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"distributed-maml: error: {message}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a full disk, an unwritable or missing path: the user's to fix, in one line
        print(f"distributed-maml: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except stopping.Stopped as e:  # a graceful stop (see stopping.py): its line says how to go on
        print(f"distributed-maml: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ndistributed-maml: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
