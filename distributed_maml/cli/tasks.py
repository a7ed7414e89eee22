"""`distributed-maml tasks`: build task stores (materialized, or drawn on the fly from (seed,
id), from families, tables, image folders or several sources) and describe them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from distributed_maml.cli import bench as bench_cli
from distributed_maml.errors import UserError


def add_parser(sub: Any) -> None:
    """The `tasks build` and `tasks info` subcommands."""
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
        "--sampler",
        choices=("uniform", "meta-dataset"),
        default="uniform",
        help="with --on-the-fly: how episodes are drawn (meta-dataset: Triantafillou et al. 2020, with --shots "
        "the most a class adds to the support budget, --queries the most per class, --max-support the budget; "
        "docs/episodes.md)",
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
    varies = args.max_support or args.sampler != "uniform" or any(lo < hi for lo, hi in (ways, shots, queries))
    if args.on_the_fly or varies:
        if not args.on_the_fly:
            raise UserError("ranges (lo:hi), --max-support and --sampler draw tasks on the fly: add --on-the-fly")
        spec = data.episodes_of(family, ways, shots, queries, args.max_support, args.sampler) if family else None
        if spec is None:
            spec = data.EpisodeSpec(ways, shots, queries, args.max_support, args.sampler)
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
    from distributed_maml.data.onthefly import plan_sources

    if not args.on_the_fly or args.family or args.from_table or args.from_images:
        raise UserError("--sources combines on-the-fly stores: give it with --on-the-fly and no --family/--from-*")
    stores = [data.TaskStore.open(path) for _, path, _ in args.sources]
    spec = None
    if args.ways or args.shots or args.queries or args.max_support or args.sampler != "uniform":
        first = stores[0].info.spec
        spec = data.EpisodeSpec(
            args.ways or first.ways,
            args.shots or first.shots,
            args.queries or first.queries,
            args.max_support,
            args.sampler,
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
