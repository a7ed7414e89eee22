"""Task families: deterministic generators of few-shot tasks.

Two kinds:

- a vector `Family` turns (rng, count, shots, queries) into a dict of arrays with a leading task
  axis: ``x_support [T, S, D]``, ``y_support [T, S]`` (int64 labels) or ``[T, S, O]`` (float32
  targets), the same for the query set, and ``params [T, P]``: the numbers that define each task
  (for plots and checks, never shown to the model). Built-ins: seed, sinusoid; yours by
  `task.family = "package.module:Name"` (see `user_family`).
- an `ImageFamily` gives one split's `ImageTable` (images stored once); tasks are indices into it
  (tasks/images.py). Built-in: glyphs; image folders go through `tasks build --from-images`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from distributed_maml import userimport
from distributed_maml.config import is_import_path
from distributed_maml.data.families import glyphs as _glyphs
from distributed_maml.data.families import seed as _seed
from distributed_maml.data.families import sinusoid as _sinusoid
from distributed_maml.data.families.images import ImageTable
from distributed_maml.errors import ConfigError, StoreError

Arrays = dict[str, np.ndarray]
KINDS = ("classification", "regression")


@dataclass(frozen=True)
class Family:
    """What a store needs to know about a vector family: shapes, kind and its generator."""

    name: str
    kind: str  # "classification" or "regression"
    input_dim: int
    output_dim: int  # classes for classification, targets for regression
    ways: int  # classes per task (1 for regression: points are not grouped by class)
    generate: Callable[[np.random.Generator, int, int, int], Arrays]


@dataclass(frozen=True)
class ImageFamily:
    """An image family: its default ways and one split's image table."""

    name: str
    ways: int
    table: Callable[[str], ImageTable]
    kind: str = "classification"


FAMILIES: dict[str, Family | ImageFamily] = {
    "seed": Family("seed", "classification", _seed.INPUT_DIM, _seed.WAYS, _seed.WAYS, _seed.generate),
    "sinusoid": Family("sinusoid", "regression", 1, 1, 1, _sinusoid.generate),
    "glyphs": ImageFamily("glyphs", 5, _glyphs.table),
}
FROM_FILES = {"table": "--from-table", "images": "--from-images"}  # families that only come from a build


def resolve(name: str) -> Family | ImageFamily:
    """A family by name: built-in, or user code by import path (checked with one probe)."""
    if name in FAMILIES:
        return FAMILIES[name]
    if name in FROM_FILES:
        raise StoreError(
            f"task.family = {name!r} trains on a store built with `distributed-maml tasks build "
            f"{FROM_FILES[name]}`: pass it with --tasks"
        )
    if not is_import_path(name):
        raise StoreError(f"unknown task family {name!r}; families: {', '.join(FAMILIES)} or package.module:Family")
    return user_family(name)


def user_family(path: str) -> Family:
    """Your own vector family: a class (instantiated without arguments) or an object with
    `kind` ("classification" or "regression"), `input_dim`, `output_dim`, `ways` (1 for
    regression) and `generate(rng, count, shots, queries) -> dict` as described above."""
    obj = userimport.load(path, "task.family")
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as e:
            raise ConfigError(f"task.family = {path!r}: {obj.__name__}() raised {type(e).__name__}: {e}") from None
    missing = [a for a in ("kind", "input_dim", "output_dim", "ways", "generate") if not hasattr(obj, a)]
    if missing:
        raise ConfigError(
            f"task.family = {path!r} lacks {', '.join(missing)}; a family has kind, input_dim, output_dim, ways "
            "and generate(rng, count, shots, queries)"
        )
    if obj.kind not in KINDS or not callable(obj.generate):
        raise ConfigError(f"task.family = {path!r}: kind must be one of {', '.join(KINDS)} and generate callable")
    dims = (obj.input_dim, obj.output_dim, obj.ways)
    if not all(isinstance(d, int) and d >= 1 for d in dims):
        raise ConfigError(f"task.family = {path!r}: input_dim, output_dim and ways must be integers >= 1, got {dims}")
    family = Family(path, obj.kind, obj.input_dim, obj.output_dim, obj.ways, obj.generate)
    check_generated(family, family.generate(np.random.default_rng(0), 2, 1, 1), 2, 1, 1)
    return family


def check_generated(family: Family, arrays: Arrays, count: int, shots: int, queries: int) -> None:
    """A generator's output has the columns, shapes and dtypes its family declares."""
    ns, nq = family.ways * shots, family.ways * queries
    cls = family.kind == "classification"
    want = {
        "x_support": ((count, ns, family.input_dim), np.floating),
        "x_query": ((count, nq, family.input_dim), np.floating),
        "y_support": ((count, ns) if cls else (count, ns, family.output_dim), np.integer if cls else np.floating),
        "y_query": ((count, nq) if cls else (count, nq, family.output_dim), np.integer if cls else np.floating),
    }
    for key, (shape, kind) in want.items():
        a = arrays.get(key) if isinstance(arrays, dict) else None
        if not isinstance(a, np.ndarray) or a.shape != shape or not np.issubdtype(a.dtype, kind):
            got = "missing" if a is None else f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}"
            raise ConfigError(
                f"task family {family.name}: generate(rng, {count}, shots={shots}, queries={queries})[{key!r}] "
                f"must be a {kind.__name__} array of shape {shape}, got {got}"
            )
    p = arrays.get("params")
    if not isinstance(p, np.ndarray) or p.ndim != 2 or len(p) != count:
        raise ConfigError(f"task family {family.name}: generate()['params'] must be an array [count, P] (P >= 0)")
