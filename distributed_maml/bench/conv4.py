"""`bench --conv4`: conv4 on 5-way 1-shot glyph tasks, the worker's two task maps (vmap and the
per-task loop, the same gradients) at first and second order, and the peak memory per task of
the second-order vmap step at 1, 5 and 10 inner steps (bench/memory.py).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from distributed_maml.bench.memory import available_bytes, memory_per_task
from distributed_maml.bench.timing import conv4_problem, time_call
from distributed_maml.config import MamlConfig
from distributed_maml.core.maml import meta_gradient


def conv4_rows(
    meta_batches: tuple[int, ...],
    channels: int,
    queries: int,
    min_seconds: float,
    device: str = "cpu",
    vmap_budget: dict[int, int] | None = None,
) -> list[dict[str, Any]]:
    """tasks/s of both task maps for every (order, inner steps, meta-batch), with a check that
    their gradients agree. `vmap_budget`: inner steps -> the largest meta-batch whose vmap step
    fits in memory (a vmap step holds every task's graph at once; the loop holds one task's)."""

    combos = [(fo, k, mb) for fo in (True, False) for k in (1, 5) for mb in sorted(meta_batches)]
    rows = []
    loop_rate: dict[tuple[bool, int], float] = {}  # a task at a time: its rate does not depend on the meta-batch
    # disable=False: a device check pipes stderr to a file; a bar that never prints looks like a hang
    for first_order, steps, mb in tqdm(combos, desc="conv4 bench", unit="config", disable=False, mininterval=5):
        forward, params, batch = conv4_problem(mb, channels, queries, device)
        cfg = MamlConfig(inner_steps=steps, inner_lr=0.4, first_order=first_order)
        grads = {}
        row: dict[str, Any] = {"model": f"conv4-{channels}", "meta_batch": mb, "inner_steps": steps}
        row["first_order"] = first_order
        for task_map in ("vmap", "loop"):
            if task_map == "vmap" and vmap_budget is not None and mb > vmap_budget.get(steps, mb):
                row["vmap_tasks_per_s"] = None  # would not fit: measured memory per task x meta-batch
                continue
            if task_map == "loop" and device != "cpu" and (first_order, steps) in loop_rate:
                # on a GPU the loop is ~100x slower than vmap: timing it at every meta-batch was
                # most of the grid's time (the default grid did not end in 150 s on an H200)
                row["loop_tasks_per_s"] = loop_rate[(first_order, steps)]
                continue
            call = partial(meta_gradient, forward, "classification", params, batch, cfg, task_map)
            grads[task_map] = torch.cat([g.reshape(-1) for g in call()[0].values()])
            row[f"{task_map}_tasks_per_s"] = mb / time_call(call, min_seconds, reps=1)
            if task_map == "loop":
                loop_rate[(first_order, steps)] = row["loop_tasks_per_s"]
        if "vmap" in grads and "loop" in grads:
            scale = float(grads["loop"].abs().max())
            row["max_rel_diff"] = float((grads["vmap"] - grads["loop"]).abs().max()) / scale
            row["faster"] = "vmap" if row["vmap_tasks_per_s"] > row["loop_tasks_per_s"] else "loop"
        elif "vmap" in grads:  # the loop's rate from a smaller meta-batch; its gradients were compared there
            row["max_rel_diff"] = None
            row["faster"] = "vmap" if row["vmap_tasks_per_s"] > row["loop_tasks_per_s"] else "loop"
        else:
            row["max_rel_diff"], row["faster"] = None, "loop (vmap out of memory)"
        rows.append(row)
    return rows


def conv4_memory(
    inner_steps: tuple[int, ...], meta_batch: int, channels: int, queries: int, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Second-order conv4 memory per task (see memory_per_task)."""
    return memory_per_task("conv4", inner_steps, meta_batch, ("second",), device, channels, queries)


def conv4_main(
    meta_batches: tuple[int, ...], channels: int, queries: int, min_seconds: float, threads: int | None
) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if threads:
        torch.set_num_threads(threads)
    memory = conv4_memory((1, 5, 10), min(max(meta_batches), 32), channels, queries, device)
    # a vmap step must fit in half the free memory (second order bounds first order from above)
    budget = {r["inner_steps"]: int(0.5 * available_bytes(device) / (r["mib_per_task"] * 2**20)) for r in memory}
    result = {
        "benchmark": f"conv4 ({channels} filters) meta-gradient, 5-way 1-shot glyphs, {queries} queries per class",
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": conv4_rows(meta_batches, channels, queries, min_seconds, device, budget),
        "memory": memory,
    }
    lines = [
        f"{result['benchmark']}; {result['device']}, {result['torch_threads']} thread(s), torch {result['torch']}",
        "order  | inner steps | meta-batch | vmap tasks/s | loop tasks/s | faster | max rel diff",
        "------ | ----------- | ---------- | ------------ | ------------ | ------ | ------------",
    ]
    for r in result["rows"]:
        vmap = "out of mem" if r["vmap_tasks_per_s"] is None else f"{r['vmap_tasks_per_s']:,.1f}"
        diff = "-" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.1e}"
        lines.append(
            f"{'first' if r['first_order'] else 'second':<6} | {r['inner_steps']:>11} | {r['meta_batch']:>10} | "
            f"{vmap:>12} | {r['loop_tasks_per_s']:>12,.1f} | {r['faster']:<6} | {diff}"
        )
    lines += ["", "second order, vmap | inner steps | meta-batch | peak MiB per task", "--- | ---: | ---: | ---:"]
    lines += [f"| {r['inner_steps']} | {r['meta_batch']} | {r['mib_per_task']:.2f}" for r in result["memory"]]
    print("\n".join(lines))
    print(json.dumps(result))
    return result
