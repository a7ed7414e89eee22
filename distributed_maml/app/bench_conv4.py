"""`bench --conv4` and `bench`'s memory table: conv4 on 5-way 1-shot glyph tasks, the worker's
two task maps (vmap and the per-task loop, the same gradients) at first and second order, and
the peak memory per task of the second-order vmap step at 1, 5 and 10 inner steps (each cell
measured in a fresh process: the CPU's high-water mark cannot be reset within one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from distributed_maml.app.timing import MODELS, time_call
from distributed_maml.config import MamlConfig, ModelConfig
from distributed_maml.core.maml import TaskBatch, meta_gradient
from distributed_maml.core.models import build, functional
from distributed_maml.data.writing import build_in_memory


def _conv4_setup(meta_batch: int, channels: int, queries: int, device: str = "cpu") -> tuple:
    store = build_in_memory("glyphs", meta_batch, seed=0, shots=1, queries=queries, split="train")
    model = build(ModelConfig(name="conv4", channels=channels), store.info, seed=0).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = TaskBatch.from_numpy(store.rows(np.arange(meta_batch)), device)
    return functional(model), params, batch


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

    combos = [(fo, k, mb) for fo in (True, False) for k in (1, 5) for mb in meta_batches]
    rows = []
    for first_order, steps, mb in tqdm(combos, desc="conv4 bench", unit="config", disable=None):
        forward, params, batch = _conv4_setup(mb, channels, queries, device)
        cfg = MamlConfig(inner_steps=steps, inner_lr=0.4, first_order=first_order)
        grads = {}
        row: dict[str, Any] = {"model": f"conv4-{channels}", "meta_batch": mb, "inner_steps": steps}
        row["first_order"] = first_order
        for task_map in ("vmap", "loop"):
            if task_map == "vmap" and vmap_budget is not None and mb > vmap_budget.get(steps, mb):
                row["vmap_tasks_per_s"] = None  # would not fit: measured memory per task x meta-batch
                continue
            call = partial(meta_gradient, forward, "classification", params, batch, cfg, task_map)
            grads[task_map] = torch.cat([g.reshape(-1) for g in call()[0].values()])
            row[f"{task_map}_tasks_per_s"] = mb / time_call(call, min_seconds, reps=1)
        if "vmap" in grads:
            scale = float(grads["loop"].abs().max())
            row["max_rel_diff"] = float((grads["vmap"] - grads["loop"]).abs().max()) / scale
            row["faster"] = "vmap" if row["vmap_tasks_per_s"] > row["loop_tasks_per_s"] else "loop"
        else:
            row["max_rel_diff"], row["faster"] = None, "loop (vmap out of memory)"
        rows.append(row)
    return rows


def _available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))


_MEMORY_PROBE = """
import gc, json, sys, torch
from distributed_maml.app.bench_conv4 import _memory_setup
from distributed_maml.core.maml import meta_gradient
model, mb, channels, queries, steps, first_order, device = json.loads(sys.argv[1])
forward, params, batch, kind, cfg = _memory_setup(model, mb, channels, queries, steps, first_order, device)
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
if device == "cuda":  # a warm-up first: the caching allocator's own reserve is not the step's
    meta_gradient(forward, kind, params, batch, cfg, "vmap")
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
else:  # no warm-up (malloc would reuse its pages unseen); reset the peak RSS the setup left
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS:")
meta_gradient(forward, kind, params, batch, cfg, "vmap")
peak = torch.cuda.max_memory_allocated() if device == "cuda" else status("VmHWM:")
print(json.dumps({"peak_bytes": peak, "before_bytes": before}))
"""


def _memory_setup(
    model: str, meta_batch: int, channels: int, queries: int, steps: int, first_order: bool, device: str
) -> tuple:
    """The probe's problem: conv4 on glyphs, or one of MODELS on its family."""
    if model == "conv4":
        forward, params, batch = _conv4_setup(meta_batch, channels, queries, device)
        return forward, params, batch, "classification", MamlConfig(steps, 0.4, first_order)
    family, shots, q, lr = MODELS[model]
    store = build_in_memory(family, meta_batch, seed=0, shots=shots, queries=q, split="train")
    net = build(ModelConfig(name=model), store.info, seed=0).to(device)
    params = {k: v.detach() for k, v in net.named_parameters()}
    batch = TaskBatch.from_numpy(store.rows(np.arange(meta_batch)), device)
    return functional(net), params, batch, store.info.kind, MamlConfig(steps, lr, first_order)


def memory_per_task(
    model: str,
    inner_steps: tuple[int, ...],
    meta_batch: int,
    first_order: tuple[bool, ...] = (False,),
    device: str = "cpu",
    channels: int = 32,
    queries: int = 5,
) -> list[dict[str, Any]]:
    """Peak memory of one vmap meta-gradient above what was held before it, per task: on CUDA,
    max_memory_allocated; on a CPU, the process's peak RSS (VmHWM, reset after the setup; a
    fresh process per measurement)."""
    rows = []
    for fo in first_order:
        for steps in inner_steps:
            args = json.dumps([model, meta_batch, channels, queries, steps, fo, device])
            out = subprocess.run(
                [sys.executable, "-c", _MEMORY_PROBE, args], capture_output=True, text=True, check=True
            ).stdout
            m = json.loads(out.strip().splitlines()[-1])
            per_task = (m["peak_bytes"] - m["before_bytes"]) / meta_batch
            rows.append(
                {
                    "model": model,
                    "inner_steps": steps,
                    "first_order": fo,
                    "meta_batch": meta_batch,
                    "mib_per_task": per_task / 2**20,
                }
            )
    return rows


def conv4_memory(
    inner_steps: tuple[int, ...], meta_batch: int, channels: int, queries: int, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Second-order conv4 memory per task (see memory_per_task)."""
    return memory_per_task("conv4", inner_steps, meta_batch, (False,), device, channels, queries)


def conv4_main(
    meta_batches: tuple[int, ...], channels: int, queries: int, min_seconds: float, threads: int | None
) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if threads:
        torch.set_num_threads(threads)
    memory = conv4_memory((1, 5, 10), min(max(meta_batches), 32), channels, queries, device)
    # a vmap step must fit in half the free memory (second order bounds first order from above)
    budget = {r["inner_steps"]: int(0.5 * _available_bytes(device) / (r["mib_per_task"] * 2**20)) for r in memory}
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
