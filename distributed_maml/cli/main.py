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

from distributed_maml import stopping
from distributed_maml.cli import bench as bench_cli
from distributed_maml.cli import tasks as tasks_cli
from distributed_maml.cli import use as use_cli
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
        "--no-pretrained",
        action="store_true",
        help="skip the pretrained baseline (its training and step-size search): scratch only",
    )
    e.add_argument(
        "--checkpoint",
        help="best, latest or step_N (default: best when the run keeps one by validation, else latest)",
    )
    e.add_argument("--pretrain-steps", type=int, help="steps of the pretrained baseline (default: min(steps, 10000))")
    e.add_argument(
        "--permutations",
        type=int,
        default=0,
        help="K label assignments of the same tasks: the spread of the meta-model's accuracy over them (2-1000)",
    )
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")

    tasks_cli.add_parser(sub)

    pl = sub.add_parser("plot", help="redraw a run's plots (PNG in RUN_DIR/plots/)")
    pl.add_argument("run", type=Path)

    bench_cli.add_parser(sub)
    use_cli.add_parsers(sub)
    return p


def cmd_train(args: argparse.Namespace) -> None:
    from distributed_maml.use import runs

    if args.val_tasks:  # absolute: a resume from another folder finds it
        args.overrides = [*args.overrides, f"task.val_store={str(args.val_tasks.resolve())!r}"]
    result = runs.train(
        args.config, args.overrides, args.output_dir, args.tasks, args.resume, progress=not args.no_progress
    )
    latest = result.latest
    print(f"done: {latest.step} steps; checkpoint {result.path / 'checkpoints' / latest.name}")


def cmd_tune(args: argparse.Namespace) -> None:
    from distributed_maml.sweeps import tune

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
    from distributed_maml.evaluation import evaltable, evaluate

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
        permutations=args.permutations,
        pretrained=not args.no_pretrained,
    )
    print(json.dumps(result) if args.json else evaltable.format_table(result))
    from distributed_maml.evaluation import plots

    plots.plot_run(args.run)  # the adaptation plot of this evaluation, with the others


def cmd_plot(args: argparse.Namespace) -> None:
    from distributed_maml.evaluation import plots

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
        "tasks": tasks_cli.cmd_tasks,
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
