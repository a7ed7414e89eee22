"""`distributed-maml bench`: meta-gradient throughput, vmap against a per-task loop.

Both paths compute the same second-order meta-gradient of a meta-batch of sinusoid tasks on
one CPU thread; the loop is the textbook (learn2learn-style) implementation: one task at a time,
torch.autograd.grad(create_graph=True) for the inner step. Prints a table and one JSON line.

`bench --conv4` measures conv4 on 5-way 1-shot glyph tasks instead: the worker's two task maps
(vmap and the per-task loop, the same gradients) at first and second order, 1 and 5 inner steps
and several meta-batches, on this machine's torch threads, and the peak memory per task of the
second-order vmap step at 1, 5 and 10 inner steps (each measured in a fresh process).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from .config import MamlConfig, ModelConfig
from .maml import TaskBatch, meta_gradient
from .models import ParamSpec, build, functional
from .store import build_in_memory


def loop_meta_gradient(
    model: torch.nn.Module, params: dict[str, torch.Tensor], batch: TaskBatch, cfg: MamlConfig
) -> dict[str, torch.Tensor]:
    """The per-task baseline: a Python loop over tasks, autograd with create_graph."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    total = 0.0
    for t in range(len(batch)):
        p = dict(leaves)
        for _ in range(cfg.inner_steps):
            loss = torch.nn.functional.mse_loss(functional_call(model, p, (batch.x_support[t],)), batch.y_support[t])
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=not cfg.first_order)
            p = {k: v - cfg.inner_lr * g for (k, v), g in zip(p.items(), grads, strict=False)}
        total = total + torch.nn.functional.mse_loss(functional_call(model, p, (batch.x_query[t],)), batch.y_query[t])
    grads = torch.autograd.grad(total, list(leaves.values()))
    return dict(zip(leaves, grads, strict=False))


def _time(fn: Callable[[], Any], min_seconds: float, reps: int = 5) -> float:
    """Median seconds per call over `reps` timed rounds of at least min_seconds / reps each."""
    fn()  # warm-up
    rounds = []
    for _ in range(reps):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / reps:
                break
        rounds.append(elapsed / n)
    return statistics.median(rounds)


def run(meta_batches: tuple[int, ...] = (25, 1000), min_seconds: float = 2.0, threads: int = 1) -> dict[str, Any]:
    torch.set_num_threads(threads)
    cfg = MamlConfig(inner_steps=1, inner_lr=0.01)
    rows = []
    for mb in meta_batches:
        store = build_in_memory("sinusoid", mb, seed=0, shots=10, queries=10, split="train")
        model = build(ModelConfig(name="sinusoid_mlp"), store.info, seed=0)
        params = {k: v.detach() for k, v in model.named_parameters()}
        batch = TaskBatch.from_numpy(store.rows(np.arange(mb)))
        spec = ParamSpec.of(model)
        forward = functional(model)
        g_vmap = spec.flatten(meta_gradient(forward, "regression", params, batch, cfg)[0])
        g_loop = spec.flatten(loop_meta_gradient(model, params, batch, cfg))
        agree = float((g_vmap - g_loop).abs().max() / g_loop.abs().max())
        t_vmap = _time(partial(meta_gradient, forward, "regression", params, batch, cfg), min_seconds)
        t_loop = _time(partial(loop_meta_gradient, model, params, batch, cfg), min_seconds)
        rows.append(
            {
                "meta_batch": mb,
                "vmap_tasks_per_s": mb / t_vmap,
                "loop_tasks_per_s": mb / t_loop,
                "speedup": t_loop / t_vmap,
                "max_rel_diff": agree,
            }
        )
    return {
        "benchmark": "meta-gradient throughput, sinusoid MLP 1-40-40-1, 1 inner step, second order",
        "torch_threads": threads,
        "torch": torch.__version__,
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['benchmark']}, {result['torch_threads']} CPU thread(s), torch {result['torch']}",
        "meta-batch | loop tasks/s | vmap tasks/s | speedup",
        "---------- | ------------ | ------------ | -------",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['meta_batch']:>10} | {r['loop_tasks_per_s']:>12,.0f} | {r['vmap_tasks_per_s']:>12,.0f} | "
            f"{r['speedup']:>6.1f}x"
        )
    return "\n".join(lines)


def _conv4_setup(meta_batch: int, channels: int, queries: int, device: str = "cpu") -> tuple:
    from .config import ModelConfig

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
    from tqdm.auto import tqdm

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
            row[f"{task_map}_tasks_per_s"] = mb / _time(call, min_seconds, reps=1)
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
from distributed_maml.bench import _conv4_setup
from distributed_maml.config import MamlConfig
from distributed_maml.maml import meta_gradient
mb, channels, queries, steps, device = json.loads(sys.argv[1])
forward, params, batch = _conv4_setup(mb, channels, queries, device)
cfg = MamlConfig(inner_steps=steps, inner_lr=0.4)
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
if device == "cuda":  # a warm-up first: the caching allocator's own reserve is not the step's
    meta_gradient(forward, "classification", params, batch, cfg, "vmap")
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
else:  # no warm-up (malloc would reuse its pages unseen); reset the peak RSS the setup left
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS:")
meta_gradient(forward, "classification", params, batch, cfg, "vmap")
peak = torch.cuda.max_memory_allocated() if device == "cuda" else status("VmHWM:")
print(json.dumps({"peak_bytes": peak, "before_bytes": before}))
"""


def conv4_memory(
    inner_steps: tuple[int, ...], meta_batch: int, channels: int, queries: int, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Peak memory of one second-order vmap meta-gradient above what was held before it, per
    task: on CUDA, max_memory_allocated; on a CPU, the process's peak RSS (VmHWM, reset after
    the setup; a fresh process per measurement)."""
    import subprocess
    import sys

    rows = []
    for steps in inner_steps:
        args = json.dumps([meta_batch, channels, queries, steps, device])
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, args], capture_output=True, text=True, check=True
        ).stdout
        m = json.loads(out.strip().splitlines()[-1])
        per_task = (m["peak_bytes"] - m["before_bytes"]) / meta_batch
        rows.append({"inner_steps": steps, "meta_batch": meta_batch, "mib_per_task": per_task / 2**20})
    return rows


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


def main(min_seconds: float = 2.0, meta_batches: tuple[int, ...] = (25, 1000)) -> dict[str, Any]:
    result = run(meta_batches, min_seconds=min_seconds)
    print(format_table(result))
    print(json.dumps(result))
    return result
