"""Your own few-shot task from files, for `distributed-maml adapt`, and its predictions to a file.

- A table (CSV, Parquet, Arrow/Feather) with a label column: the support set. The query table
  has the same feature columns (a label column there is ignored). A run trained on a table
  takes the columns it was trained on, by name; any other run takes every numeric column but
  the label, in order.
- Image folders: the support set as one sub-folder per class (as `tasks build --from-images`),
  the queries as the image files of one folder. Images are decoded, converted and resized as the
  run's store was built (its image shape says the size and channels).

Predictions go to CSV or Parquet (by the file's suffix): a row per query (`query`: its row
number or file name), `prediction`, and for classification `p_<class>` per class.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from distributed_maml.data.families import folders
from distributed_maml.data.families.table import read_table
from distributed_maml.errors import InputError, StoreError
from distributed_maml.use.metamodel import MetaModel, Prediction

OUT_SUFFIXES = (".csv", ".parquet")


def read_support(meta: MetaModel, path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    """(examples, labels) of the support set at `path` (a table, or a folder of class folders)."""
    if path.is_dir():
        return _image_classes(meta, path)
    table = read_table(path)
    if label_column not in table.column_names:
        raise InputError(f"{path} has no label column {label_column!r} (--label-column); its columns: "
                         f"{', '.join(table.column_names)}")  # fmt: skip
    labels = table[label_column].to_numpy(zero_copy_only=False)
    return _features(meta, table, path, label_column), np.asarray(labels)


def read_queries(meta: MetaModel, path: Path, label_column: str) -> tuple[np.ndarray, list[str]]:
    """(examples, their names) of the queries at `path` (a table, or a folder of images)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in folders.SUFFIXES)
        if not files:
            raise InputError(f"{path} holds no images (suffixes: {', '.join(folders.SUFFIXES)})")
        return np.stack([_image(meta, f) for f in files]), [f.name for f in files]
    table = read_table(path)
    x = _features(meta, table, path, label_column)
    return x, [str(i) for i in range(len(x))]


def _features(meta: MetaModel, table: pa.Table, path: Path, label_column: str) -> np.ndarray:
    if meta.info.features:  # the run's own table columns, by name
        missing = [c for c in meta.info.features if c not in table.column_names]
        if missing:
            raise InputError(f"{path} lacks the feature column(s) the run trained on: {', '.join(missing)}")
        names = list(meta.info.features)
    else:
        names = [c for c in table.column_names if c != label_column]
    bad = [c for c in names if not (pa.types.is_integer(table[c].type) or pa.types.is_floating(table[c].type))]
    if bad:
        raise InputError(f"{path}: feature columns must be numeric; not numeric: {', '.join(bad)}")
    x = np.column_stack([table[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in names]) if names else None
    if x is None or x.shape[1] != int(np.prod(meta.example_shape)):
        raise InputError(
            f"{path}: {0 if x is None else x.shape[1]} feature column(s); this model takes {meta.example_shape[0]}"
        )
    return x


def _image(meta: MetaModel, path: Path) -> np.ndarray:
    shape = meta.example_shape
    if len(shape) != 3:
        raise InputError(f"this model takes vectors of {shape[0]} features, not images ({path})")
    a = folders.decode(path, shape[1], grayscale=shape[0] == 1)
    if a is None:
        raise InputError(f"{path} is not a readable image")
    return a


def _image_classes(meta: MetaModel, root: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        classes = folders.find_classes(root, 1)
    except StoreError as e:
        raise InputError(str(e).replace("--from-images", "--support")) from None
    x, y = [], []
    for name, files in classes:
        for f in files:
            x.append(_image(meta, f))
            y.append(name)
    return np.stack(x), np.asarray(y)


def write_predictions(path: Path, names: list[str], prediction: Prediction) -> None:
    """The predictions as CSV or Parquet, written aside and renamed into place."""
    suffix = path.suffix.lower()
    if suffix not in OUT_SUFFIXES:
        raise InputError(f"--out {path} must end in {' or '.join(OUT_SUFFIXES)}")
    columns: dict[str, Any] = {"query": names}
    labels = prediction.labels
    if prediction.probabilities is None:  # regression: a value per output
        outs = labels.reshape(len(names), -1)
        columns.update(
            {"prediction" if outs.shape[1] == 1 else f"prediction_{k}": outs[:, k] for k in range(outs.shape[1])}
        )
    else:
        columns["prediction"] = labels
        columns.update({f"p_{c}": prediction.probabilities[:, j] for j, c in enumerate(prediction.classes or ())})
    table = pa.table(columns)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            pcsv.write_csv(table, tmp)
        else:
            import pyarrow.parquet as pq

            pq.write_table(table, tmp)
        os.replace(tmp, path)
    except (OSError, pa.ArrowException) as e:  # pyarrow names its temporary file: name the one asked for
        reason = str(e).split("Detail: ")[-1]  # "[errno 2] No such file or directory"
        raise InputError(f"--out {path} cannot be written ({reason}); give a path in a folder you may write") from None
    finally:
        tmp.unlink(missing_ok=True)
