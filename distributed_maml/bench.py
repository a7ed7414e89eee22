"""`distributed-maml bench`: meta-gradient throughput, vmap against a per-task loop.

Both paths compute the same second-order meta-gradient of a meta-batch of sinusoid tasks on
one CPU thread; the loop is the textbook (learn2learn-style) implementation: one task at a time,
torch.autograd.grad(create_graph=True) for the inner step. Prints a table and one JSON line.
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


def main(min_seconds: float = 2.0, meta_batches: tuple[int, ...] = (25, 1000)) -> dict[str, Any]:
    result = run(meta_batches, min_seconds=min_seconds)
    print(format_table(result))
    print(json.dumps(result))
    return result
