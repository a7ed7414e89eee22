"""Export: a checkpoint's meta-model as a folder a colleague can load without the run.

    OUT/model.safetensors   the meta-parameters (weights, and learned inner step sizes), float32
    OUT/card.json           everything needed to rebuild and adapt it (below)

The card names the model and its arguments (a user factory by its import path), the input
shape, the ways, shots and queries it was trained for, the algorithm and its adaptation
settings (steps, step size or learned ones, first order, ANIL's head, iMAML's proximal
strength and solver, the BatchNorm mode), the run's validation score and provenance, and the
run's whole configuration, from which `load` rebuilds the very network. Loading never unpickles
anything: safetensors and JSON only, the weights' sha-256 checked against the card. The export is
written into a temporary folder and renamed into place, so a stopped or failed export leaves
nothing half-written.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from distributed_maml import config as config_mod
from distributed_maml.core.inner import split_lrs
from distributed_maml.core.models import TaskBatchNorm
from distributed_maml.data.format import StoreInfo
from distributed_maml.errors import CheckpointError, UserError
from distributed_maml.training import checkpoint
from distributed_maml.use.metamodel import MetaModel
from distributed_maml.use.runs import run_store_info

FORMAT = "distributed-maml-export"
FORMAT_VERSION = 1
WEIGHTS, CARD = "model.safetensors", "card.json"


def export(run_dir: str | Path, out: str | Path, which: str | None = None) -> Path:
    """Writes checkpoint `which` of the run (None: best when it keeps one, else latest) to `out`
    (a new folder). Returns `out`."""
    from safetensors.torch import save_file

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; choose a new --out folder (an export is never overwritten)")
    ckpt = checkpoint.load(checkpoint.resolve(run_dir, which))
    cfg = ckpt.state.config
    info = run_store_info(ckpt.state.store.path, run_dir)
    meta = MetaModel(cfg, info, {**ckpt.model, **ckpt.inner_lr}, device="cpu", source=str(run_dir))
    tensors = {k: v.contiguous() for k, v in meta.meta.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        digest = hashlib.sha256((tmp / WEIGHTS).read_bytes()).hexdigest()
        card = _card(meta, run_dir, ckpt, digest)
        (tmp / CARD).write_text(json.dumps(card, indent=1))
        umask = os.umask(0)
        os.umask(umask)
        for f in (WEIGHTS, CARD):
            os.chmod(tmp / f, 0o666 & ~umask)  # mkdtemp's and safetensors' private modes: a plain folder's instead
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~umask)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _card(meta: MetaModel, run_dir: Path, ckpt: checkpoint.Checkpoint, digest: str) -> dict[str, Any]:
    cfg, info, m = meta.config, meta.info, meta.config.maml
    learned = split_lrs(meta.meta)[1]
    per_task_bn = any(isinstance(mod, TaskBatchNorm) for mod in meta.network.model.modules())
    best = [e for e in checkpoint.read_best(run_dir) if e.step == ckpt.step]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {
            "name": cfg.model.name,
            "factory": cfg.model.name if ":" in cfg.model.name else None,
            "arguments": cfg.to_dict()["model"],
            "input_shape": list(info.example_shape),
            "outputs": info.output_dim,
            "kind": info.kind,
            "parameters": {k: list(v.shape) for k, v in meta.meta.items()},
        },
        "trained_for": {"family": info.family, "ways": info.ways, "shots": info.shots, "queries": info.queries},
        "adaptation": {
            "algorithm": m.algorithm,
            "inner_steps": m.inner_steps,
            "inner_lr": m.inner_lr,
            "learned_inner_lr": ("per-element" if m.algorithm == "meta-sgd" else m.learn_inner_lr) if learned else None,
            "first_order": m.always_first_order(),
            "anil_head": sorted(meta.network.head) if meta.network.head else None,
            "head": m.head,  # where a task's class rows start (maml.head)
            "most_ways": meta.most_ways if info.kind == "classification" else None,
            "imaml": {"lambda": m.imaml_lambda, "solver": m.imaml_solver} if m.algorithm == "imaml" else None,
            "batch_norm": "per-task batch statistics (support and query sets each by their own)"
            if per_task_bn
            else None,
            "precision": cfg.scaling.precision,
        },
        "inputs": {
            "classes_trained_on": list(info.classes),
            "table_features": list(info.features),
            "standardised": bool(info.features),
        },
        "validation": {"metric": best[0].metric, "value": best[0].value} if best else None,
        "provenance": {
            "run": run_dir.resolve().name,  # its name, not this machine's folders: the card travels
            "checkpoint": ckpt.path.name,
            "step": ckpt.step,
            "version": ckpt.version,
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "distributed_maml": _version(),
            "torch": torch.__version__,
            "weights_sha256": digest,
        },
        "config": cfg.to_dict(),
        "store_info": asdict(info),
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("distributed-maml")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def load(path: str | Path, device: str = "auto") -> MetaModel:
    """The meta-model of an export folder (safetensors and JSON; nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CARD).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path} is not a distributed-maml export (it needs {CARD} and {WEIGHTS})")
    try:
        card = json.loads((path / CARD).read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path / CARD} is unreadable ({e}); export the run again") from None
    if card.get("format") != FORMAT or card.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path / CARD} is format {card.get('format')!r} version {card.get('format_version')}; "
            f"this distributed-maml reads {FORMAT} version {FORMAT_VERSION}"
        )
    data = (path / WEIGHTS).read_bytes()
    if hashlib.sha256(data).hexdigest() != card.get("provenance", {}).get("weights_sha256"):
        raise CheckpointError(f"{path / WEIGHTS} does not match its card's sha-256 (corrupt or replaced); export again")
    try:
        params = load_file(str(path / WEIGHTS))
        cfg = config_mod.from_dict(card["config"])
        info = StoreInfo.from_json(card["store_info"])
    except (SafetensorError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"export {path} is unreadable ({e}); export the run again") from None
    return MetaModel(cfg, info, params, device, source=str(path))


def load_any(path: str | Path, which: str | None = None, device: str = "auto") -> MetaModel:
    """A run folder's checkpoint `which`, or an export folder: what `adapt` and `serve` take."""
    from distributed_maml.use.runs import open_run

    path = Path(path)
    if (path / CARD).is_file():
        if which not in (None, "best", "latest"):
            raise UserError(f"{path} is an export (one checkpoint); drop --checkpoint {which}")
        return load(path, device)
    return open_run(path).meta_model(which, device)
