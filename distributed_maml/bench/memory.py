"""Peak memory per task of one meta-gradient (`bench --memory`, and `bench`'s and `bench --conv4`'s
memory tables): each cell in a fresh process (the CPU's high-water mark cannot be reset within
one): on a CPU the process's peak RSS above what it held before the step, on CUDA
torch.cuda.max_memory_allocated; with the step's time, tasks/s.

Modes: "second" (second order through the unrolled inner loop), "checkpointed"
(maml.checkpoint_inner: one inner step's graph at a time), "recompute" (with
maml.checkpoint_recompute: no step's weights kept either), "first" (first order), "imaml" (the
implicit meta-gradient, imaml_lambda 1 and 5 conjugate-gradient steps).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import torch

from distributed_maml.bench.timing import MODELS, conv4_problem, resnet12_widths
from distributed_maml.config import MamlConfig, ModelConfig
from distributed_maml.core.maml import TaskBatch
from distributed_maml.core.models import build, functional
from distributed_maml.data.writing import build_in_memory

MODES = ("second", "checkpointed", "recompute", "first", "imaml")
BACKBONES = ("conv4", "resnet12")


def available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))


_MEMORY_PROBE = """
import gc, json, sys, time, torch
from distributed_maml.bench.memory import _memory_setup
from distributed_maml.core.maml import meta_gradient
model, mb, channels, queries, steps, mode, device = json.loads(sys.argv[1])
forward, params, batch, kind, cfg = _memory_setup(model, mb, channels, queries, steps, mode, device)
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
seconds = []
for _ in range(2):  # the step's time, warm: the best of two more calls
    start = time.perf_counter()
    meta_gradient(forward, kind, params, batch, cfg, "vmap")
    if device == "cuda":
        torch.cuda.synchronize()
    seconds.append(time.perf_counter() - start)
seconds = min(seconds)
print(json.dumps({"peak_bytes": peak, "before_bytes": before, "seconds": seconds}))
"""


def _memory_setup(
    model: str, meta_batch: int, channels: int, queries: int, steps: int, mode: str, device: str
) -> tuple:
    """The probe's problem: conv4 or resnet12 on glyphs, or one of MODELS on its family; `mode` one of MODES."""
    if model in BACKBONES:
        forward, params, batch = conv4_problem(meta_batch, channels, queries, device, model)
        kind, lr = "classification", 0.4
    else:
        family, shots, q, lr = MODELS[model]
        store = build_in_memory(family, meta_batch, seed=0, shots=shots, queries=q, split="train")
        net = build(ModelConfig(name=model), store.info, seed=0).to(device)
        forward, params = functional(net), {k: v.detach() for k, v in net.named_parameters()}
        batch, kind = TaskBatch.from_numpy(store.rows(np.arange(meta_batch)), device), store.info.kind
    algorithm = "imaml" if mode == "imaml" else "maml"
    chk = {"checkpoint_inner": mode in ("checkpointed", "recompute"), "checkpoint_recompute": mode == "recompute"}
    cfg = MamlConfig(steps, lr, mode == "first", algorithm, **chk)
    return forward, params, batch, kind, cfg


def memory_per_task(
    model: str,
    inner_steps: tuple[int, ...],
    meta_batch: int,
    modes: tuple[str, ...] = ("second",),
    device: str = "cpu",
    channels: int = 32,
    queries: int = 5,
) -> list[dict[str, Any]]:
    """Peak memory of one vmap meta-gradient above what was held before it, per task, and its
    tasks/s: a fresh process per (mode, inner steps)."""
    rows = []
    for mode in modes:
        for steps in inner_steps:
            args = json.dumps([model, meta_batch, channels, queries, steps, mode, device])
            out = subprocess.run(
                [sys.executable, "-c", _MEMORY_PROBE, args], capture_output=True, text=True, check=True
            ).stdout
            m = json.loads(out.strip().splitlines()[-1])
            rows.append(
                {
                    "model": _name(model, channels),
                    "mode": mode,
                    "inner_steps": steps,
                    "first_order": mode == "first",
                    "meta_batch": meta_batch,
                    "mib_per_task": (m["peak_bytes"] - m["before_bytes"]) / meta_batch / 2**20,
                    "tasks_per_s": meta_batch / m["seconds"],
                }
            )
    return rows


def _name(model: str, channels: int) -> str:
    if model == "conv4":
        return f"conv4-{channels}"
    if model == "resnet12":
        return "resnet12-" + "-".join(map(str, resnet12_widths(channels)))
    return model


def memory_main(
    inner_steps: tuple[int, ...],
    modes: tuple[str, ...],
    meta_batch: int,
    channels: int,
    memory_gb: float | None,
    backbone: str = "conv4",
) -> dict[str, Any]:
    """`bench --memory`: conv4 (`channels` filters) or resnet12 (widths scaled from `channels`)
    on 28x28 glyphs, 5-way 1-shot, 5 queries, per mode and inner-step count: MiB per task,
    tasks/s, the cost and memory against the plain second-order step, and the largest meta-batch
    whose step fits in `memory_gb` (default: half of what is free now). Prints a table, then one
    JSON line."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    budget = memory_gb * 2**30 if memory_gb else 0.5 * available_bytes(device)
    rows = memory_per_task(backbone, inner_steps, meta_batch, modes, device, channels)
    plain = {r["inner_steps"]: r for r in rows if r["mode"] == "second"}
    for r in rows:
        r["max_meta_batch"] = int(budget / max(r["mib_per_task"] * 2**20, 1.0))
        base = plain.get(r["inner_steps"])
        r["memory_vs_second"] = r["mib_per_task"] / base["mib_per_task"] if base else None
        r["cost_vs_second"] = base["tasks_per_s"] / r["tasks_per_s"] if base else None
    result = {
        "benchmark": f"{_name(backbone, channels)} meta-gradient memory, 5-way 1-shot 28x28 glyphs, 5 queries, vmap",
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "budget_gib": budget / 2**30,
        "rows": rows,
    }
    lines = [
        f"{result['benchmark']}; {result['device']}, torch {result['torch']}, meta-batch {meta_batch}",
        "mode | inner steps | MiB per task | vs second order | tasks/s | cost vs second order | meta-batch in "
        f"{result['budget_gib']:.1f} GiB",
        "--- | ---: | ---: | ---: | ---: | ---: | ---:",
    ]
    for r in rows:
        mem = "-" if r["memory_vs_second"] is None else f"{r['memory_vs_second']:.2f}x"
        cost = "-" if r["cost_vs_second"] is None else f"{r['cost_vs_second']:.2f}x"
        lines.append(
            f"{r['mode']} | {r['inner_steps']} | {r['mib_per_task']:.1f} | {mem} | {r['tasks_per_s']:.2f} | "
            f"{cost} | {r['max_meta_batch']:,}"
        )
    print("\n".join(lines))
    print(json.dumps(result))
    return result
