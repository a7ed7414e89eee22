"""The Arrow task store: one uncompressed Arrow IPC file, one row per task.

Columns are fixed-size lists (``x_support``, ``y_support``, ``x_query``, ``y_query``,
``params``); the shapes, family, generator seed and format version live in the schema
metadata. A store is opened memory-mapped: opening costs a few pages, and a task's rows are
numpy views into the mapping. Only task ids ever travel between processes; rows are read where
they are used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from .errors import StoreError
from .tasks import FAMILIES, Family

FORMAT = "distributed-maml-taskstore"
FORMAT_VERSION = 1
ROWS_PER_BATCH = 16384  # at most; fewer for large rows so a batch stays near BATCH_BYTES
BATCH_BYTES = 64 * 2**20
COLUMNS = ("x_support", "y_support", "x_query", "y_query", "params")
SPLITS = ("train", "test")
_SPLIT_STREAM = {"train": 0, "test": 1}  # disjoint RNG streams: held-out tasks never repeat training tasks


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
    """Table-built stores: the label values of this split's classes (params hold their indices)."""

    @property
    def n_support(self) -> int:
        return self.ways * self.shots

    @property
    def n_query(self) -> int:
        return self.ways * self.queries

    def shape(self, column: str) -> tuple[int, ...]:
        """The per-task shape of a column."""
        n = self.n_support if column.endswith("support") else self.n_query
        if column.startswith("x_"):
            return (n, self.input_dim)
        if column.startswith("y_"):
            return (n,) if self.kind == "classification" else (n, self.output_dim)
        return (self.num_params,)

    def dtype(self, column: str) -> pa.DataType:
        return pa.int64() if column.startswith("y_") and self.kind == "classification" else pa.float32()

    def schema(self) -> pa.Schema:
        fields = [pa.field(c, pa.list_(self.dtype(c), int(np.prod(self.shape(c)))), nullable=False) for c in COLUMNS]
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


def _record_batch(info: StoreInfo, arrays: dict[str, np.ndarray]) -> pa.RecordBatch:
    cols = []
    for c in COLUMNS:
        flat = np.ascontiguousarray(arrays[c]).reshape(-1)
        size = int(np.prod(info.shape(c)))
        cols.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, type=info.dtype(c)), size))
    return pa.RecordBatch.from_arrays(cols, schema=info.schema())


def generate_batches(info: StoreInfo, progress: bool = False, family: Family | None = None) -> Iterator[pa.RecordBatch]:
    """The store's record batches; batch i draws from its own seeded stream, so any slice of
    the store can be regenerated alone."""
    family = family or FAMILIES[info.family]
    n_batches = -(-info.num_tasks // info.rows_per_batch)
    quiet = None if progress and n_batches >= 4 else True  # None: a bar on terminals only
    for i in tqdm(range(n_batches), desc="building tasks", unit="batch", disable=quiet):
        count = min(info.rows_per_batch, info.num_tasks - i * info.rows_per_batch)
        rng = np.random.default_rng([info.seed, _SPLIT_STREAM[info.split], i])
        yield _record_batch(info, family.generate(rng, count, info.shots, info.queries))


def check_build_args(family: str | None, num_tasks: int, shots: int, queries: int, split: str, seed: int) -> None:
    """The arguments of a build; family None means tasks from a table (no generator family)."""
    if family is not None and family not in FAMILIES:
        raise StoreError(f"unknown task family {family!r}; families: {', '.join(FAMILIES)}")
    if num_tasks < 1:
        raise StoreError(f"--num-tasks must be >= 1, got {num_tasks}")
    if shots < 1 or queries < 1:
        raise StoreError(f"--shots and --queries must be >= 1, got {shots} and {queries}")
    if split not in SPLITS:
        raise StoreError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not 0 <= seed < 2**63:
        raise StoreError(f"--seed must be in [0, 2**63), got {seed}")


def write_batches(path: str | Path, schema: pa.Schema, batches: Iterator[pa.RecordBatch], overwrite: bool) -> Path:
    """Writes an IPC file atomically: a temporary file beside the target, then a rename."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"{path} already exists; pass --overwrite to replace it or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
        os.replace(tmp, path)
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
) -> StoreInfo:
    """Generates `num_tasks` tasks of a family into an Arrow IPC file at `path`."""
    check_build_args(family, num_tasks, shots, queries, split, seed)
    info = family_info(FAMILIES[family], num_tasks, seed, shots, queries, split)
    write_batches(path, info.schema(), generate_batches(info, progress), overwrite)
    return info


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

    check_build_args(None, num_tasks, shots, queries, split, seed)
    if not 0 < test_fraction < 1:
        raise StoreError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    tasks = table_mod.load(table, label_column, ways, shots, queries, split, test_fraction, seed)
    family = Family("table", "classification", tasks.features.shape[1], ways, ways, tasks.generate)
    info = family_info(
        family, num_tasks, seed, shots, queries, split, source=str(Path(table).resolve()), classes=tasks.class_names
    )
    write_batches(out, info.schema(), generate_batches(info, progress=True, family=family), overwrite)
    return info


def build_in_memory(family: str, num_tasks: int, seed: int, shots: int, queries: int, split: str = "test") -> TaskStore:
    """The same tasks `build` would write, held in memory (used for held-out evaluation)."""
    check_build_args(family, num_tasks, shots, queries, split, seed)
    info = family_info(FAMILIES[family], num_tasks, seed, shots, queries, split)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, info.schema()) as writer:
        for batch in generate_batches(info):
            writer.write_batch(batch)
    return TaskStore.from_buffer(sink.getvalue(), name=f"<held-out {family} tasks>")


class TaskStore:
    """A validated, memory-mapped (or in-memory) task store. Rows are read by task id."""

    def __init__(self, reader: pa.ipc.RecordBatchFileReader, name: str, source: Any) -> None:
        self.name = name
        self._source = source  # keeps the mapping (or buffer) alive as long as the views are
        self.info = _parse_info(reader.schema, name)
        self._batches = _load_batches(reader, self.info, name)

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

    def column_chunks(self, column: str) -> list[np.ndarray]:
        """A column as its per-record-batch views [rows, *task shape], in task-id order."""
        return [b[column] for b in self._batches]

    def rows(self, ids: np.ndarray, columns: tuple[str, ...] = COLUMNS[:4]) -> dict[str, np.ndarray]:
        """The arrays of tasks `ids`, gathered into contiguous [len(ids), ...] arrays (one copy)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"task ids out of range for {self.name} ({len(self)} tasks)")
        b, o = np.divmod(ids, self.info.rows_per_batch)
        first = self._batches[0]
        out = {c: np.empty((ids.size, *first[c].shape[1:]), dtype=first[c].dtype) for c in columns}
        for bi in np.unique(b):
            mask = b == bi
            for c in columns:
                out[c][mask] = self._batches[bi][c][o[mask]]
        return out


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
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{name} has task-store format version {version}; this distributed-maml reads version "
                f"{FORMAT_VERSION}: rebuild it with `distributed-maml tasks build`"
            )
        info = StoreInfo(**{**raw, "classes": tuple(raw.get("classes", ()))})
    except StoreError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{name} has unreadable task-store metadata ({e}); rebuild it") from None
    if info.kind not in ("classification", "regression") or min(info.input_dim, info.output_dim, info.ways) < 1:
        raise StoreError(f"{name} has inconsistent task-store metadata ({info}); rebuild it")
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
            for c in COLUMNS:
                arr = batch.column(c)
                if arr.null_count or arr.offset:
                    raise StoreError(f"{name} has nulls or offsets in column {c}; rebuild it")
                flat = arr.values.to_numpy(zero_copy_only=True)
                cols[c] = flat.reshape((len(arr), *info.shape(c)))
            batches.append(cols)
            total += batch.num_rows
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, ValueError) as e:
        raise StoreError(f"{name} is corrupt: {e}; rebuild it") from None
    full = [len(b["params"]) for b in batches[:-1]]
    if total != info.num_tasks or any(n != info.rows_per_batch for n in full):
        raise StoreError(f"{name} holds {total} tasks but its metadata says {info.num_tasks} (truncated?); rebuild it")
    return batches


def describe(store: TaskStore, path: str | Path | None = None) -> dict[str, Any]:
    """A summary for `tasks info`."""
    out: dict[str, Any] = {"path": str(path or store.name), **asdict(store.info)}
    out["columns"] = {c: list(store.info.shape(c)) for c in COLUMNS}
    if path is not None:
        out["size_bytes"] = Path(path).stat().st_size
    return out
