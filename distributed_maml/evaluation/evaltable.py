"""`eval`'s numbers and table: per-task curves summarized (means, intervals, medians, blow-ups),
held-out tasks grouped by ways and by source (variable episodes, several sources), and the table
`distributed-maml eval` prints."""

from __future__ import annotations

from typing import Any

import numpy as np

from distributed_maml.data.store import TaskStore
from distributed_maml.training.validation import mean_ci95


def summarize(losses: np.ndarray, accs: np.ndarray | None, steps: list[int], bound: float) -> dict[str, Any]:
    """The table's numbers at columns `steps` of per-task curves whose column 0 is the
    unadapted loss (the reference for "got worse")."""
    with np.errstate(invalid="ignore", over="ignore"):
        blow_up = ~np.isfinite(losses) | (losses > bound)
        worse = ~blow_up & (losses > losses[:, :1])
        mean, ci = mean_ci95(losses[:, steps])
    out = {
        "loss_mean": mean.tolist(),
        "loss_ci95": ci.tolist(),
        # a NaN loss is a blow-up: it counts as +inf, so the median stays meaningful
        "loss_median": np.median(np.nan_to_num(losses[:, steps], nan=np.inf), axis=0).tolist(),
        "blow_up_fraction": blow_up[:, steps].mean(axis=0).tolist(),
        "worse_fraction": worse[:, steps].mean(axis=0).tolist(),
    }
    if accs is not None:
        mean, ci = mean_ci95(accs[:, steps])
        out.update(accuracy_mean=mean.tolist(), accuracy_ci95=ci.tolist())
    return out


def grouped(
    losses: np.ndarray, accs: np.ndarray | None, masks: dict[str, np.ndarray], steps: list[int], bound: float
) -> dict[str, dict[str, Any]]:
    """`summarize` of each group's own tasks (a mask over the tasks each), with its task count."""
    return {
        label: {"num_tasks": int(m.sum()), **summarize(losses[m], None if accs is None else accs[m], steps, bound)}
        for label, m in masks.items()
    }


def source_groups(store: TaskStore, n: int) -> dict[str, np.ndarray]:
    """Tasks 0..n-1 of a store of several sources, by source (name: a mask); {} otherwise."""
    names = store.info.sources
    if store.drawer is None or not names:
        return {}
    of = store.drawer.sources_of(np.arange(n))
    return {name: of == i for i, name in enumerate(names) if (of == i).any()}


def ways_buckets(store: TaskStore, n: int, most: int = 4) -> dict[str, np.ndarray]:
    """Tasks 0..n-1 of an on-the-fly store whose ways vary, by ways: up to `most` buckets of
    equal width over the store's range ("5-9": a mask over the tasks); {} otherwise."""
    spec = store.info.spec
    if store.drawer is None or spec.ways[0] == spec.ways[1]:
        return {}
    ways = store.drawer.shapes.of(np.arange(n))[:, 0]
    lo, hi = spec.ways
    edges = np.unique(np.linspace(lo, hi + 1, min(most, hi - lo + 1) + 1).round().astype(int))
    out = {}
    for a, b in zip(edges[:-1], edges[1:], strict=False):
        mask = (ways >= a) & (ways < b)
        if mask.any():
            out[f"{a}-{b - 1}" if b - 1 > a else str(a)] = mask
    return out


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{result['num_tasks']} held-out {result['family']} tasks, "
        + (result.get("episodes") or f"{result['shots']} shots, {result['queries']} queries")
        + f", inner lr {result['inner_lr']}, checkpoint step {result['checkpoint_step']} "
        f"({result.get('checkpoint', 'latest')}); "
        f"{result['evaluated_by']}; blow-up: loss non-finite or > {result['blow_up_bound']:.3g}"
    )
    classification = "accuracy_mean" in result
    cols = ["init", "inner steps", "query loss (95% CI)", "median", "blow-ups", "got worse"] + (
        ["accuracy (95% CI)"] if classification else []
    )
    rows = []
    for name, r in [("maml", result), *result.get("baselines", {}).items()]:
        if "inner_lr_tuning" in r:
            grid = {"extended": ", grid extended", "edge": ", best on the grid's edge"}.get(
                r["inner_lr_tuning"]["grid"], ""
            )
            name = f"{name} (lr {r['inner_lr']:g}, tuned{grid})"
        for i, k in enumerate(result["steps"]):
            row = [
                name,
                str(k),
                f"{r['loss_mean'][i]:.4f} ± {r['loss_ci95'][i]:.4f}",
                f"{r['loss_median'][i]:.4f}",
                f"{100 * r['blow_up_fraction'][i]:.1f}%",
                f"{100 * r['worse_fraction'][i]:.1f}%",
            ]
            if classification:
                row.append(f"{r['accuracy_mean'][i]:.4f} ± {r['accuracy_ci95'][i]:.4f}")
            rows.append(row)
    widths = [max(len(c), *(len(r[j]) for r in rows)) for j, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    table = [head, line(cols), line(["-" * w for w in widths]), *map(line, rows)]
    return "\n".join(table + _by_ways(result) + _permutations(result))


def _permutations(result: dict[str, Any]) -> list[str]:
    """`--permutations K`: the meta-model's accuracy over K label assignments of the tasks."""
    p = result.get("permutations")
    if not p:
        return []
    return [
        f"label assignments ({p['assignments']}, accuracy after {p['steps']} inner steps): mean {p['mean']:.4f}, "
        f"std {p['std']:.4f}, spread (max - min) {p['spread']:.4f}"
    ]


def _by_ways(result: dict[str, Any]) -> list[str]:
    """Variable episodes and several sources: each init's score after the most inner steps, by
    ways bucket and by source."""
    metric = "accuracy_mean" if "accuracy_mean" in result else "loss_mean"
    inits = [("maml", result), *result.get("baselines", {}).items()]
    out = []
    for key, what, suffix in (("by_ways", "ways", "-way"), ("by_source", "source", "")):
        if key not in result:
            continue
        out.append(f"by {what} ({metric.split('_')[0]} after {result['steps'][-1]} inner steps):")
        for label, r in result[key].items():
            cells = [f"{name} {i[key][label][metric][-1]:.4f}" for name, i in inits if label in i.get(key, {})]
            out.append(f"  {label:>7}{suffix} ({r['num_tasks']} tasks): " + ", ".join(cells))
    return out
