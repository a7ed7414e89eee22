"""The Arrow task store: one uncompressed Arrow IPC file, one row per task.

Two layouts, named in the schema metadata with the shapes, family, seed and format version:

- "vectors" (format 1): fixed-size-list columns ``x_support``, ``y_support``, ``x_query``,
  ``y_query``, ``params``: every task carries its own examples.
- "images" (format 2): the image table is stored ONCE, as the Arrow dictionary of the
  ``image_ids`` column (values: struct<image: uint8[C*H*W], label: int32>, one entry per image
  with its class); a task row holds the int32 indices of its support then query images, plus
  ``y_support``, ``y_query`` (task-relative labels) and ``params`` (the classes of its ways).
  Repeating an image in a thousand tasks costs four bytes each time.

A store is opened memory-mapped: opening costs a few pages, and rows (and images) are numpy
views into the mapping. Only task ids ever travel between processes; rows are read, and images
gathered, where they are used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from . import stopping
from .errors import StoreError, with_filename
from .tasks import Family, ImageFamily, check_generated, resolve
from .tasks.images import ImageTable

FORMAT = "distributed-maml-taskstore"
FORMAT_VERSION = 1  # the vectors layout
FORMAT_VERSIONS = {"vectors": 1, "images": 2}
ROWS_PER_BATCH = 16384  # at most; fewer for large rows so a batch stays near BATCH_BYTES
BATCH_BYTES = 64 * 2**20
DISK_MARGIN_BYTES = 64 * 2**20  # room left for checkpoints and logs after a store is written
# The store `train` builds when task.num_tasks = 0: steps x meta_batch tasks (each seen once),
# but no more than this many tasks or bytes; the sampler cycles through it in epochs.
DEFAULT_MAX_TASKS = 10**6
DEFAULT_MAX_BYTES = 2**30
COLUMNS = ("x_support", "y_support", "x_query", "y_query", "params")
IMAGE_COLUMNS = ("image_ids", "y_support", "y_query", "params")
SPLITS = ("train", "test")
BUILD_SPLITS = ("train", "test", "all")  # "all": every class of an image folder (it ships its own split)
_SPLIT_STREAM = {"train": 0, "test": 1, "all": 2}  # disjoint RNG streams: held-out tasks never repeat training tasks


@dataclass(frozen=True)
class StoreInfo:
    """What the schema metadata says about a store."""

    family: str
    kind: str
    input_dim: int
    output_dim: int
    ways: int
    shots: int
    queries: int
    num_tasks: int
    num_params: int
    seed: int
    split: str
    rows_per_batch: int
    format_version: int = FORMAT_VERSION
    source: str = ""
    """Table-built stores: the table the tasks were drawn from."""
    classes: tuple[str, ...] = ()
    """Table- and image-built stores: the names of this split's classes (params hold their indices)."""
    layout: str = "vectors"
    """"vectors" (examples in every row) or "images" (an image table once, rows of indices)."""
    image_shape: tuple[int, ...] = ()
    """Images layout: one image's (C, H, W)."""
    num_images: int = 0
    """Images layout: rows of the image table."""

    @property
    def example_shape(self) -> tuple[int, ...]:
        """One model input's shape: (C, H, W) for images, (input_dim,) for vectors."""
        return self.image_shape if self.layout == "images" else (self.input_dim,)

    @property
    def columns(self) -> tuple[str, ...]:
        return IMAGE_COLUMNS if self.layout == "images" else COLUMNS

    @property
    def n_support(self) -> int:
        return self.ways * self.shots

    @property
    def n_query(self) -> int:
        return self.ways * self.queries

    def shape(self, column: str) -> tuple[int, ...]:
        """The per-task shape of a column (x_*: as gathered for the model)."""
        if column == "image_ids":
            return (self.n_support + self.n_query,)
        n = self.n_support if column.endswith("support") else self.n_query
        if column.startswith("x_"):
            return (n, *self.example_shape)
        if column.startswith("y_"):
            return (n,) if self.kind == "classification" else (n, self.output_dim)
        return (self.num_params,)

    def image_type(self) -> pa.DataType:
        """The image table's entry: the pixels of one image and its class."""
        size = int(np.prod(self.image_shape))
        return pa.struct([pa.field("image", pa.list_(pa.uint8(), size)), pa.field("label", pa.int32())])

    def dtype(self, column: str) -> pa.DataType:
        if column == "image_ids":
            return pa.dictionary(pa.int32(), self.image_type())
        return pa.int64() if column.startswith("y_") and self.kind == "classification" else pa.float32()

    @property
    def fingerprint(self) -> str:
        """A short digest of everything the metadata says (a replaced store shows here)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def row_nbytes(self) -> int:
        """One task row's bytes (fixed-size columns: exact up to Arrow's buffer padding)."""
        itemsize = {"image_ids": 4} | {c: self.dtype(c).bit_width // 8 for c in self.columns if c != "image_ids"}
        return sum(int(np.prod(self.shape(c))) * itemsize[c] for c in self.columns)

    @property
    def nbytes(self) -> int:
        """What the file will take: every row, plus the image table once."""
        images = self.num_images * (int(np.prod(self.image_shape)) + 4) if self.layout == "images" else 0
        return self.row_nbytes * self.num_tasks + images

    def schema(self) -> pa.Schema:
        fields = [
            pa.field(c, pa.list_(self.dtype(c), int(np.prod(self.shape(c)))), nullable=False) for c in self.columns
        ]
        meta = {"format": FORMAT, "info": json.dumps(asdict(self))}
        return pa.schema(fields, metadata=meta)


def family_info(
    family: Family, num_tasks: int, seed: int, shots: int, queries: int, split: str, **extra: Any
) -> StoreInfo:
    probe = family.generate(np.random.default_rng(0), 1, shots, queries)
    return StoreInfo(
        **extra,
        family=family.name,
        kind=family.kind,
        input_dim=family.input_dim,
        output_dim=family.output_dim,
        ways=family.ways,
        shots=shots,
        queries=queries,
        num_tasks=num_tasks,
        num_params=probe["params"].shape[1],
        seed=seed,
        split=split,
        rows_per_batch=max(1, min(ROWS_PER_BATCH, BATCH_BYTES // sum(a[0].nbytes for a in probe.values()))),
    )


def image_info(
    name: str,
    table: ImageTable,
    num_tasks: int,
    seed: int,
    ways: int,
    shots: int,
    queries: int,
    split: str,
    **extra: Any,
) -> StoreInfo:
    """The StoreInfo of an images-layout store over `table`."""
    return StoreInfo(
        **extra,
        family=name,
        kind="classification",
        input_dim=int(np.prod(table.image_shape)),
        output_dim=ways,
        ways=ways,
        shots=shots,
        queries=queries,
        num_tasks=num_tasks,
        num_params=ways,
        seed=seed,
        split=split,
        rows_per_batch=ROWS_PER_BATCH,
        format_version=FORMAT_VERSIONS["images"],
        classes=table.class_names,
        layout="images",
        image_shape=table.image_shape,
        num_images=len(table.images),
    )


def image_dictionary(info: StoreInfo, table: ImageTable) -> pa.StructArray:
    """The image table as the Arrow dictionary every task row indexes into (written once)."""
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(table.images.reshape(-1)), int(np.prod(info.image_shape)))
    return pa.StructArray.from_arrays([pixels, pa.array(table.labels, pa.int32())], fields=list(info.image_type()))


def _record_batch(info: StoreInfo, arrays: dict[str, np.ndarray], dictionary: pa.Array | None = None) -> pa.RecordBatch:
    cols = []
    for c in info.columns:
        flat = np.ascontiguousarray(arrays[c]).reshape(-1)
        size = int(np.prod(info.shape(c)))
        if c == "image_ids":  # indices into the one image table
            values: pa.Array = pa.DictionaryArray.from_arrays(pa.array(flat, pa.int32()), dictionary)
        else:
            values = pa.array(flat, type=info.dtype(c))
        cols.append(pa.FixedSizeListArray.from_arrays(values, size))
    return pa.RecordBatch.from_arrays(cols, schema=info.schema())


def generate_batches(
    info: StoreInfo, progress: bool = False, family: Family | None = None, table: ImageTable | None = None
) -> Iterator[pa.RecordBatch]:
    """The store's record batches; batch i draws from its own seeded stream, so any slice of
    the store can be regenerated alone. Vector stores draw from `family`, image stores from
    `table`."""
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

    def batches(self, progress: bool = False) -> Iterator[pa.RecordBatch]:
        return generate_batches(self.info, progress, self.family, self.table)


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
        raise StoreError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
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
) -> StoreInfo:
    """Episodic N-way K-shot tasks from a table (see tasks/table.py); the classes of the
    train and test splits are disjoint for the same seed and test_fraction."""
    from .tasks import table as table_mod

    check_build_args(num_tasks, shots, queries, split, seed)
    if split == "all":
        raise StoreError("--classes-split all is for --from-images; tables are split into train and test here")
    if not 0 < test_fraction < 1:
        raise StoreError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    tasks = table_mod.load(table, label_column, ways, shots, queries, split, test_fraction, seed)
    family = Family("table", "classification", tasks.features.shape[1], ways, ways, tasks.generate)
    info = family_info(
        family, num_tasks, seed, shots, queries, split, source=str(Path(table).resolve()), classes=tasks.class_names
    )
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
) -> tuple[StoreInfo, Any]:
    """Episodic N-way K-shot image tasks from class folders (see tasks/folders.py); returns the
    info and the loader's summary (skipped files, dropped classes)."""
    from .tasks import folders

    check_build_args(num_tasks, shots, queries, split, seed)
    out = Path(out)
    if out.exists() and not overwrite:  # before minutes of decoding
        raise StoreError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    table, summary = folders.load(
        root, ways, shots, queries, image_size, split, test_fraction, seed, grayscale, rotations, class_depth, strict
    )
    info = image_info("images", table, num_tasks, seed, ways, shots, queries, split, source=str(Path(root).resolve()))
    write_batches(out, info, generate_batches(info, True, table=table), overwrite)
    return info, summary


def build_in_memory(
    family: str, num_tasks: int, seed: int, shots: int, queries: int, split: str = "test", ways: int = 0
) -> TaskStore:
    """The same tasks `build` would write, held in memory (used for held-out evaluation)."""
    p = plan(family, num_tasks, seed, shots, queries, split, ways)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, p.info.schema()) as writer:
        for batch in p.batches():
            writer.write_batch(batch)
    return TaskStore.from_buffer(sink.getvalue(), name=f"<held-out {family} tasks>")


class TaskStore:
    """A validated, memory-mapped (or in-memory) task store. Rows are read by task id."""

    def __init__(self, reader: pa.ipc.RecordBatchFileReader, name: str, source: Any) -> None:
        self.name = name
        self._source = source  # keeps the mapping (or buffer) alive as long as the views are
        self.info = _parse_info(reader.schema, name)
        self._batches = _load_batches(reader, self.info, name)
        self.images, self.image_labels = (
            _image_table(reader, self.info, name) if self.info.layout == "images" else (None, None)
        )

    @classmethod
    def open(cls, path: str | Path) -> TaskStore:
        path = Path(path)
        if not path.exists():
            raise StoreError(f"task store {path} does not exist; build one with `distributed-maml tasks build`")
        if path.is_dir():
            raise StoreError(f"task store {path} is a folder; give the path of the .arrow file")
        try:
            source = pa.memory_map(str(path), "r")
        except OSError as e:
            raise StoreError(f"task store {path} cannot be opened: {e}") from None
        return cls(_open_reader(source, str(path)), str(path), source)

    @classmethod
    def from_buffer(cls, buffer: Any, name: str) -> TaskStore:
        """Opens a store held in memory (a pyarrow Buffer, bytes, or a uint8 numpy array, e.g.
        one fetched zero-copy from Ray's object store)."""
        buf = buffer if isinstance(buffer, pa.Buffer) else pa.py_buffer(buffer)
        return cls(_open_reader(pa.BufferReader(buf), name), name, buf)

    def __len__(self) -> int:
        return self.info.num_tasks

    @property
    def in_memory(self) -> bool:
        return isinstance(self._source, pa.Buffer)

    def buffer(self) -> np.ndarray:
        """An in-memory store's IPC bytes, as a uint8 array (no copy), e.g. for ray.put."""
        if not self.in_memory:
            raise ValueError(f"{self.name} is memory-mapped from a file; share its path instead")
        return np.frombuffer(self._source, dtype=np.uint8)

    def task(self, task_id: int) -> dict[str, np.ndarray]:
        """One task's arrays: views into the store, no copy."""
        if not 0 <= task_id < len(self):
            raise IndexError(f"task id {task_id} out of range for {self.name} ({len(self)} tasks)")
        b, o = divmod(task_id, self.info.rows_per_batch)
        return {c: a[o] for c, a in self._batches[b].items()}

    def model_columns(self) -> tuple[str, ...]:
        """The columns a worker needs per task: the examples' columns, or the image indices."""
        return ("image_ids", "y_support", "y_query") if self.info.layout == "images" else COLUMNS[:4]

    def column_chunks(self, column: str) -> list[np.ndarray]:
        """A column as its per-record-batch views [rows, *task shape], in task-id order."""
        return [b[column] for b in self._batches]

    def rows(self, ids: np.ndarray, columns: tuple[str, ...] = COLUMNS[:4]) -> dict[str, np.ndarray]:
        """The arrays of tasks `ids`, gathered into contiguous [len(ids), ...] arrays (one copy).
        For an images store, x_support / x_query are the tasks' images gathered by index
        (uint8 [T, n, C, H, W]; the model's device turns them into floats, see as_input)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"task ids out of range for {self.name} ({len(self)} tasks)")
        images = self.info.layout == "images"
        # an images store reads the rows' indices and gathers x_* from its image table
        want = [c for c in columns if not c.startswith("x_")] + ["image_ids"] if images else list(columns)
        b, o = np.divmod(ids, self.info.rows_per_batch)
        first = self._batches[0]
        out = {c: np.empty((ids.size, *first[c].shape[1:]), dtype=first[c].dtype) for c in want}
        for bi in np.unique(b):
            mask = b == bi
            for c in want:
                out[c][mask] = self._batches[bi][c][o[mask]]
        if images:
            out.update(self.gather_images(out.pop("image_ids")))
            out = {c: out[c] for c in columns}
        return out

    def gather_images(self, image_ids: np.ndarray) -> dict[str, np.ndarray]:
        """x_support and x_query (uint8 [T, n, C, H, W]) from rows of image indices."""
        assert self.images is not None
        if image_ids.size and (image_ids.min() < 0 or image_ids.max() >= len(self.images)):
            raise StoreError(f"{self.name} has image indices outside its image table (corrupt?); rebuild it")
        ns = self.info.n_support
        return {"x_support": self.images[image_ids[:, :ns]], "x_query": self.images[image_ids[:, ns:]]}


def _open_reader(source: Any, name: str) -> pa.ipc.RecordBatchFileReader:
    try:
        return pa.ipc.open_file(source)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        head = source.read_at(4, 0) if hasattr(source, "read_at") else b""
        if head == b"PAR1":
            raise StoreError(
                f"{name} is a Parquet file, not a task store; turn a table into tasks with "
                "`distributed-maml tasks build --from-table`"
            ) from None
        raise StoreError(f"{name} is not a readable Arrow IPC task store (truncated or corrupt?): {e}") from None


def _parse_info(schema: pa.Schema, name: str) -> StoreInfo:
    meta = schema.metadata or {}
    if meta.get(b"format") != FORMAT.encode():
        raise StoreError(f"{name} is an Arrow file but not a distributed-maml task store (no '{FORMAT}' metadata)")
    try:
        raw = json.loads(meta[b"info"])
        version = raw.get("format_version")
        if version != FORMAT_VERSIONS.get(raw.get("layout", "vectors")):
            raise StoreError(
                f"{name} has task-store format version {version}; this distributed-maml reads versions "
                f"{', '.join(map(str, sorted(FORMAT_VERSIONS.values())))}: rebuild it with `distributed-maml tasks build`"
            )
        info = StoreInfo(
            **{**raw, "classes": tuple(raw.get("classes", ())), "image_shape": tuple(raw.get("image_shape", ()))}
        )
    except StoreError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{name} has unreadable task-store metadata ({e}); rebuild it") from None
    bad_images = info.layout == "images" and (
        len(info.image_shape) != 3 or min(info.image_shape) < 1 or info.num_images < 1 or info.kind != "classification"
    )
    if (
        info.kind not in ("classification", "regression")
        or min(info.input_dim, info.output_dim, info.ways) < 1
        or bad_images
    ):
        raise StoreError(f"{name} has inconsistent task-store metadata; rebuild it")
    expected = info.schema()
    if not schema.remove_metadata().equals(expected.remove_metadata()):
        have = {f.name: str(f.type) for f in schema}
        diff = [
            f"{f.name} is {have.get(f.name, 'missing')}, expected {f.type}"
            for f in expected
            if have.get(f.name) != str(f.type)
        ]
        diff += [f"{n} is not a task-store column" for n in have if n not in expected.names]
        raise StoreError(f"{name} has a wrong schema for its metadata: {'; '.join(diff)}; rebuild it")
    return info


def _load_batches(reader: pa.ipc.RecordBatchFileReader, info: StoreInfo, name: str) -> list[dict[str, np.ndarray]]:
    """Per record batch, each column as a numpy view shaped [rows, *task shape]. Touches only
    the IPC metadata, not the data pages, so opening a large store costs almost no memory."""
    batches: list[dict[str, np.ndarray]] = []
    total = 0
    try:
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            cols = {}
            for c in info.columns:
                arr = batch.column(c)
                if arr.null_count or arr.offset:
                    raise StoreError(f"{name} has nulls or offsets in column {c}; rebuild it")
                values = arr.values.indices if c == "image_ids" else arr.values
                flat = values.to_numpy(zero_copy_only=True)
                cols[c] = flat.reshape((len(arr), *info.shape(c)))
            batches.append(cols)
            total += batch.num_rows
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, ValueError) as e:
        raise StoreError(f"{name} is corrupt: {e}; rebuild it") from None
    full = [len(b["params"]) for b in batches[:-1]]
    if total != info.num_tasks or any(n != info.rows_per_batch for n in full):
        raise StoreError(f"{name} holds {total} tasks but its metadata says {info.num_tasks} (truncated?); rebuild it")
    return batches


def _image_table(reader: pa.ipc.RecordBatchFileReader, info: StoreInfo, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The images layout's table: uint8 [N, C, H, W] and int32 classes, views into the mapping."""
    try:
        table = reader.get_batch(0).column("image_ids").values.dictionary
        pixels = table.field("image").values.to_numpy(zero_copy_only=True)
        labels = table.field("label").to_numpy(zero_copy_only=True)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, ValueError, IndexError, KeyError) as e:
        raise StoreError(f"{name} has an unreadable image table: {e}; rebuild it") from None
    if len(table) != info.num_images or pixels.size != info.num_images * int(np.prod(info.image_shape)):
        raise StoreError(f"{name} holds {len(table)} images but its metadata says {info.num_images}; rebuild it")
    return pixels.reshape((info.num_images, *info.image_shape)), labels


def describe(store: TaskStore, path: str | Path | None = None) -> dict[str, Any]:
    """A summary for `tasks info`: images, classes and tasks, shapes, size."""
    info = asdict(store.info)
    classes = info.pop("classes")
    out: dict[str, Any] = {"path": str(path or store.name), **info, "num_classes": len(classes)}
    out["classes"] = classes if len(classes) <= 20 else [*classes[:10], f"... {len(classes) - 10} more"]
    out["columns"] = {c: list(store.info.shape(c)) for c in store.info.columns}
    if path is not None:
        out["size_bytes"] = Path(path).stat().st_size
    return out
