"""The allowed values of the configuration's closed options (Literal types, their tuples named
in the one-line errors), the built-in names of the open ones, and the check every section uses."""

from __future__ import annotations

import re
import typing
from typing import Literal

from distributed_maml.errors import ConfigError

# Open sets (user code may name its own with package.module:attribute) stay strings; the closed
# ones are Literal types, their values named in the one-line errors.
FAMILIES = ("seed", "sinusoid", "glyphs", "table", "images")
MODELS = ("seed_mlp", "sinusoid_mlp", "mlp", "conv4", "resnet12")
Placement = Literal["pack", "spread"]
PLACEMENTS: tuple[str, ...] = typing.get_args(Placement)
TaskMap = Literal["auto", "vmap", "loop"]
TASK_MAPS: tuple[str, ...] = typing.get_args(TaskMap)
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_import_path(name: str) -> bool:
    """`package.module:attribute`: user code, imported where it is used."""
    return bool(_IMPORT_PATH.match(name))


NonfinitePolicy = Literal["stop", "skip"]
NONFINITE_POLICIES: tuple[str, ...] = typing.get_args(NonfinitePolicy)
StoreSharing = Literal["auto", "path", "object_store"]
STORE_SHARING: tuple[str, ...] = typing.get_args(StoreSharing)
Mode = Literal["driver", "collective"]
MODES: tuple[str, ...] = typing.get_args(Mode)
Algorithm = Literal["maml", "fomaml", "meta-sgd", "anil", "reptile", "imaml"]
ALGORITHMS: tuple[str, ...] = typing.get_args(Algorithm)
InnerSolver = Literal["sgd", "backtracking"]
INNER_SOLVERS: tuple[str, ...] = typing.get_args(InnerSolver)
HeadKind = Literal["fixed", "unicorn", "proto"]
HEAD_KINDS: tuple[str, ...] = typing.get_args(HeadKind)
LearnInnerLr = Literal["none", "per-layer-per-step"]
LEARN_INNER_LR: tuple[str, ...] = typing.get_args(LearnInnerLr)
SelectBy = Literal["auto", "val_acc", "val_loss"]
SELECT_BY: tuple[str, ...] = typing.get_args(SelectBy)
GpuStep = Literal["graph", "eager"]
GPU_STEPS: tuple[str, ...] = typing.get_args(GpuStep)
Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = typing.get_args(Device)
Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
