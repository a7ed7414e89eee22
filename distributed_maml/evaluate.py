"""Meta-test: adapt the trained initialisation on held-out tasks and score the query sets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint, models
from . import config as config_mod
from .errors import StoreError, UserError
from .maml import TaskBatch, adaptation_curve
from .store import TaskStore, build_in_memory

CHUNK = 1000  # tasks per vmap call: bounds memory, not results


def mean_ci95(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 and the half-width of its normal-approximation 95% interval,
    1.96 * sample std / sqrt(n) (the paper's protocol)."""
    n = values.shape[0]
    sd = values.std(axis=0, ddof=1) if n > 1 else np.zeros(values.shape[1:])
    return values.mean(axis=0), 1.96 * sd / np.sqrt(n)


def held_out_store(state: dict[str, Any], tasks: str | Path | None, num_tasks: int, shots: int | None) -> TaskStore:
    cfg = config_mod.from_dict(state["config"])
    train = state["store"]
    if tasks is None:
        return build_in_memory(
            cfg.task.family,
            num_tasks,
            seed=train["seed"],
            shots=shots or cfg.task.shots,
            queries=cfg.task.queries,
            split="test",
        )
    store = TaskStore.open(tasks)
    info = store.info
    if info.family != train["family"]:
        raise StoreError(f"{tasks} holds {info.family!r} tasks but the run was trained on {train['family']!r} tasks")
    if Path(tasks).resolve() == Path(train["path"]).resolve() or (info.split, info.seed) == ("train", train["seed"]):
        raise StoreError(
            f"{tasks} is the run's training store; evaluate on held-out tasks "
            "(build them with `distributed-maml tasks build --split test`)"
        )
    return store


def evaluate(
    run_dir: str | Path,
    tasks: str | Path | None = None,
    steps: Sequence[int] = (0, 1, 5, 10),
    num_tasks: int = 600,
    shots: int | None = None,
) -> dict[str, Any]:
    """Query loss (and accuracy) after each number of inner steps in `steps`, mean and 95% CI
    over `num_tasks` held-out tasks."""
    if not steps or min(steps) < 0:
        raise UserError(f"--steps must be a list of numbers >= 0, got {list(steps)}")
    if num_tasks < 2:
        raise UserError(f"--num-tasks must be >= 2 for a confidence interval, got {num_tasks}")
    if shots is not None and shots < 1:
        raise UserError(f"--shots must be >= 1, got {shots}")
    ckpt = checkpoint.load(checkpoint.latest(Path(run_dir)))
    cfg = config_mod.from_dict(ckpt.state["config"])
    store = held_out_store(ckpt.state, tasks, num_tasks, shots)
    model = models.build(cfg.model, store.info, seed=0)
    params = {k: v.to(torch.float32) for k, v in ckpt.model.items()}
    n = min(num_tasks, len(store))
    losses, accs = [], []
    for lo in range(0, n, CHUNK):
        batch = TaskBatch.from_numpy(store.rows(np.arange(lo, min(n, lo + CHUNK))))
        loss, acc = adaptation_curve(
            models.functional(model), store.info.kind, params, batch, max(steps), cfg.maml.inner_lr
        )
        losses.append(loss.numpy())
        if acc is not None:
            accs.append(acc.numpy())
    idx = list(steps)
    out: dict[str, Any] = {
        "run": str(run_dir),
        "checkpoint_step": ckpt.step,
        "num_tasks": n,
        "shots": store.info.shots,
        "steps": idx,
    }
    mean, ci = mean_ci95(np.concatenate(losses)[:, idx])
    out.update(loss_mean=mean.tolist(), loss_ci95=ci.tolist())
    if accs:
        mean, ci = mean_ci95(np.concatenate(accs)[:, idx])
        out.update(accuracy_mean=mean.tolist(), accuracy_ci95=ci.tolist())
    return out


def format_table(result: dict[str, Any]) -> str:
    head = f"{result['num_tasks']} held-out tasks, {result['shots']} shots, checkpoint step {result['checkpoint_step']}"
    cols = ["inner steps", "query loss (95% CI)"] + (["accuracy (95% CI)"] if "accuracy_mean" in result else [])
    rows = []
    for i, k in enumerate(result["steps"]):
        row = [str(k), f"{result['loss_mean'][i]:.4f} ± {result['loss_ci95'][i]:.4f}"]
        if "accuracy_mean" in result:
            row.append(f"{result['accuracy_mean'][i]:.4f} ± {result['accuracy_ci95'][i]:.4f}")
        rows.append(row)
    widths = [max(len(c), *(len(r[j]) for r in rows)) for j, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False))  # noqa: E731
    return "\n".join([head, line(cols), line(["-" * w for w in widths]), *map(line, rows)])
