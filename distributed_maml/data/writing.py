"""Building task stores: from a generated family, a table, or image folders, written in
batches to one Arrow file (the format: data/format.py) with a disk check before the first
byte and an atomic rename after the last; `build_in_memory` for held-out and bench tasks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from distributed_maml import stopping
from distributed_maml.config import Source
from distributed_maml.data.episodes import TASK_IDS, EpisodeSpec, Examples
from distributed_maml.data.families import Family, ImageFamily, check_generated, folders, resolve
from distributed_maml.data.families import table as table_mod
from distributed_maml.data.families.images import ImageTable, check_class_split
from distributed_maml.data.format import (
    BUILD_SPLITS,
    FORMAT_VERSIONS,
    SPLITS,
    StoreInfo,
    _record_batch,
    family_info,
    image_dictionary,
    image_info,
)
from distributed_maml.data.store import TaskStore
from distributed_maml.errors import StoreError, with_filename

DISK_MARGIN_BYTES = 64 * 2**20  # room left for checkpoints and logs after a store is written
# The store `train` builds when task.num_tasks = 0: steps x meta_batch tasks (each seen once),
# but no more than this many tasks or bytes; the sampler cycles through it in epochs.
DEFAULT_MAX_TASKS = 10**6
DEFAULT_MAX_BYTES = 2**30
_SPLIT_STREAM = {
    "train": 0,
    "test": 1,
    "all": 2,
    "val": 3,
}  # disjoint RNG streams: held-out tasks never repeat training tasks


def generate_batches(
    info: StoreInfo,
    progress: bool = False,
    family: Family | None = None,
    table: ImageTable | None = None,
    examples: Examples | None = None,
) -> Iterator[pa.RecordBatch]:
    """The store's record batches; batch i draws from its own seeded stream, so any slice of
    the store can be regenerated alone. Vector stores draw from `family`, image stores from
    `table`."""
    if info.on_the_fly:  # no task rows: the examples once (one batch), or nothing for a family
        if examples is not None:
            yield stream_batch(info, examples)
        return
    n_batches = -(-info.num_tasks // info.rows_per_batch)
    quiet = None if progress and n_batches >= 4 else True  # None: a bar on terminals only
    dictionary = image_dictionary(info, table) if table is not None else None
    for i in tqdm(range(n_batches), desc="building tasks", unit="batch", disable=quiet):
        count = min(info.rows_per_batch, info.num_tasks - i * info.rows_per_batch)
        rng = np.random.default_rng([info.seed, _SPLIT_STREAM[info.split], i])
        if table is not None:
            arrays = table.sample(rng, count, info.ways, info.shots, info.queries)
        else:
            assert family is not None
            arrays = family.generate(rng, count, info.shots, info.queries)
            if i == 0:
                check_generated(family, arrays, count, info.shots, info.queries)
        yield _record_batch(info, arrays, dictionary)


@dataclass(frozen=True)
class Plan:
    """What a build will write: the store's info and how to make its batches."""

    info: StoreInfo
    family: Family | None = None
    table: ImageTable | None = None
    examples: Examples | None = None
    """An on-the-fly store's examples (None: a generated family's, which holds none)."""

    def batches(self, progress: bool = False) -> Iterator[pa.RecordBatch]:
        return generate_batches(self.info, progress, self.family, self.table, self.examples)


def plan(family: str, num_tasks: int, seed: int, shots: int, queries: int, split: str, ways: int = 0) -> Plan:
    """The store a family would give (vector or image), checked, before anything is written."""
    check_build_args(num_tasks, shots, queries, split, seed)
    fam = resolve(family)
    if isinstance(fam, ImageFamily):
        if split not in SPLITS:
            raise StoreError(f"--split must be one of {', '.join(SPLITS)} for {family}, got {split!r}")
        ways = ways or fam.ways
        table = fam.table(split)
        table.check(ways, shots, queries, f"the {split} classes of {family}")
        return Plan(image_info(family, table, num_tasks, seed, ways, shots, queries, split), table=table)
    if ways and ways != fam.ways:
        raise StoreError(f"task family {family} has {fam.ways} ways; it does not take --ways / task.ways = {ways}")
    return Plan(family_info(fam, num_tasks, seed, shots, queries, split), family=fam)


def default_plan(family: str, steps: int, meta_batch: int, seed: int, shots: int, queries: int, ways: int) -> Plan:
    """The store `train` builds when task.num_tasks = 0 (the rule above DEFAULT_MAX_TASKS)."""
    p = plan(family, 1, seed, shots, queries, "train", ways)
    cap = min(DEFAULT_MAX_TASKS, max(1, (DEFAULT_MAX_BYTES - p.info.nbytes) // p.info.row_nbytes))
    if meta_batch > cap:
        raise StoreError(
            f"task.meta_batch = {meta_batch} is larger than the default store ({cap} {family} tasks, at most "
            f"{DEFAULT_MAX_TASKS} tasks or {_size(DEFAULT_MAX_BYTES)}); lower task.meta_batch or set task.num_tasks"
        )
    return replace(p, info=replace(p.info, num_tasks=min(steps * meta_batch, cap)))


def check_build_args(num_tasks: int, shots: int, queries: int, split: str, seed: int) -> None:
    """The arguments every build shares."""
    if num_tasks < 1:
        raise StoreError(f"--num-tasks must be >= 1, got {num_tasks}")
    if shots < 1 or queries < 1:
        raise StoreError(f"--shots and --queries must be >= 1, got {shots} and {queries}")
    if split not in BUILD_SPLITS:
        raise StoreError(f"--split must be one of {', '.join(BUILD_SPLITS)}, got {split!r}")
    if not 0 <= seed < 2**63:
        raise StoreError(f"--seed must be in [0, 2**63), got {seed}")


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def check_disk(path: Path, nbytes: int) -> None:
    """Refuses a file that would not fit in its folder's free space (with a margin for the
    checkpoints and logs that follow it), before anything is written."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folder may be made later
        folder = folder.parent
    st = os.statvfs(folder)
    if st.f_blocks == 0:  # not a disk (/proc, /sys): writing there fails on its own, with its own reason
        return
    free = st.f_bavail * st.f_frsize
    if nbytes + DISK_MARGIN_BYTES > free:
        raise StoreError(
            f"the task store {path} would take about {_size(nbytes)} but {folder} has {_size(free)} free; "
            "lower --num-tasks / task.num_tasks or write it elsewhere"
        )


def write_batches(path: str | Path, info: StoreInfo, batches: Iterator[pa.RecordBatch], overwrite: bool) -> Path:
    """Writes an IPC file atomically: a temporary file beside the target, then a rename. Checked
    against the free disk first; a failed or stopped write removes its temporary file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"{path} already exists; pass --overwrite to replace it or choose another --out")
    if path.is_dir():
        raise StoreError(f"--out {path} is a folder; give the path of the .arrow file to write")
    check_disk(path, info.nbytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, info.schema()) as writer:
            for batch in batches:
                stopping.check(f"while writing {path}; nothing was kept")
                writer.write_batch(batch)
        os.replace(tmp, path)
    except OSError as e:  # Arrow's write errors carry no file name
        raise with_filename(e, path) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def build(
    path: str | Path,
    family: str,
    num_tasks: int,
    seed: int = 0,
    shots: int = 5,
    queries: int = 15,
    split: str = "train",
    overwrite: bool = False,
    progress: bool = True,
    ways: int = 0,
) -> StoreInfo:
    """Generates `num_tasks` tasks of a family into an Arrow IPC file at `path` (`ways`: for
    families that choose, 0 = the family's default)."""
    p = plan(family, num_tasks, seed, shots, queries, split, ways)
    write_batches(path, p.info, p.batches(progress), overwrite)
    return p.info


def build_from_table(
    table: str | Path,
    out: str | Path,
    label_column: str,
    ways: int,
    shots: int,
    queries: int,
    num_tasks: int,
    split: str = "train",
    seed: int = 0,
    test_fraction: float = 0.3,
    overwrite: bool = False,
    val_fraction: float = 0.0,
    spec: EpisodeSpec | None = None,
) -> StoreInfo:
    """Episodic N-way K-shot tasks from a table (see data/families/table.py); the classes of the
    train and test splits are disjoint for the same seed and test_fraction. `spec`: an on-the-fly
    store of the split's rows (ways, shots, queries: the spec's largest), episodes drawn by id."""
    check_build_args(num_tasks, shots, queries, split, seed)
    if split == "all":
        raise StoreError("--classes-split all is for --from-images; tables are split into train, val and test here")
    if not 0 < test_fraction < 1:
        raise StoreError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    check_class_split(split, val_fraction)
    tasks = table_mod.load(table, label_column, ways, shots, queries, split, test_fraction, seed, val_fraction)
    family = Family("table", "classification", tasks.features.shape[1], ways, ways, tasks.generate)
    info = family_info(
        family,
        num_tasks,
        seed,
        shots,
        queries,
        split,
        source=str(Path(table).resolve()),
        classes=tasks.class_names,
        features=tasks.feature_names,
        feature_mean=tasks.mean,
        feature_std=tasks.std,
    )
    if spec is not None:
        spec.check(False, "the table's episodes")
        index = np.concatenate(tasks.class_index)
        labels = np.repeat(np.arange(len(tasks.class_index)), [len(i) for i in tasks.class_index])
        examples = Examples(tasks.features[index], labels.astype(np.int32))
        info = as_stream(info, spec, num_tasks, examples)
        write_batches(out, info, generate_batches(info, examples=examples), overwrite)
        return info
    write_batches(out, info, generate_batches(info, progress=True, family=family), overwrite)
    return info


def build_from_images(
    root: str | Path,
    out: str | Path,
    ways: int,
    shots: int,
    queries: int,
    num_tasks: int,
    image_size: int,
    split: str = "train",
    seed: int = 0,
    test_fraction: float = 0.3,
    grayscale: bool = False,
    rotations: tuple[int, ...] = (0,),
    class_depth: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    val_fraction: float = 0.0,
    spec: EpisodeSpec | None = None,
) -> tuple[StoreInfo, Any]:
    """Episodic N-way K-shot image tasks from class folders (see data/families/folders.py); returns the
    info and the loader's summary (skipped files, dropped classes)."""
    check_build_args(num_tasks, shots, queries, split, seed)
    out = Path(out)
    if out.exists() and not overwrite:  # before minutes of decoding
        raise StoreError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    table, summary = folders.load(
        root,
        ways,
        shots,
        queries,
        image_size,
        split,
        test_fraction,
        seed,
        grayscale,
        rotations,
        class_depth,
        strict,
        val_fraction,
    )
    info = image_info("images", table, num_tasks, seed, ways, shots, queries, split, source=str(Path(root).resolve()))
    if spec is not None:  # on the fly: the image table once, episodes drawn by id
        spec.check(False, "the image folder's episodes")
        examples = Examples(table.images, table.labels)
        info = as_stream(info, spec, num_tasks, examples)
        write_batches(out, info, generate_batches(info, examples=examples), overwrite)
        return info, summary
    write_batches(out, info, generate_batches(info, True, table=table), overwrite)
    return info, summary


def build_in_memory(
    family: str, num_tasks: int, seed: int, shots: int, queries: int, split: str = "test", ways: int = 0
) -> TaskStore:
    """The same tasks `build` would write, held in memory (used for held-out evaluation)."""
    return plan_in_memory(plan(family, num_tasks, seed, shots, queries, split, ways), f"<held-out {family} tasks>")


def plan_in_memory(p: Plan, name: str) -> TaskStore:
    """A plan's store written into memory and opened from there."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, p.info.schema()) as writer:
        for batch in p.batches():
            writer.write_batch(batch)
    return TaskStore.from_buffer(sink.getvalue(), name=name)


# ---- on-the-fly stores (layout "stream"): examples once, tasks drawn from (seed, id) ----------


def stream_batch(info: StoreInfo, examples: Examples) -> pa.RecordBatch:
    """An on-the-fly store's one record batch: its examples and their classes."""
    size = int(np.prod(info.example_shape))
    flat = pa.array(np.ascontiguousarray(examples.x).reshape(-1), type=info.dtype("example"))
    cols = [pa.FixedSizeListArray.from_arrays(flat, size), pa.array(examples.labels.astype(np.int32), pa.int32())]
    return pa.RecordBatch.from_arrays(cols, schema=info.schema())


def as_stream(info: StoreInfo, spec: EpisodeSpec, num_tasks: int, examples: Examples | None) -> StoreInfo:
    """`info` (a materialized store's, at the spec's largest shape) as an on-the-fly store's."""
    if not 1 <= num_tasks <= TASK_IDS:
        raise StoreError(f"--num-tasks of an on-the-fly store must be in [1, 2**63 - 1], got {num_tasks}")
    if examples is not None:
        examples.check(spec, f"the {info.split} classes of {info.family}")
    classification = info.kind == "classification"
    return replace(
        info,
        layout="stream",
        format_version=FORMAT_VERSIONS["stream"],
        episodes=spec.to_tuple(),
        num_tasks=num_tasks,
        num_params=0,
        num_images=0 if examples is None else len(examples.x),
        output_dim=spec.ways[1] if classification and examples is not None else info.output_dim,
        rows_per_batch=1,
    )


def plan_stream(
    family: str,
    spec: EpisodeSpec,
    seed: int,
    split: str,
    num_tasks: int = TASK_IDS,
    classes: tuple[int, int] | None = None,
    part: tuple[int, int] | None = None,
) -> Plan:
    """An on-the-fly store of a built-in or user family: an image family's table of `split`
    (its examples once; `classes`: only its classes lo..hi-1, e.g. one "alphabet" of glyphs), a
    vector family's nothing but its name."""
    fam = resolve(family)
    spec.check(fam.kind == "regression", "task")
    check_build_args(1, spec.shots[1], spec.queries[1], split, seed)
    if (classes or part) is not None and not isinstance(fam, ImageFamily):
        raise StoreError(
            f"a class range or part picks classes of an image family's split; {family} generates its tasks"
        )
    if isinstance(fam, ImageFamily):
        if split not in SPLITS:
            raise StoreError(f"--split must be one of {', '.join(SPLITS)} for {family}, got {split!r}")
        table = fam.table(split)
        if part is not None:  # the i-th of n equal parts of this split's classes
            classes = (part[0] * table.num_classes // part[1], (part[0] + 1) * table.num_classes // part[1])
        if classes is not None:
            table = _class_range(table, classes, f"the {split} classes of {family}")
        examples = Examples(table.images, table.labels)
        base = image_info(family, table, 1, seed, spec.ways[1], spec.shots[1], spec.queries[1], split)
        return Plan(as_stream(base, spec, num_tasks, examples), examples=examples)
    if fam.kind == "classification" and spec.ways[1] > fam.ways:
        raise StoreError(f"task family {family} has {fam.ways} ways; its episodes take at most that many (task.ways)")
    base = family_info(fam, 1, seed, spec.shots[1], spec.queries[1], split)
    return Plan(as_stream(base, spec, num_tasks, None), family=fam)


def episodes_of(
    family: str, ways: tuple[int, int], shots: tuple[int, int], queries: tuple[int, int], max_support: int = 0
) -> EpisodeSpec:
    """The episodes `task.*` asks of a family (ways (0, 0): the family's own)."""
    if ways == (0, 0):
        w = resolve(family).ways
        ways = (w, w)
    return EpisodeSpec(ways, shots, queries, max_support)


def held_out(
    info: StoreInfo,
    num_tasks: int,
    seed: int,
    split: str,
    shots: int | None = None,
    sources: list[Source] | None = None,
) -> TaskStore:
    """Held-out episodes like an on-the-fly run's (`info`: its training store's) from `split`,
    in memory: the first `num_tasks` ids of the split's own draw (a fixed set, ids 0..n-1), the
    episodes' shapes as trained; `shots` fixes the support (regression: the queries too). A run on
    several `sources` (all families: each its part of the split's classes) draws from them alike."""
    spec = info.spec
    if shots is not None:
        queries = (shots, shots) if info.kind == "regression" else spec.queries
        spec = replace(spec, shots=(shots, shots), queries=queries)
    name = f"<held-out {info.family} episodes ({split})>"
    if info.sources:
        if not sources or any(s.store for s in sources):
            raise StoreError(
                f"a run on several sources ({', '.join(info.sources)}) with store sources has no {split} episodes of "
                f"its own: build each source with --split {split}, combine them with `tasks build --on-the-fly "
                "--sources ...`, and pass it (eval: --tasks; validation: task.val_store)"
            )
        return plan_in_memory(plan_from_sources(sources, spec, seed, split, num_tasks), name)
    return plan_in_memory(plan_stream(info.family, spec, seed, split, num_tasks), name)


def _class_range(table: ImageTable, classes: tuple[int, int], where: str) -> ImageTable:
    """Classes lo..hi-1 of `table` (lo:hi with hi past the last class is an error)."""
    lo, hi = classes
    if not 0 <= lo < hi <= table.num_classes:
        raise StoreError(f"--classes {lo}:{hi} is outside {where} (0:{table.num_classes}); pick lo:hi within it")
    keep = (table.labels >= lo) & (table.labels < hi)
    return ImageTable(table.images[keep], table.labels[keep] - lo, table.class_names[lo:hi])


def plan_sources(
    stores: list[TaskStore], names: list[str], weights: list[float], spec: EpisodeSpec | None, seed: int, num_tasks: int
) -> Plan:
    """One on-the-fly store over several (`task.sources`, `tasks build --sources`): their examples
    side by side (source i's classes after source i - 1's), each episode's source drawn by
    weight. The sources hold examples of one shape (a one-line error names the odd one out);
    `spec`: the episodes (None: the first source's)."""
    if len(stores) < 2:
        raise StoreError("several sources need at least two stores; train on one store with --tasks")
    if len(set(names)) != len(names):
        raise StoreError(f"source names must differ, got {', '.join(names)}")
    first = stores[0].info
    for store, name, weight in zip(stores, names, weights, strict=True):
        info = store.info
        if store.drawer is None or store.drawer.examples is None or info.sources:
            raise StoreError(
                f"source {name} ({store.name}) is not an on-the-fly store of examples; build it with "
                "`distributed-maml tasks build --on-the-fly` from an image family, --from-images or --from-table"
            )
        if (info.example_shape, info.kind, bool(info.image_shape)) != (
            first.example_shape,
            first.kind,
            bool(first.image_shape),
        ):
            raise StoreError(
                f"source {name} holds examples of shape {info.example_shape}, source {names[0]} of {first.example_shape}; "
                "build every source at one size (--image-size)"
            )
        if not weight > 0:
            raise StoreError(f"source {name} has weight {weight}; weights must be > 0")
    spec = spec or first.spec
    spec.check(False, "task")
    parts = [s.drawer.examples for s in stores if s.drawer is not None and s.drawer.examples is not None]
    for name, part in zip(names, parts, strict=True):
        part.check(spec, f"source {name}")
    counts = [int(p.labels.max()) + 1 for p in parts]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    examples = Examples(
        np.concatenate([p.x for p in parts]),
        np.concatenate([p.labels + o for p, o in zip(parts, offsets, strict=True)]).astype(np.int32),
    )
    splits = {s.info.split for s in stores}
    if len(splits) > 1:
        raise StoreError(f"the sources mix splits ({', '.join(sorted(splits))}); combine train stores, or test stores")
    families = {s.info.family for s in stores}
    family = families.pop() if len(families) == 1 else ("images" if first.image_shape else "table")
    classes = tuple(f"{n}/{c}" for s, n in zip(stores, names, strict=True) for c in s.info.classes)
    base = replace(first, family=family, seed=seed, split=splits.pop(), classes=classes, source="")
    info = as_stream(base, spec, num_tasks, None)
    info = replace(
        info,
        num_images=len(examples.x),
        output_dim=spec.ways[1],
        sources=tuple(names),
        source_weights=tuple(float(w) for w in weights),
        source_classes=tuple(counts),
    )
    return Plan(info, examples=examples)


def plan_from_sources(
    sources: list[Source], spec: EpisodeSpec | None, seed: int, split: str, num_tasks: int = TASK_IDS
) -> Plan:
    """task.sources as one on-the-fly store of `split`: a family source drawn from that split's
    classes (its part), a store source opened as it is (held out only by a store of its own)."""
    stores = []
    for src in sources:
        if src.store:
            stores.append(TaskStore.open(src.store))
            continue
        first = spec or EpisodeSpec.fixed_shape(resolve(src.family).ways, 1, 1)
        p = plan_stream(src.family, first, seed, split, num_tasks, part=src.part)
        stores.append(plan_in_memory(p, f"<{src.name}: {src.family} {split} classes>"))
    return plan_sources(stores, [s.name for s in sources], [s.weight for s in sources], spec, seed, num_tasks)
