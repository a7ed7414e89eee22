"""Reading a task store: `TaskStore` opens one memory-mapped Arrow file (its format is in
data/format.py) and hands out rows as numpy views; `describe` is `tasks info`.

Opening costs a few pages; rows (and images) are read, and images gathered, where they are
used: only task ids ever travel between processes.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from distributed_maml.data.episodes import SPLIT_NUMBERS, Drawer, Examples
from distributed_maml.data.format import COLUMNS, StoreInfo, _parse_info
from distributed_maml.errors import StoreError


class TaskStore:
    """A validated, memory-mapped (or in-memory) task store. Rows are read by task id."""

    def __init__(self, reader: pa.ipc.RecordBatchFileReader, name: str, source: Any) -> None:
        self.name = name
        self._source = source  # keeps the mapping (or buffer) alive as long as the views are
        self.info = _parse_info(reader.schema, name)
        self.drawer: Drawer | None = None  # an on-the-fly store's: tasks drawn from (seed, id)
        if self.info.on_the_fly:
            self._batches: list[dict[str, np.ndarray]] = []
            self.images = self.image_labels = None
            self.drawer = _drawer(reader, self.info, name)
            return
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
        """One task's arrays: views into the store, no copy (on the fly: drawn)."""
        if not 0 <= task_id < len(self):
            raise IndexError(f"task id {task_id} out of range for {self.name} ({len(self)} tasks)")
        if self.drawer is not None:
            return {k: v[0] for k, v in self.rows(np.array([task_id]), COLUMNS).items()}
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
        if self.drawer is not None:  # drawn, not read: padded when the episodes vary
            drawn = self.drawer.rows(ids)
            return {c: drawn[c] for c in columns}
        images = self.info.layout == "images"
        # an images store reads the rows' indices and gathers x_* from its image table
        want = [c for c in columns if not c.startswith("x_")] + ["image_ids"] if images else list(columns)
        if len(self._batches) == 1:  # one record batch (most stores): one gather per column
            out = {c: self._batches[0][c][ids] for c in want}
        else:
            out = self._gather_across_batches(ids, want)
        if images:
            out.update(self.gather_images(out.pop("image_ids")))
            out = {c: out[c] for c in columns}
        return out

    def _gather_across_batches(self, ids: np.ndarray, columns: list[str]) -> dict[str, np.ndarray]:
        b, o = np.divmod(ids, self.info.rows_per_batch)
        first = self._batches[0]
        out = {c: np.empty((ids.size, *first[c].shape[1:]), dtype=first[c].dtype) for c in columns}
        for bi in np.unique(b):
            mask = b == bi
            for c in columns:
                out[c][mask] = self._batches[bi][c][o[mask]]
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


def _drawer(reader: pa.ipc.RecordBatchFileReader, info: StoreInfo, name: str) -> Drawer:
    """An on-the-fly store's drawer: over its examples (views into the mapping), or over its
    generated family's `generate` (resolved by name: the store holds nothing else)."""
    from distributed_maml.data.families import Family, resolve  # the families import this layer's base

    spec, split = info.spec, SPLIT_NUMBERS[info.split]
    if not info.num_images:
        family = resolve(info.family)
        if not isinstance(family, Family):
            raise StoreError(f"{name} names family {info.family}, which needs its examples in the store; rebuild it")
        return Drawer(info.seed, spec, info.kind, generate=family.generate, family_ways=family.ways, split=split)
    try:
        if reader.num_record_batches != 1:
            raise ValueError(f"{reader.num_record_batches} record batches, expected 1")
        batch = reader.get_batch(0)
        x = batch.column("example").values.to_numpy(zero_copy_only=True)
        labels = batch.column("label").to_numpy(zero_copy_only=True)
        x = x.reshape((info.num_images, *info.example_shape))
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, ValueError, KeyError) as e:
        raise StoreError(f"{name} has unreadable examples: {e}; rebuild it") from None
    if len(labels) != info.num_images or (len(labels) and (labels.min() < 0 or (np.diff(labels) < 0).any())):
        raise StoreError(f"{name} has examples out of order or a wrong count (corrupt?); rebuild it")
    sources = tuple(zip(info.source_weights, info.source_classes, strict=True))
    if sources and sum(info.source_classes) != int(labels[-1]) + 1:
        raise StoreError(
            f"{name} has {int(labels[-1]) + 1} classes but its sources say {sum(info.source_classes)}; rebuild it"
        )
    return Drawer(info.seed, spec, info.kind, examples=Examples(x, labels), split=split, sources=sources)


def describe(store: TaskStore, path: str | Path | None = None) -> dict[str, Any]:
    """A summary for `tasks info`: images, classes and tasks, shapes, size."""
    info = asdict(store.info)
    classes = info.pop("classes")
    out: dict[str, Any] = {"path": str(path or store.name), **info, "num_classes": len(classes)}
    if store.info.on_the_fly:
        out["tasks"] = f"drawn on the fly from (seed, id), ids 0..{store.info.num_tasks - 1}"
        out["episodes"] = store.info.spec.describe()
        out["num_examples"] = out.pop("num_images")
    out["classes"] = classes if len(classes) <= 20 else [*classes[:10], f"... {len(classes) - 10} more"]
    out["columns"] = {c: list(store.info.shape(c)) for c in store.info.columns}
    if path is not None:
        out["size_bytes"] = Path(path).stat().st_size
    return out
