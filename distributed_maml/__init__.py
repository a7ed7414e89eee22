"""Model-Agnostic Meta-Learning (Finn et al. 2017) as a distributed meta-training system on Ray.

The public surface is `distributed_maml.api` (train, open_run, MetaModel, export, load, ...),
whose names are importable from here. They load on first use: `import distributed_maml` (and
`distributed-maml --help`) stays free of torch, and a Ray worker importing one of the package's
modules does not load the application layer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # for type checkers and IDEs: the names below, as they are
    from distributed_maml.api import *  # noqa: F403

_PUBLIC = (
    "Adapted",
    "CheckpointRef",
    "MetaModel",
    "Prediction",
    "RunResult",
    "ServeSettings",
    "export",
    "load",
    "load_any",
    "open_run",
    "train",
)
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:  # PEP 562: the public names, imported when first asked for
    if name in _PUBLIC:
        return getattr(importlib.import_module("distributed_maml.api"), name)
    raise AttributeError(f"module 'distributed_maml' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
