"""The `bench` command's arguments and dispatch (bench/ hold the benchmarks)."""

from __future__ import annotations

import argparse
from typing import Any

from distributed_maml.errors import UserError


def steps_list(text: str) -> list[int]:
    """A comma-separated list of whole numbers >= 0 (--steps, --meta-batches, --inner-steps)."""
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes comma-separated whole numbers, got {text!r}") from None
    if not steps or min(steps) < 0:
        raise argparse.ArgumentTypeError(f"--steps takes comma-separated numbers >= 0, got {text!r}")
    return steps


def add_parser(sub: Any) -> None:
    be = sub.add_parser(
        "bench", help="meta-training tasks/s: per-task loop, bare vmap, in-process, Ray workers (one run)"
    )
    be.add_argument("--seconds", type=float, default=1.0, help="timed seconds per measurement (1)")
    be.add_argument("--quick", action="store_true", help="one model, one inner step, second order (< 1 min)")
    be.add_argument("--workers", type=int, default=None, help="ray_1..ray_N (default: N = min(CPUs, 4))")
    be.add_argument("--json", action="store_true", help="only the JSON line")
    be.add_argument(
        "--methods",
        type=lambda v: tuple(v.split(",")),
        default=None,
        help="only these methods (e.g. gpu_eager,gpu_graph)",
    )
    be.add_argument("--meta-batches", type=steps_list, default=None, help="with --conv4: meta-batch sizes (4,32,256)")
    be.add_argument("--algorithms", action="store_true", help="each algorithm's step (maml, fomaml, maml++, ...)")
    be.add_argument("--conv4", action="store_true", help="conv4 on 5-way 1-shot glyphs: vmap vs loop, and memory")
    be.add_argument(
        "--eval", action="store_true", help="eval's default protocol vs 1,000 training tasks' meta-gradients"
    )
    be.add_argument(
        "--paper", action="store_true", help="the paper's mini-ImageNet step (synthetic 84x84x3) and 60,000 steps' time"
    )
    be.add_argument(
        "--steps", type=int, default=None, help="with --paper: meta-steps to time (50 on a GPU, 3 on a CPU)"
    )
    be.add_argument("--precision", action="store_true", help="each scaling.precision's meta-gradient error and speed")
    be.add_argument("--memory", action="store_true", help="conv4 memory per task and cost by mode and inner steps")
    be.add_argument("--inner-steps", type=steps_list, default=None, help="with --memory: 1,5,10,25,50")
    be.add_argument(
        "--modes", default="second,checkpointed,first,imaml", help="with --memory: second,checkpointed,first,imaml"
    )
    be.add_argument("--meta-batch", type=int, default=4, help="with --memory: tasks per measured step (4)")
    be.add_argument(
        "--backbone",
        default="conv4",
        help="with --memory: conv4 (--channels filters) or resnet12 (widths C-2.5C-5C-10C from --channels C)",
    )
    be.add_argument("--memory-gb", type=float, default=None, help="with --memory: the budget for max meta-batch")
    be.add_argument("--channels", type=int, default=32, help="with --conv4: filters per block (32)")
    be.add_argument("--queries", type=int, default=5, help="with --conv4: query images per class (5)")
    be.add_argument("--threads", type=int, default=None, help="with --conv4: torch threads (default: all)")


def cmd_bench(args: argparse.Namespace) -> None:
    from distributed_maml.bench import conv4, evaluation, memory, methods

    if args.paper:
        from distributed_maml.bench import paper

        if args.steps is not None and args.steps < 1:
            raise UserError(f"--steps must be >= 1, got {args.steps}")
        paper.paper_main(args.steps, args.json)
    elif args.precision:
        from distributed_maml.bench import precision

        precision.precision_main(args.seconds, args.json)
    elif args.memory:
        modes = tuple(m for m in args.modes.split(",") if m)
        if not modes or any(m not in memory.MODES for m in modes):
            raise UserError(f"--modes must be some of {','.join(memory.MODES)}, got {args.modes!r}")
        steps = tuple(args.inner_steps or (1, 5, 10, 25, 50))
        if min(steps) < 1 or args.meta_batch < 1 or args.channels < 1 or (args.memory_gb or 1) <= 0:
            raise UserError("--inner-steps, --meta-batch and --channels must be >= 1 and --memory-gb > 0")
        if args.backbone not in memory.BACKBONES:
            raise UserError(f"--backbone must be one of {', '.join(memory.BACKBONES)}, got {args.backbone!r}")
        memory.memory_main(steps, modes, args.meta_batch, args.channels, args.memory_gb, args.backbone)
    elif args.eval:
        evaluation.eval_main(args.quick, args.json)
    elif args.algorithms:
        methods.algorithms_main(args.seconds, args.json)
    elif args.conv4:
        if args.channels < 1 or args.queries < 1:
            raise UserError(f"--channels and --queries must be >= 1, got {args.channels} and {args.queries}")
        conv4.conv4_main(
            tuple(args.meta_batches or (4, 32, 256)), args.channels, args.queries, args.seconds, args.threads
        )
    else:
        if args.seconds <= 0 or (args.workers is not None and args.workers < 0):
            raise UserError(f"--seconds must be > 0 and --workers >= 0, got {args.seconds} and {args.workers}")
        methods.main(args.seconds, args.quick, args.workers, args.json, args.methods)
