"""Meta-validation while a run trains: a fixed set of validation tasks, scored every
training.eval_every steps after the run's own inner loop (loss, and accuracy for
classification, each with its 95% interval), and the metric keep_best ranks checkpoints by.

Where the tasks come from: task.val_store (`tasks build --classes-split val`, any family; its
classes must not be the training store's), else a generated family's validation stream (glyphs:
its own val classes), drawn in memory. Stores from files (tables, image folders) have no
generator: without a val_store they are not validated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from distributed_maml.config import Config
from distributed_maml.data.families import FROM_FILES
from distributed_maml.data.format import StoreInfo
from distributed_maml.data.onthefly import held_out
from distributed_maml.data.store import TaskStore
from distributed_maml.data.writing import build_in_memory
from distributed_maml.errors import ConfigError, StoreError
from distributed_maml.execution import factory
from distributed_maml.training.checkpoint import BestEntry

Scores = dict[str, float]  # val_loss, val_loss_ci95 (and val_acc, val_acc_ci95)


def mean_ci95(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 and the half-width of its normal-approximation 95% interval,
    1.96 * sample std / sqrt(n) (the paper's protocol)."""
    n = values.shape[0]
    sd = values.std(axis=0, ddof=1) if n > 1 else np.zeros(values.shape[1:])
    return values.mean(axis=0), 1.96 * sd / np.sqrt(n)


@dataclass(frozen=True)
class Validation:
    """Scores weights on the validation tasks; `metric` is what keep_best ranks by."""

    score: Callable[[np.ndarray], Scores]
    metric: str  # "val_acc" or "val_loss"
    source: str  # for the run's first line
    where: str = "cpu"  # the device it scores on (scaling.device), for the run's first line

    def rank(self, entry: BestEntry) -> tuple[float, int]:
        """Sort key of a best entry: the best score first (accuracy up, loss down), then the earlier step."""
        return (-entry.value if self.metric == "val_acc" else entry.value, entry.step)


def check(cfg: Config, train: StoreInfo) -> TaskStore | None:
    """The run's validation settings against its training tasks (before its folder is made):
    task.val_store opened and checked (None without one), select_by against the task kind."""
    if cfg.training.select_by == "val_acc" and train.kind != "classification":
        raise ConfigError("training.select_by = val_acc needs a classification family; use val_loss or auto")
    return open_val_store(cfg.task.val_store, train) if cfg.task.val_store else None


def open_val_store(path: str, t: StoreInfo) -> TaskStore:
    """task.val_store, checked against the run: the same task shape, and none of the training
    store's classes (validating on training classes would pick checkpoints by memorisation)."""
    store = TaskStore.open(path)
    info = store.info
    if info.split == "train":
        raise StoreError(f"task.val_store {path} is a train store; build it with --classes-split val")
    mismatch = [
        f"{name} {a} vs {b}"
        for name, a, b in (
            ("family", info.family, t.family),
            ("ways", info.ways, t.ways),
            ("shots", info.shots, t.shots),
            ("queries", info.queries, t.queries),
            ("example shape", info.example_shape, t.example_shape),
        )
        if a != b
    ]
    if mismatch:
        raise StoreError(
            f"task.val_store {path} does not match the training tasks ({'; '.join(mismatch)}); build it with the "
            "same --ways/--shots/--queries/--image-size"
        )
    shared = sorted(set(info.classes) & set(t.classes))
    if shared:
        raise StoreError(
            f"task.val_store {path} shares {len(shared)} class(es) with the training store (e.g. {shared[0]}); "
            "build both with the same --seed, --test-fraction and --val-fraction"
        )
    return store


def make(cfg: Config, train: TaskStore) -> Validation | None:
    """The run's validation (None when training.eval_every = 0 or there are no val tasks)."""
    t = cfg.training
    val_store = check(cfg, train.info)
    if not t.eval_every:
        return None
    if val_store is not None:
        store, source = val_store, cfg.task.val_store
    elif cfg.task.family in FROM_FILES or any(
        s.store for s in cfg.task.source_list()
    ):  # store sources: task.val_store only
        return None
    else:
        info = train.info
        if info.on_the_fly:
            store = held_out(info, t.eval_tasks, t.seed, "val", sources=cfg.task.source_list())
        else:
            store = build_in_memory(cfg.task.family, t.eval_tasks, t.seed, info.shots, info.queries, "val", info.ways)
        source = f"{cfg.task.family} val {'episodes' if info.on_the_fly else 'stream'}"
        if info.sources:
            source += f" of {', '.join(info.sources)}"
    computer = factory.local_computer(store, cfg.model, cfg.maml, cfg.scaling, name="validation")
    ids = np.arange(min(t.eval_tasks, len(store)))
    steps, lr = cfg.maml.inner_steps, cfg.maml.inner_lr
    classification = store.info.kind == "classification"
    metric = ("val_acc" if classification else "val_loss") if t.select_by == "auto" else t.select_by

    def score(weights: np.ndarray) -> Scores:
        losses, accs = computer.curve(weights, ids, (steps,), lr)
        out: Scores = {}
        for name, values in (("val_loss", losses), ("val_acc", accs)):
            if values is not None:
                mean, ci = mean_ci95(values[:, -1:])
                out[name], out[f"{name}_ci95"] = float(mean[0]), float(ci[0])
        return out

    return Validation(score, metric, f"{len(ids)} tasks from the {source}", where=computer.where)
