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
from distributed_maml.data.episodes import EpisodeSpec, Examples
from distributed_maml.data.families import Family, ImageFamily, check_generated, folders, resolve
from distributed_maml.data.families import table as table_mod
from distributed_maml.data.families.images import ImageTable, check_class_split
from distributed_maml.data.format import (
    BUILD_SPLITS,
    SPLITS,
    StoreInfo,
    _record_batch,
    as_stream,
    family_info,
    image_dictionary,
    image_info,
    stream_batch,
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
            "lower --num-tasks / task.num_tasks, write it elsewhere, or draw tasks as they are used "
            "(task.on_the_fly = true; tasks build --on-the-fly): no task rows on disk at any count"
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
