"""Checkpoints: atomic save, safe load, resume.

Layout of a run folder:

    DIR/config.toml                 the run's config
    DIR/metrics.jsonl               one JSON line per logged step
    DIR/checkpoints/step_<n>/       model.pt (state_dict), optimizer.pt (Adam), state.json,
                                    inner_lr.pt (learned inner step sizes, when the algorithm has them)
    DIR/checkpoints/latest          the name of the newest complete checkpoint folder
    DIR/checkpoints/best.json       the keep_best best validated steps, best first (step, metric, value)
    DIR/checkpoints/best            the name of the best one's folder

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
            cfg = dict(data["config"])
            # a run saved before maml.imaml_solver existed took plain proximal steps: resume it so
            cfg["maml"] = {"imaml_solver": "sgd", **cfg.get("maml", {})}
            return cls(config_mod.from_dict(cfg), Sampler(**data["sampler"]), StoreRef(**store))
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


def _replace_file(path: Path, data: bytes) -> None:
    """`path` holds `data` or its old content, never a torn mix (written aside, then renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    _replace_file(root / "latest", final.name.encode())
    _fsync_dir(root)
    if keep:
        prune(root, keep, final.name)
    return final


def prune(root: Path, keep: int, latest_name: str) -> None:
    """Deletes the older checkpoint folders beyond the `keep` newest; never `latest_name` nor a
    best one (best.json), and only after `latest` names a complete newer one (the caller's order).
    keep = 0 keeps all."""
    if not keep:
        return
    steps = sorted((int(p.name[5:]), p) for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name))
    spared = {latest_name, *(f"step_{b.step}" for b in read_best(root.parent))}
    for _, path in steps[:-keep]:
        if path.name not in spared:
            shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class BestEntry:
    """One validated step among the run's best."""

    step: int
    metric: str  # "val_acc" or "val_loss"
    value: float


def read_best(run_dir: Path) -> list[BestEntry]:
    """The run's best validated steps, best first ([] when it has none)."""
    path = Path(run_dir) / "checkpoints" / "best.json"
    if not path.is_file():
        return []
    try:
        return [BestEntry(int(e["step"]), str(e["metric"]), float(e["value"])) for e in json.loads(path.read_text())]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path} is unreadable ({e!r}); delete it to rebuild the best list from here on"
        ) from None


def write_best(run_dir: Path, entries: list[BestEntry], spare: int) -> None:
    """Replaces best.json and the `best` pointer (each through a rename), then deletes the
    folders of steps that fell out of the list (unless among the `spare` newest, or latest)."""
    root = Path(run_dir) / "checkpoints"
    _replace_file(root / "best.json", json.dumps([asdict(e) for e in entries], indent=1).encode())
    if entries:
        _replace_file(root / "best", f"step_{entries[0].step}".encode())
    else:
        (root / "best").unlink(missing_ok=True)
    _fsync_dir(root)
    prune(root, spare, latest(run_dir).name)


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


def resolve(run_dir: Path, which: str | None = None) -> Path:
    """The checkpoint folder `which` names: "best", "latest", "step_N" (or N); None: best when
    the run keeps one, else latest."""
    run_dir = Path(run_dir)
    if which is None:
        which = "best" if (run_dir / "checkpoints" / "best").is_file() else "latest"
    if which == "latest":
        return latest(run_dir)
    if which == "best":
        pointer = run_dir / "checkpoints" / "best"
        if not pointer.is_file():
            latest(run_dir)  # a folder that is not a run, or has no checkpoint, says so first
            raise CheckpointError(
                f"run {run_dir} has no best checkpoint (no validation, or training.keep_best = 0); "
                "use --checkpoint latest"
            )
        path = run_dir / "checkpoints" / pointer.read_text().strip()
    else:
        name = which if which.startswith("step_") else f"step_{which}"
        path = run_dir / "checkpoints" / name
        if not re.fullmatch(r"step_\d+", name):
            raise CheckpointError(f"--checkpoint takes best, latest or step_N, got {which!r}")
    if not path.is_dir():
        kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())
        raise CheckpointError(f"run {run_dir} has no checkpoint {path.name} (it keeps: {', '.join(kept) or 'none'})")
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
