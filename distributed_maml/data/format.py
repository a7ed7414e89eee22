"""The Arrow task store: one uncompressed Arrow IPC file, one row per task.

Two layouts, named in the schema metadata with the shapes, family, seed and format version:

- "vectors" (format 1): fixed-size-list columns ``x_support``, ``y_support``, ``x_query``,
  ``y_query``, ``params``: every task carries its own examples.
- "stream" (format 3): no task rows: a task is drawn on the fly from (the store's seed, its id)
  by data/episodes.py. The file holds the examples once (``example``: uint8 images or float32
  rows, ``label``: int32 classes, grouped) or, for a generated family, nothing but its metadata;
  ``episodes`` in the metadata bounds the ways, shots and queries of its episodes.
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
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from distributed_maml.data.episodes import TASK_IDS, EpisodeSpec, Examples
from distributed_maml.data.families import Family
from distributed_maml.data.families.images import ImageTable
from distributed_maml.errors import StoreError

ROWS_PER_BATCH = 16384  # at most; fewer for large rows so a batch stays near BATCH_BYTES
BATCH_BYTES = 64 * 2**20
FORMAT = "distributed-maml-taskstore"
FORMAT_VERSION = 1  # the vectors layout
FORMAT_VERSIONS = {"vectors": 1, "images": 2, "stream": 3}
STREAM_COLUMNS = ("example", "label")
COLUMNS = ("x_support", "y_support", "x_query", "y_query", "params")
IMAGE_COLUMNS = ("image_ids", "y_support", "y_query", "params")
SPLITS = ("train", "val", "test")
BUILD_SPLITS = ("train", "val", "test", "all")  # "all": every class of an image folder (it ships its own split)


# StoreInfo's tuple fields added after format 1: empty ones stay out of the fingerprint
LATER_FIELDS = ("features", "feature_mean", "feature_std", "episodes", "sources", "source_weights", "source_classes")


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
    features: tuple[str, ...] = ()
    """Table-built stores: the feature columns, in the model's input order."""
    feature_mean: tuple[float, ...] = ()
    """Table-built stores: each feature's mean over the table, subtracted before the model sees it."""
    feature_std: tuple[float, ...] = ()
    """Table-built stores: each feature's standard deviation (1 where constant), divided by after
    the mean: a user's own rows (`adapt`, `serve`) are standardised the same way."""
    episodes: tuple[int, ...] = ()
    """Stream layout: the episodes' bounds (EpisodeSpec.to_tuple: ways, shots, queries as lo, hi,
    then max_support, and an eighth, 1, for the Meta-Dataset sampler); `ways`, `shots` and `queries`
    above are then the largest."""
    sources: tuple[str, ...] = ()
    """Stream layout from several stores (`tasks build --sources`, task.sources): their names; each
    episode picks one by `source_weights`, its classes then among that source's only."""
    source_weights: tuple[float, ...] = ()
    source_classes: tuple[int, ...] = ()
    """Classes per source: source i's are the next source_classes[i] labels of the examples."""

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StoreInfo:
        """The info from its JSON form (a store's metadata, an export's card): lists back to tuples."""
        tuples = ("classes", "image_shape", *LATER_FIELDS)
        return cls(**{**raw, **{k: tuple(raw.get(k, ())) for k in tuples}})

    @property
    def example_shape(self) -> tuple[int, ...]:
        """One model input's shape: (C, H, W) for images, (input_dim,) for vectors."""
        return self.image_shape if self.image_shape else (self.input_dim,)

    @property
    def columns(self) -> tuple[str, ...]:
        if self.layout == "stream":
            return STREAM_COLUMNS if self.num_images else ()
        return IMAGE_COLUMNS if self.layout == "images" else COLUMNS

    @property
    def on_the_fly(self) -> bool:
        """Tasks drawn from (seed, id) (data/episodes.py), not stored."""
        return self.layout == "stream"

    @property
    def spec(self) -> EpisodeSpec:
        """The shapes of this store's episodes (fixed for a materialized store)."""
        if self.episodes:
            return EpisodeSpec.from_tuple(self.episodes)
        return EpisodeSpec.fixed_shape(self.ways, self.shots, self.queries)

    @property
    def n_support(self) -> int:
        """Support examples per task (variable episodes: the most)."""
        return self.spec.support_max if self.episodes else self.ways * self.shots

    @property
    def n_query(self) -> int:
        return self.spec.query_max if self.episodes else self.ways * self.queries

    def shape(self, column: str) -> tuple[int, ...]:
        """The per-task shape of a column (x_*: as gathered for the model)."""
        if column == "image_ids":
            return (self.n_support + self.n_query,)
        if column == "example":
            return self.example_shape
        if column == "label":
            return ()
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
        if column == "example":
            return pa.uint8() if self.image_shape else pa.float32()
        if column == "label":
            return pa.int32()
        return pa.int64() if column.startswith("y_") and self.kind == "classification" else pa.float32()

    @property
    def fingerprint(self) -> str:
        """A short digest of everything the metadata says (a replaced store shows here)."""
        meta = asdict(self)
        for key in LATER_FIELDS:  # added later: a store without them keeps its digest
            if not meta[key]:
                del meta[key]
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def row_nbytes(self) -> int:
        """One task row's bytes (fixed-size columns: exact up to Arrow's buffer padding)."""
        itemsize = {"image_ids": 4} | {c: self.dtype(c).bit_width // 8 for c in self.columns if c != "image_ids"}
        return sum(int(np.prod(self.shape(c))) * itemsize[c] for c in self.columns)

    @property
    def nbytes(self) -> int:
        """What the file will take: every row, plus the image table once (a stream store: its
        examples only)."""
        if self.layout == "stream":
            return self.num_images * (int(np.prod(self.example_shape)) * (1 if self.image_shape else 4) + 4)
        images = self.num_images * (int(np.prod(self.image_shape)) + 4) if self.layout == "images" else 0
        return self.row_nbytes * self.num_tasks + images

    def schema(self) -> pa.Schema:
        if self.layout == "stream":
            fields = [pa.field("label", pa.int32(), nullable=False)] if self.num_images else []
            if self.num_images:
                size = int(np.prod(self.example_shape))
                fields.insert(0, pa.field("example", pa.list_(self.dtype("example"), size), nullable=False))
            return pa.schema(fields, metadata={"format": FORMAT, "info": json.dumps(asdict(self))})
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
        info = StoreInfo.from_json(raw)
    except StoreError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{name} has unreadable task-store metadata ({e}); rebuild it") from None
    bad_images = info.layout == "images" and (
        len(info.image_shape) != 3 or min(info.image_shape) < 1 or info.num_images < 1 or info.kind != "classification"
    )
    if info.layout == "stream":
        try:
            n = len(info.sources)
            bad_sources = n > 0 and (
                len(info.source_weights) != n or len(info.source_classes) != n or not info.num_images
            )
            bad_images = (
                tuple(info.episodes[7:]) not in ((), (1,))
                or len(info.episodes) < 7
                or info.num_tasks < 1
                or bad_sources
            )
            info.spec.check(info.kind == "regression", "the store's")
        except StoreError:
            bad_images = True
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
