"""Checkpoints: atomic save, safe load, resume.

Layout of a run folder:

    DIR/config.toml                 the run's config
    DIR/metrics.jsonl               one JSON line per logged step
    DIR/checkpoints/step_<n>/       model.pt (state_dict), optimizer.pt (Adam), state.json,
                                    inner_lr.pt (learned inner step sizes, when the algorithm has them)
    DIR/checkpoints/latest          the name of the newest complete checkpoint folder

A checkpoint is written into a temporary folder, flushed, renamed into place, and only then is
`latest` replaced (itself through a rename). A crash at any point leaves `latest` naming a
complete checkpoint. Everything is loaded with `weights_only=True`: a crafted pickle cannot run
code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from distributed_maml import config as config_mod
from distributed_maml.config import Config
from distributed_maml.data.sampler import Sampler
from distributed_maml.errors import CheckpointError, with_filename

FORMAT_VERSION = 1


@dataclass(frozen=True)
class StoreRef:
    """The task store a run trains on, as it was when the run began: a resume refuses a store
    whose file was replaced by a different one (other tasks, other size)."""

    path: str
    family: str
    seed: int
    ways: int
    num_tasks: int
    size_bytes: int | None = None  # None: written by an older version, not checked
    fingerprint: str | None = None  # sha-256 of the store's metadata (shapes, seed, classes, ...)


@dataclass(frozen=True)
class RunState:
    """Everything beside the tensors that a checkpoint holds: the one place it is written and
    read (resume, evaluation and plots take it from here)."""

    config: Config
    sampler: Sampler
    store: StoreRef

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "sampler": self.sampler.state(), "store": asdict(self.store)}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path) -> RunState:
        try:
            store = {k: v for k, v in data["store"].items() if k in StoreRef.__dataclass_fields__}
            store.setdefault("ways", 0)
            store.setdefault("num_tasks", data["sampler"]["num_tasks"])
            return cls(config_mod.from_dict(data["config"]), Sampler(**data["sampler"]), StoreRef(**store))
        except (KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {where} has an unreadable state.json ({e!r}); resume from another"
            ) from None


@dataclass
class Checkpoint:
    step: int
    version: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: RunState
    path: Path
    inner_lr: dict[str, torch.Tensor] = field(default_factory=dict)  # learned inner step sizes, if any


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise with_filename(e, path) from None


def _torch_bytes(obj: Any) -> bytes:
    """Serialised in memory first: torch's zip writer turns a failed write (a full disk) into a
    RuntimeError about stream positions; a plain file write raises the OSError it is."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save(
    run_dir: Path,
    step: int,
    version: int,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    state: RunState,
    keep: int = 0,
    inner_lr: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes checkpoints/step_<step>/ atomically, points `latest` at it, then (keep > 0)
    deletes all but the `keep` newest complete checkpoints. Learned inner step sizes (Meta-SGD,
    MAML++'s LSLR) go to inner_lr.pt beside model.pt, which stays the network's state_dict."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step}.", dir=root))
    try:
        _write_file(tmp / "model.pt", _torch_bytes(model))
        _write_file(tmp / "optimizer.pt", _torch_bytes(optimizer))
        if inner_lr:
            _write_file(tmp / "inner_lr.pt", _torch_bytes(inner_lr))
        meta = {**state.to_json(), "step": step, "version": version, "format_version": FORMAT_VERSION}
        _write_file(tmp / "state.json", json.dumps(meta, indent=1).encode())
        if final.exists():  # a re-save of the same step (resumed run): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pointer = root / f".latest.{os.getpid()}"
    try:
        _write_file(pointer, final.name.encode())
        os.replace(pointer, root / "latest")
    finally:
        pointer.unlink(missing_ok=True)
    _fsync_dir(root)
    if keep:
        prune(root, keep, final.name)
    return final


def prune(root: Path, keep: int, latest_name: str) -> None:
    """Deletes the older checkpoint folders beyond the `keep` newest; never `latest_name`, and
    only after `latest` names a complete newer one (the caller's order)."""
    steps = sorted((int(p.name[5:]), p) for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name))
    for _, path in steps[:-keep]:
        if path.name != latest_name:
            shutil.rmtree(path, ignore_errors=True)


def latest(run_dir: Path) -> Path:
    """The newest complete checkpoint folder of a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a run folder" if run_dir.exists() else "does not exist"
        raise CheckpointError(f"run folder {run_dir} {what}")
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        if not (run_dir / "config.toml").is_file():
            raise CheckpointError(f"{run_dir} is not a distributed-maml run folder (no config.toml)")
        raise CheckpointError(f"run {run_dir} has no checkpoint yet (no checkpoints/latest); train it first")
    name = pointer.read_text().strip()
    path = pointer.parent / name
    if not name.startswith("step_") or not path.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint folder")
    return path


def load(path: Path) -> Checkpoint:
    """Loads a checkpoint folder; only tensors and plain containers are unpickled."""
    try:
        state = json.loads((path / "state.json").read_text())
        with warnings.catch_warnings():  # torch warns about foreign pickles; we report them in one line
            warnings.simplefilter("ignore", UserWarning)
            model = torch.load(path / "model.pt", weights_only=True, map_location="cpu")
            optimizer = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            lrs = path / "inner_lr.pt"
            inner_lr = torch.load(lrs, weights_only=True, map_location="cpu") if lrs.exists() else {}
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} is incomplete: {Path(e.filename).name} is missing") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise CheckpointError(
            f"checkpoint {path} was refused by the safe loader (weights_only=True): {first}"
        ) from None
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state.get('format_version')}, expected {FORMAT_VERSION}"
        )
    run_state = RunState.from_json(state, path)
    if run_state.config.maml.learns_inner_lr() and not inner_lr:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: inner_lr.pt is missing (this run learns its inner step sizes); "
            "resume or evaluate from an older checkpoint folder of the run"
        )
    return Checkpoint(state["step"], state["version"], model, optimizer, run_state, path, inner_lr)
