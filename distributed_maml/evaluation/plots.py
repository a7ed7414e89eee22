"""Plots (matplotlib, Agg, PNG in RUN_DIR/plots/); `distributed-maml plot RUN_DIR` redraws them.

- training.png: the meta-loss over steps (query loss after and before adaptation) and, when the
  run evaluated held-out tasks at intervals, their post-adaptation loss;
- adaptation-<k>shots.png: the adaptation curves of MAML and the baselines from `eval`;
- sinusoid-tasks.png (sinusoid runs): the paper's figure-2 panel for a few held-out tasks: the
  true function, the support points, predictions before adaptation and after 1 and 10 steps;
- image-tasks.png (image stores: glyphs, folders): a few of the run's tasks, one row each, its
  support images and one query image per class, with their task labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from distributed_maml import config as config_mod  # noqa: E402
from distributed_maml.core import models  # noqa: E402
from distributed_maml.core.maml import adapt, head_of, split_lrs  # noqa: E402
from distributed_maml.data.families.sinusoid import X_RANGE, function  # noqa: E402
from distributed_maml.data.store import TaskStore
from distributed_maml.data.writing import build_in_memory  # noqa: E402
from distributed_maml.errors import CheckpointError  # noqa: E402
from distributed_maml.training import checkpoint


def training(run_dir: Path, out: Path) -> Path | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss_before"] for r in rows], label="query loss before adaptation", color="0.6")
    ax.plot(steps, [r["meta_loss"] for r in rows], label="meta-loss (query loss after adaptation)", color="C0")
    held = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if held:
        ax.plot(*zip(*held), "o-", label="validation tasks, after adaptation", color="C3")
    ax.set(xlabel="meta-step", ylabel="loss", title=f"meta-training: {run_dir.name}")
    if all(r["meta_loss"] > 0 for r in rows):
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def sweep_curves(sweep_dir: Path, names: list[str], metric: str) -> Path | None:
    """Every trial's validation curve (`metric` against the step) in one figure:
    SWEEP_DIR/plots/validation.png; a trial stopped early ends where ASHA stopped it."""
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for name in names:
        path = sweep_dir / "trials" / name / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        points = [(r["step"], r[metric]) for r in rows if metric in r and np.isfinite(r[metric])]
        if points:
            ax.plot(*zip(*points), "o-", markersize=3, label=name)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="meta-step", ylabel=metric, title=f"sweep {sweep_dir.name}: validation of each trial")
    if metric == "val_loss":
        ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = sweep_dir / "plots" / "validation.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def adaptation(result: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = result["steps"]
    for i, (name, r) in enumerate([("MAML", result), *result.get("baselines", {}).items()]):
        mean, ci, median = (np.array(r[k], dtype=float) for k in ("loss_mean", "loss_ci95", "loss_median"))
        ax.errorbar(steps, mean, yerr=ci, marker="o", capsize=3, label=f"{name} (mean ± 95% CI)", color=f"C{i}")
        ax.plot(steps, median, ls="--", color=f"C{i}", alpha=0.6, label=f"{name} (median)")
    ax.set(
        xlabel="inner gradient steps at test",
        ylabel="query loss",
        title=f"{result['num_tasks']} held-out {result['family']} tasks, {result['shots']} shots, inner lr {lr:g}"
        if isinstance(lr := result["inner_lr"], float)
        else f"inner lr {lr}",  # or "learned"
    )
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def sinusoid_tasks(run_dir: Path, out: Path, shots: int = 10, tasks: int = 3) -> Path:
    ckpt = checkpoint.load(checkpoint.latest(run_dir))
    cfg = ckpt.state.config
    store = build_in_memory("sinusoid", tasks, seed=ckpt.state.store.seed + 7, shots=shots, queries=1)
    model = models.build(cfg.model, store.info, seed=0)
    forward = models.functional(model)
    params = {k: v.float() for k, v in {**ckpt.model, **ckpt.inner_lr}.items()}  # learned step sizes too
    grid = np.linspace(*X_RANGE, 200, dtype=np.float32)[:, None]
    fig, axes = plt.subplots(1, tasks, figsize=(4.5 * tasks, 3.6), squeeze=False)
    for t, ax in enumerate(axes[0]):
        row = store.task(t)
        amp, phase = row["params"]
        xs, ys = torch.from_numpy(np.array(row["x_support"])), torch.from_numpy(np.array(row["y_support"]))
        ax.plot(grid, function(grid, amp, phase), color="red", label="ground truth")
        ax.plot(xs, ys, "^", color="purple", label=f"{shots} support points")
        for k, style in ((0, ":"), (1, "--"), (10, "-")):
            head = head_of(cfg.maml, list(split_lrs(params)[0]))
            p = split_lrs(adapt(forward, "regression", params, xs, ys, k, cfg.maml.inner_lr, True, head))[0]
            with torch.no_grad():
                ax.plot(
                    grid,
                    forward(p, torch.from_numpy(grid)).numpy(),
                    style,
                    color="C0",
                    label="MAML init" if k == 0 else f"after {k} step{'s' * (k > 1)}",
                )
        ax.set(title=f"A = {amp:.2f}, phase = {phase:.2f}", xlabel="x")
        ax.set_ylim(-6, 6)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def image_tasks(store_path: Path, out: Path, tasks: int = 3, max_support: int = 10) -> Path | None:
    """A grid of a few tasks of an images store: support images, then one query per class."""
    store = TaskStore.open(store_path)
    info = store.info
    if info.layout != "images":
        return None
    ids = np.arange(min(tasks, len(store)))
    rows = store.rows(ids)
    ns = min(info.n_support, max_support)
    first_query = np.arange(info.ways) * info.queries  # query images are grouped by class
    cols = ns + info.ways
    fig, axes = plt.subplots(len(ids), cols, figsize=(1.1 * cols, 1.3 * len(ids)), squeeze=False)
    for t in range(len(ids)):
        panels = [("support", rows["x_support"][t, j], rows["y_support"][t, j]) for j in range(ns)]
        panels += [("query", rows["x_query"][t, j], rows["y_query"][t, j]) for j in first_query]
        for ax, (part, img, label) in zip(axes[t], panels):
            ax.imshow(
                img.transpose(1, 2, 0).squeeze(-1) if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray_r"
            )
            ax.set_title(f"{part} {label}", fontsize=7, color="C0" if part == "support" else "C3")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{info.family}: {info.ways}-way {info.shots}-shot tasks (label = task-relative class)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """Redraws every plot a run folder has the data for; returns their paths."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists():
        raise CheckpointError(f"{run_dir} is not a distributed-maml run folder (no config.toml)")
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    made = [training(run_dir, out / "training.png")]
    for ev in sorted((run_dir / "eval").glob("eval-*shots*.json")):
        made.append(
            adaptation(
                json.loads(ev.read_text()), out / ev.name.replace("eval-", "adaptation-").replace(".json", ".png")
            )
        )
    cfg = config_mod.load(run_dir / "config.toml")
    latest = run_dir / "checkpoints" / "latest"
    if cfg.task.family == "sinusoid" and latest.exists():
        shots = cfg.task.bounds("shots")[1]  # the run's K (variable episodes: the most)
        made.append(sinusoid_tasks(run_dir, out / "sinusoid-tasks.png", shots=shots))
    if latest.exists():
        store_path = Path(checkpoint.load(checkpoint.latest(run_dir)).state.store.path)
        if store_path.exists():
            made.append(image_tasks(store_path, out / "image-tasks.png"))
    return [p for p in made if p is not None]
