"""A run folder: setting it up (its config, its task store, what a resume starts from), its
checkpoints and its metrics log, and how a run ends early (a stop, a lost cluster) resumably."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from distributed_maml import config as config_mod
from distributed_maml import stopping
from distributed_maml.config import Config
from distributed_maml.core import models
from distributed_maml.core.learner import Learner
from distributed_maml.core.maml import as_input, split_lrs
from distributed_maml.data.episodes import TASK_IDS, EpisodeSpec
from distributed_maml.data.families import resolve
from distributed_maml.data.format import StoreInfo
from distributed_maml.data.onthefly import episodes_of, plan_from_sources, plan_stream
from distributed_maml.data.sampler import Sampler
from distributed_maml.data.store import TaskStore
from distributed_maml.data.writing import Plan, check_disk, default_plan, plan, write_batches
from distributed_maml.errors import CheckpointError, ConfigError, StoreError, with_filename
from distributed_maml.execution import devices
from distributed_maml.training import checkpoint, validation
from distributed_maml.training.runlock import RunLock

STORE_NAME = "tasks.arrow"
# Keys a resume may change: the length and cadence of the run, and where it runs (the answer
# does not depend on the number of workers). Anything else would make a different run.
RESUME_MAY_CHANGE = {
    "training.steps",
    "training.log_every",
    "training.checkpoint_every",
    "training.keep_checkpoints",
    "training.on_nonfinite",
    "training.eval_every",
    "training.eval_tasks",
    "training.keep_best",
}


@dataclass
class Run:
    dir: Path
    cfg: Config
    store: TaskStore
    store_path: Path
    start: checkpoint.Checkpoint | None  # set when resuming
    lock: RunLock | None = None  # this process is the run's one writer until released

    @property
    def store_ref(self) -> checkpoint.StoreRef:
        """What checkpoints record about the store (as opened when the run began or resumed)."""
        info = self.store.info
        return checkpoint.StoreRef(
            str(self.store_path),
            info.family,
            info.seed,
            info.ways,
            len(self.store),
            self.store_path.stat().st_size,
            info.fingerprint,
        )

    def save(self, learner: Learner, step: int, sampler: Sampler) -> Path:
        """Checkpoint `step_<step>` of the learner's meta-parameters and Adam state, and `latest`."""
        state = checkpoint.RunState(self.cfg, sampler, self.store_ref)
        keep = self.cfg.training.keep_checkpoints
        model, lrs = split_lrs(learner.state_dict())  # model.pt stays a plain state_dict of the network
        return checkpoint.save(self.dir, step, learner.version, model, learner.optimizer_state(), state, keep, lrs)

    def save_unless_latest(self, learner: Learner, step: int, sampler: Sampler) -> None:
        """`save`, unless `latest` already names step `step` (a stop, a best step and the
        periodic checkpoint may all fall on one step)."""
        if self.last_checkpoint() != f"step_{step}":
            self.save(learner, step, sampler)

    def last_checkpoint(self) -> str:
        """The name of the checkpoint `latest` names ("none yet" if there is none to read)."""
        try:
            return checkpoint.latest(self.dir).name
        except (CheckpointError, OSError):
            return "none yet"

    def lost(self, why: str) -> None:
        """The cluster went away under the run (called from the executor's watch thread): one
        line of ours before Ray ends the process. Checkpoints are atomic, so `latest` is whole."""
        sys.stdout.flush()
        sys.stderr.write(
            f"\ndistributed-maml: error: {why}; the last checkpoint ({self.last_checkpoint()}) is intact: start Ray "
            f"again (or let this command start it) and continue with distributed-maml train --resume {self.dir}\n"
        )
        sys.stderr.flush()
        os._exit(1)  # before Ray's own exit, which prints nothing of ours; the kernel releases the run lock

    def stop(self, learner: Learner, step: int, sampler: Sampler) -> None:
        """Saves the last applied step (unless `latest` names it already) and ends the run resumably."""
        self.save_unless_latest(learner, step, sampler)
        signum = stopping.requested()
        assert signum is not None
        raise stopping.Stopped(
            signum, f"stopped at step {step}; continue with distributed-maml train --resume {self.dir}"
        )


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, kv in cfg.to_dict().items() for k, v in kv.items()}


def _new_run_dir(output_dir: str | Path | None, cfg: Config) -> Path:
    if output_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path("runs") / f"{stamp}-{re.sub(r'[^A-Za-z0-9_-]+', '-', cfg.task.family)}"  # no ':' from user paths
        path, n = base, 1
        while path.exists():
            path, n = Path(f"{base}-{n}"), n + 1
    else:
        path = Path(output_dir)
        if (path / "config.toml").exists():
            raise ConfigError(
                f"{path} already holds a run; continue it with --resume {path} or choose another --output-dir"
            )
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            raise ConfigError(f"--output-dir {path} exists and is not an empty folder; choose another")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sources_plan(cfg: Config) -> Plan:
    """task.sources combined (their examples side by side), checked against task.*."""
    t = cfg.task
    listed = t.source_list()
    ways = t.bounds("ways")
    if ways == (0, 0):  # the first source's: a store's own, or its family's
        first = listed[0]
        ways = TaskStore.open(first.store).info.spec.ways if first.store else (resolve(first.family).ways,) * 2
    spec = EpisodeSpec(ways, t.bounds("shots"), t.bounds("queries"), t.max_support, t.sampler)
    p = plan_from_sources(listed, spec, cfg.training.seed, "train", t.num_tasks or TASK_IDS)
    if p.info.family != t.family:
        raise StoreError(
            f"task.sources hold {p.info.family!r} examples but task.family = {t.family!r}; make them agree"
        )
    if p.info.split != "train":
        raise StoreError(f"task.sources are {p.info.split} stores; train on stores built with --split train")
    return p


def _bounds(b: tuple[int, int]) -> str:
    """A (lo, hi) bound as the config writes it: n, or [lo, hi]."""
    return str(b[0]) if b[0] == b[1] else f"[{b[0]}, {b[1]}]"


def _check_store(store: TaskStore, cfg: Config) -> None:
    info = store.info
    if info.family != cfg.task.family:
        raise StoreError(
            f"{store.name} holds {info.family!r} tasks but task.family = {cfg.task.family!r}; "
            f"set --set task.family={info.family} or use a {cfg.task.family} store"
        )
    spec, t = info.spec, cfg.task
    if (spec.shots, spec.queries) != (t.bounds("shots"), t.bounds("queries")):
        raise StoreError(
            f"{store.name} has {_bounds(spec.shots)} shots and {_bounds(spec.queries)} queries but the config says "
            f"task.shots = {_bounds(t.bounds('shots'))}, task.queries = {_bounds(t.bounds('queries'))}; make them agree"
        )
    if t.bounds("ways") not in ((0, 0), spec.ways):
        raise StoreError(
            f"{store.name} holds {_bounds(spec.ways)}-way tasks but task.ways = {_bounds(t.bounds('ways'))}; "
            "make them agree (0 = the store's)"
        )
    if t.max_support and t.max_support != spec.max_support:
        raise StoreError(f"{store.name} caps support sets at {spec.max_support} but task.max_support = {t.max_support}")
    if t.sampler != "uniform" and spec.sampler != t.sampler:
        raise StoreError(f"{store.name} draws {spec.sampler} episodes but task.sampler = {t.sampler}; make them agree")
    if info.split in ("test", "val"):
        raise StoreError(f"{store.name} is a held-out ({info.split}) store; train on a store built with --split train")


def check_model(cfg: Config, info: StoreInfo, store: TaskStore | None) -> None:
    """The model must build, fit the tasks and obey the vmap rules: checked once, on the driver,
    on a real example when there is a store (zeros of the right shape before it is built)."""
    example = None
    if store is not None:
        example = as_input(torch.from_numpy(np.ascontiguousarray(store.rows(np.array([0]))["x_support"][0])))
    models.check(cfg.model, info, example)


def prepare(
    cfg: Config, output_dir: str | Path | None = None, tasks: str | Path | None = None, progress: bool = True
) -> Run:
    """A new run: makes its folder, writes config.toml, opens or builds its task store.
    Every check runs before the folder is made, so a refused run leaves nothing behind."""
    new_store: Plan | None = None
    devices.resolve(cfg.scaling)  # scaling.device = "cuda" on a machine without CUDA: one line, nothing made
    if tasks is not None:
        store_path = Path(tasks).resolve()
        store = TaskStore.open(store_path)
        _check_store(store, cfg)
        check_model(cfg, store.info, store)
        validation.check(cfg, store.info)
    else:
        t = cfg.task
        if t.sources:  # several on-the-fly stores as one: each episode's source drawn by weight
            new_store = _sources_plan(cfg)
        elif t.drawn:  # an on-the-fly store: the family's examples once (or nothing), no task rows
            b = t.bounds
            spec = episodes_of(t.family, b("ways"), b("shots"), b("queries"), t.max_support, t.sampler)
            new_store = plan_stream(t.family, spec, cfg.training.seed, "train", t.num_tasks or TASK_IDS)
        elif t.num_tasks:
            new_store = plan(t.family, t.num_tasks, cfg.training.seed, t.shots, t.queries, "train", t.ways)
        else:
            steps, seed = cfg.training.steps, cfg.training.seed
            new_store = default_plan(t.family, steps, t.meta_batch, seed, t.shots, t.queries, t.ways)
        check_model(cfg, new_store.info, None)
        validation.check(cfg, new_store.info)
        check_disk(Path(output_dir or "runs") / STORE_NAME, new_store.info.nbytes)  # before the folder exists
    run_dir = _new_run_dir(output_dir, cfg)
    lock = None
    try:
        lock = RunLock(run_dir)
        if new_store is not None:
            store_path = (run_dir / STORE_NAME).resolve()
            write_batches(store_path, new_store.info, new_store.batches(progress), overwrite=False)
            store = TaskStore.open(store_path)
        (run_dir / "config.toml").write_text(config_mod.dumps(cfg))
    except BaseException:
        if lock is not None:
            lock.release()
            shutil.rmtree(run_dir, ignore_errors=True)  # only a folder this process made and held
        raise
    return Run(run_dir, cfg, store, store_path, None, lock)


def resume(run_dir: str | Path, config_path: str | Path | None = None, overrides: Sequence[str] = ()) -> Run:
    """A run continued from its latest checkpoint. --config/--set may change only what
    RESUME_MAY_CHANGE (and [scaling]) lists; anything else is a conflict, named."""
    run_dir = Path(run_dir)
    ckpt = checkpoint.load(checkpoint.latest(run_dir))
    saved = ckpt.state.config
    base = config_mod.load(config_path).to_dict() if config_path else saved.to_dict()
    cfg = config_mod.from_dict(config_mod.apply_overrides(base, overrides))
    for key, old in _flat(saved).items():
        new = _flat(cfg)[key]
        if new != old and key not in RESUME_MAY_CHANGE and not key.startswith("scaling."):
            raise ConfigError(
                f"cannot resume {run_dir} with {key} = {new!r}: the run was made with {old!r}; "
                f"a resume may change only {', '.join(sorted(RESUME_MAY_CHANGE))} and [scaling]"
            )
    if cfg.training.steps < ckpt.step:
        raise ConfigError(f"training.steps = {cfg.training.steps} is below the checkpoint's step {ckpt.step}")
    devices.resolve(cfg.scaling)
    ref = ckpt.state.store
    store_path = Path(ref.path)
    if not store_path.exists() and (run_dir / STORE_NAME).exists():  # the run folder was moved
        store_path = (run_dir / STORE_NAME).resolve()
    store = TaskStore.open(store_path)
    _check_same_store(store, store_path, ref)
    lock = RunLock(run_dir)  # before anything in the folder changes
    try:
        (run_dir / "config.toml").write_text(config_mod.dumps(cfg))
        _truncate_metrics(run_dir / "metrics.jsonl", ckpt.step)
    except BaseException:
        lock.release()
        raise
    return Run(run_dir, cfg, store, store_path, ckpt, lock)


def _logged_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a line torn by a full disk or a kill mid-write
        return None


def _check_same_store(store: TaskStore, path: Path, ref: checkpoint.StoreRef) -> None:
    """The store a resume opens must be the one the run trained on: same metadata, same size."""
    changed, size = [], path.stat().st_size
    if len(store) != ref.num_tasks:
        changed.append(f"{len(store)} tasks instead of {ref.num_tasks}")
    if ref.size_bytes is not None and size != ref.size_bytes:
        changed.append(f"{size} bytes instead of {ref.size_bytes}")
    if ref.fingerprint is not None and store.info.fingerprint != ref.fingerprint:
        changed.append("different metadata (family, seed, shapes or classes)")
    if changed:
        raise CheckpointError(
            f"{path} was replaced since the run trained on it ({'; '.join(changed)}); "
            "put the original store back to resume (the run's tasks must not change under it)"
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops lines logged after the checkpoint a resume starts from (they will be logged again),
    and a torn last line."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if (_logged_step(line) or step + 1) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def append_line(log: IO[bytes], line: str) -> None:
    """One metrics line, written through (the file is unbuffered: a failed write leaves nothing
    pending that closing the file would fail on again, hiding the first error)."""
    data = memoryview(line.encode())
    try:
        while data:
            data = data[log.write(data) or 0 :]
    except OSError as e:
        raise with_filename(e, log.name) from None
