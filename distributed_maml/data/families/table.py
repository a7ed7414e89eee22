"""N-way K-shot classification tasks drawn from any table of numeric features and a label.

The table's classes are split once, by a seeded permutation, into meta-train and meta-test
classes (disjoint); a store holds the tasks of one split. Each task picks `ways` classes of its
split, assigns them the labels 0..ways-1 in random order, and draws `shots` support and
`queries` query examples per class without replacement. Features are standardised with the
whole table's per-column mean and standard deviation (an unsupervised statistic, the same for
both splits). The model's input size is the number of feature columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from distributed_maml.data.families.images import split_classes
from distributed_maml.errors import StoreError

SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc", ".csv")


def read_table(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"table {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix in (".arrow", ".feather", ".ipc"):
            import pyarrow.feather as feather

            return feather.read_table(path)
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise StoreError(f"table {path} cannot be read: {e}") from None
    raise StoreError(f"table {path} must be one of {', '.join(SUFFIXES)}, got {suffix or 'no suffix'}")


@dataclass(frozen=True)
class TableTasks:
    """The examples of one split's classes, ready to draw tasks from."""

    features: np.ndarray  # [examples, D] float32, standardised
    class_index: list[np.ndarray]  # per class of this split: row indices into features
    class_ids: np.ndarray  # per class of this split: its index among the table's sorted labels
    class_names: tuple[str, ...]
    ways: int
    feature_names: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()  # the standardisation applied to `features`
    std: tuple[float, ...] = ()

    def generate(self, rng: np.random.Generator, count: int, shots: int, queries: int) -> dict[str, np.ndarray]:
        n = shots + queries
        xs = np.empty((count, self.ways, n, self.features.shape[1]), dtype=np.float32)
        params = np.empty((count, self.ways), dtype=np.float32)
        for t in range(count):
            chosen = rng.choice(len(self.class_index), self.ways, replace=False)  # label i = chosen[i]
            for label, c in enumerate(chosen):
                xs[t, label] = self.features[rng.choice(self.class_index[c], n, replace=False)]
            params[t] = self.class_ids[chosen]
        labels = np.arange(self.ways, dtype=np.int64)
        return {
            "x_support": xs[:, :, :shots].reshape(count, -1, xs.shape[-1]),
            "y_support": np.broadcast_to(np.repeat(labels, shots), (count, self.ways * shots)).copy(),
            "x_query": xs[:, :, shots:].reshape(count, -1, xs.shape[-1]),
            "y_query": np.broadcast_to(np.repeat(labels, queries), (count, self.ways * queries)).copy(),
            "params": params,
        }


def load(
    path: str | Path,
    label_column: str,
    ways: int,
    shots: int,
    queries: int,
    split: str,
    test_fraction: float,
    seed: int,
    val_fraction: float = 0.0,
) -> TableTasks:
    table = read_table(path)
    if label_column not in table.column_names:
        raise StoreError(f"table {path} has no column {label_column!r}; its columns: {', '.join(table.column_names)}")
    feature_cols = [c for c in table.column_names if c != label_column]
    bad = [c for c in feature_cols if not (pa.types.is_integer(table[c].type) or pa.types.is_floating(table[c].type))]
    if bad or not feature_cols:
        raise StoreError(
            f"table {path}: feature columns must be numeric; not numeric: {', '.join(bad) or '(none left)'}"
        )
    if ways < 2:
        raise StoreError(f"--ways must be >= 2, got {ways}")
    x = np.column_stack([table[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in feature_cols])
    if not np.isfinite(x).all():
        raise StoreError(f"table {path} has missing or non-finite feature values")
    names, labels = np.unique(
        np.asarray(table[label_column].to_numpy(zero_copy_only=False)).astype(str), return_inverse=True
    )
    mean, std = x.mean(0), np.where(x.std(0) > 0, x.std(0), 1.0)
    x = ((x - mean) / std).astype(np.float32)
    classes = split_classes(len(names), ways, test_fraction, seed, "the table", val_fraction)[split]
    index = [np.flatnonzero(labels == c) for c in classes]
    short = [names[c] for c, i in zip(classes, index) if len(i) < shots + queries]
    if short:
        raise StoreError(
            f"class(es) {', '.join(short)} of table {path} have fewer than shots + queries = "
            f"{shots + queries} examples; lower --shots or --queries"
        )
    return TableTasks(
        x,
        index,
        classes.astype(np.int64),
        tuple(str(names[c]) for c in classes),
        ways,
        tuple(feature_cols),
        tuple(float(v) for v in mean),
        tuple(float(v) for v in std),
    )
