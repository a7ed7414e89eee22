"""A finished (or stopped) run, opened from its folder, in the manner of Ray Train's
`Result.from_path`: its config, its metrics as a table, its checkpoints (`best`, `latest`) and
the meta-model of any of them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from distributed_maml import config as config_mod
from distributed_maml.config import Config
from distributed_maml.data.format import StoreInfo
from distributed_maml.data.store import TaskStore
from distributed_maml.errors import CheckpointError, StoreError, UserError
from distributed_maml.training import checkpoint
from distributed_maml.use.metamodel import MetaModel


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint folder of a run: its name (step_N), step, path and, for a validated best
    one, its score (metric, value)."""

    name: str
    step: int
    path: Path
    score: tuple[str, float] | None = None


class RunResult:
    """A run folder opened for reading (nothing in it is changed)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        checkpoint.latest(self.path)  # a folder that is not a run, or has no checkpoint yet: one line
        self.config: Config = config_mod.load(self.path / "config.toml")

    @classmethod
    def from_path(cls, path: str | Path) -> RunResult:
        return cls(path)

    def __repr__(self) -> str:
        best = self.best
        return f"RunResult({str(self.path)!r}, latest={self.latest.name}, best={best.name if best else None})"

    @property
    def metrics(self) -> pa.Table:
        """metrics.jsonl as a table, a row per logged step; the time breakdown flattened to
        `time.<key>` columns (its per-worker tables left out)."""
        path = self.path / "metrics.jsonl"
        rows = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            if not line.strip():
                continue
            record = json.loads(line)
            timing = record.pop("time", {}) or {}
            record.update({f"time.{k}": v for k, v in timing.items() if isinstance(v, (int, float, str))})
            rows.append(record)
        keys = list(dict.fromkeys(k for r in rows for k in r))  # validated steps add columns: every key, in order
        return pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in keys})

    def metrics_dataframe(self) -> Any:
        """`metrics` as a pandas DataFrame (pandas must be installed)."""
        return self.metrics.to_pandas()

    @property
    def checkpoints(self) -> list[CheckpointRef]:
        """Every checkpoint folder the run keeps, oldest first."""
        scores = self._scores()
        folders = (p for p in (self.path / "checkpoints").glob("step_*") if p.is_dir())
        return sorted((self._ref(p, scores) for p in folders), key=lambda r: r.step)

    def _scores(self) -> dict[int, tuple[str, float]]:
        """best.json's validated steps: step -> (metric, value), read once per question."""
        return {e.step: (e.metric, e.value) for e in checkpoint.read_best(self.path)}

    def _ref(self, path: Path, scores: dict[int, tuple[str, float]] | None = None) -> CheckpointRef:
        step = int(path.name[5:])
        return CheckpointRef(path.name, step, path, (self._scores() if scores is None else scores).get(step))

    @property
    def latest(self) -> CheckpointRef:
        return self._ref(checkpoint.latest(self.path))

    @property
    def best(self) -> CheckpointRef | None:
        """The checkpoint with the best validation score (None: the run keeps none)."""
        if not (self.path / "checkpoints" / "best").is_file():
            return None
        return self._ref(checkpoint.resolve(self.path, "best"))

    def meta_model(self, which: str | None = None, device: str = "auto") -> MetaModel:
        """The meta-model of checkpoint `which` ("best", "latest", "step_N"; None: best when the
        run keeps one, else latest) on `device` ("auto": CUDA when there is one)."""
        ckpt = checkpoint.load(checkpoint.resolve(self.path, which))
        info = run_store_info(ckpt.state.store.path, self.path)
        params = {**ckpt.model, **ckpt.inner_lr}
        return MetaModel(ckpt.state.config, info, params, device, source=f"{self.path} ({ckpt.path.name})")


def run_store_info(store_path: str, run_dir: Path) -> StoreInfo:
    """The shapes of the run's tasks (they size the network), from its task store's metadata."""
    try:
        return TaskStore.open(store_path).info
    except StoreError as e:
        raise CheckpointError(
            f"run {run_dir}'s task store is needed for the network's shapes and cannot be opened ({e}); "
            "put it back, or export the run where it trained (distributed-maml export)"
        ) from None


def train(
    config: str | Path | Config | None = None,
    overrides: Sequence[str] = (),
    output_dir: str | Path | None = None,
    tasks: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
) -> RunResult:
    """Meta-trains a run and returns it opened: `config` a TOML file, a Config or None (the
    built-in default), `overrides` as the CLI's --set ("section.key=value"); `resume` continues
    a run folder instead (overrides may raise training.steps). The same run as `distributed-maml
    train`, bit for bit (the CLI calls this). Under `ray job submit` (RAY_ADDRESS) or with Ray
    already initialised (a notebook), Ray workers join that cluster."""
    from distributed_maml.training import run as run_mod
    from distributed_maml.training import train as train_mod

    if resume is not None:
        if output_dir is not None or tasks is not None:
            raise UserError("--resume continues a run in place; drop --output-dir and --tasks")
        if isinstance(config, Config):
            raise UserError("resume takes a config file (or none), not a Config object")
        r = run_mod.resume(resume, config, overrides)
    else:
        if isinstance(config, Config):
            cfg = config_mod.from_dict(config_mod.apply_overrides(config.to_dict(), overrides))
        else:
            cfg = config_mod.load(config, overrides)
        r = run_mod.prepare(cfg, output_dir, tasks, progress=progress)
    executor = train_mod.make_executor(r)
    try:
        train_mod.train(r, executor, progress=progress)
    finally:
        executor.close()
    return RunResult(r.dir)


def open_run(path: str | Path) -> RunResult:
    """A run folder opened for reading: config, metrics, checkpoints, meta-models."""
    if not Path(path).exists():
        raise UserError(f"run folder {path} does not exist")
    return RunResult(path)
