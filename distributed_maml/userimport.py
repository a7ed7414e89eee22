"""User code by import path (`package.module:name`): resolved on the driver and in every worker.

Errors are one line (ConfigError) naming the path and what to do. `search_path` finds the folder
a user's top-level package was imported from, so that a Ray worker started on this machine can
import it too (under `ray job submit` the working directory is on every worker's path already;
for code elsewhere, list it in the runtime_env's `py_modules`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from distributed_maml.errors import ConfigError


def load(path: str, what: str) -> Any:
    """The object named by `module:attribute`; `what` names the config key for messages."""
    module_name, _, attr = path.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        # the console script, unlike `python -m`, does not put the working folder on the path;
        # user code "next to where you run" must import either way (last, so it shadows nothing)
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ConfigError(
                f"{what} = {path!r}: module {e.name!r} not found; run from the folder that holds it, add it to "
                "PYTHONPATH, or (Ray) ship it with the runtime_env's working_dir or py_modules"
            ) from None
        raise ConfigError(f"{what} = {path!r}: importing {module_name} failed: {e}") from None
    except Exception as e:  # the user's module raised while importing: show it, in one line
        raise ConfigError(f"{what} = {path!r}: importing {module_name} raised {type(e).__name__}: {e}") from None
    if not hasattr(module, attr):
        raise ConfigError(f"{what} = {path!r}: module {module_name} has no attribute {attr!r}")
    return getattr(module, attr)


def search_path(path: str) -> str | None:
    """The sys.path entry the top-level package of `path` is imported from here (None for
    installed packages and built-ins)."""
    top = path.partition(":")[0].split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return None
    where = Path(spec.origin).parent
    if spec.submodule_search_locations:  # a package: its parent folder is the sys.path entry
        where = where.parent
    return str(where.resolve())


def ensure_on_path(folder: str | None) -> None:
    """Puts a folder on sys.path (in a worker process) if it exists here and is not there yet."""
    if folder and Path(folder).is_dir() and folder not in sys.path:
        sys.path.insert(0, folder)
