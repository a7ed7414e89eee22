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
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from . import executor as executor_mod
from . import maml
from .config import MamlConfig, ModelConfig, ScalingConfig
from .errors import UserError
from .learner import Learner
from .maml import TaskBatch, meta_gradient
from .models import ParamSpec, build, functional
from .sampler import Sampler
from .store import build_in_memory
from .worker import InProcessExecutor


def loop_meta_gradient(
    model: torch.nn.Module, params: dict[str, torch.Tensor], batch: TaskBatch, cfg: MamlConfig, kind: str = "regression"
) -> dict[str, torch.Tensor]:
    """The per-task baseline (learn2learn-style): a Python loop over tasks, autograd with
    create_graph (detached inner gradients at first order). Returns the SUM over tasks."""
    loss_fn = maml.loss_fn(kind)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    total = 0.0
    for t in range(len(batch)):
        p = dict(leaves)
        for _ in range(cfg.inner_steps):
            loss = loss_fn(functional_call(model, p, (batch.x_support[t],)), batch.y_support[t])
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=not cfg.first_order)
            p = {k: v - cfg.inner_lr * g for (k, v), g in zip(p.items(), grads, strict=False)}
        total = total + loss_fn(functional_call(model, p, (batch.x_query[t],)), batch.y_query[t])
    grads = torch.autograd.grad(total, list(leaves.values()))
    return dict(zip(leaves, grads, strict=False))


def bare_vmap_meta_gradient(
    model: torch.nn.Module, params: dict[str, torch.Tensor], batch: TaskBatch, cfg: MamlConfig, kind: str = "regression"
) -> dict[str, torch.Tensor]:
    """What a minimal torch.func script does: vmap over tasks, grad of the summed query loss."""
    loss_fn = maml.loss_fn(kind)

    def task(p: dict, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        for _ in range(cfg.inner_steps):
            g = grad(lambda q: loss_fn(functional_call(model, q, (xs,)), ys))(p)
            g = {k: v.detach() for k, v in g.items()} if cfg.first_order else g
            p = {k: p[k] - cfg.inner_lr * g[k] for k in p}
        return loss_fn(functional_call(model, p, (xq,)), yq)

    def total(p: dict) -> torch.Tensor:
        return vmap(task, in_dims=(None, 0, 0, 0, 0))(p, *batch.tensors()).sum()

    return grad(total)({k: v.detach() for k, v in params.items()})


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


MODELS = {"sinusoid_mlp": ("sinusoid", 10, 10, 0.01), "seed_mlp": ("seed", 5, 15, 0.5)}  # family, K, Q, alpha


@dataclass(frozen=True)
class Cell:
    method: str
    model: str
    meta_batch: int
    inner_steps: int
    first_order: bool
    algorithm: str = "maml"


# `bench --algorithms`: each algorithm's [maml] settings (beyond inner steps and step size)
ALGORITHMS: dict[str, dict[str, Any]] = {
    "maml": {},
    "fomaml": {"algorithm": "fomaml"},
    "maml++ (msl)": {"multi_step_loss": True},
    "maml++ (msl+lslr)": {"multi_step_loss": True, "learn_inner_lr": "per-layer-per-step"},
    "meta-sgd": {"algorithm": "meta-sgd"},
    "anil": {"algorithm": "anil"},
    "reptile": {"algorithm": "reptile"},
}


def algorithm_cells() -> list[Cell]:
    """`bench --algorithms`: the project's in-process step of every algorithm, sinusoid MLP."""
    return [
        Cell("in_process", "sinusoid_mlp", mb, k, False, name)
        for mb in (25, 1000)
        for k in (1, 5)
        for name in ALGORITHMS
    ]


def cells(quick: bool, workers: int) -> list[Cell]:
    """The matrix: every method on each model, meta-batch, inner-step count and order; --quick:
    one model, one inner step, second order."""
    ns = range(1, workers + 1)
    methods = ["loop", "bare_vmap", "in_process", *(f"ray_{n}" for n in ns), *(f"collective_{n}" for n in ns)]
    gpu = ["gpu_eager", "gpu_graph"] if torch.cuda.is_available() else []
    models = ("sinusoid_mlp",) if quick else tuple(MODELS)
    steps_orders = [(1, False)] if quick else [(1, False), (5, False), (1, True), (5, True)]
    return [
        Cell(m, model, mb, k, fo)
        for model in models
        for mb in (25, 1000, GPU_META_BATCH)
        for k, fo in steps_orders
        for m in (methods + gpu if mb < GPU_META_BATCH else gpu)
        if not (m == "loop" and mb == 1000 and k == 5)  # minutes per cell, and the ratio is already clear at 1 step
    ]


GPU_META_BATCH = 16_384  # the GPU rows' large meta-batch (the CPU methods stop at 1000)


class _Problem:
    """One (model, meta-batch, inner steps, order) problem, its tasks, and a step per method."""

    def __init__(self, cell: Cell) -> None:
        family, shots, queries, lr = MODELS[cell.model]
        self.cfg = MamlConfig(
            inner_steps=cell.inner_steps, inner_lr=lr, first_order=cell.first_order, **ALGORITHMS[cell.algorithm]
        )
        self.store = build_in_memory(family, 8 * cell.meta_batch, seed=0, shots=shots, queries=queries, split="train")
        self.kind = self.store.info.kind
        self.model_cfg = ModelConfig(name=cell.model)
        self.model = build(self.model_cfg, self.store.info, seed=0)
        self.sampler = Sampler(0, len(self.store), cell.meta_batch)
        # the baselines' data: the same tasks, gathered once (a bare script's tasks are tensors already)
        self.batches = [TaskBatch.from_numpy(self.store.rows(self.sampler.ids(i))) for i in range(8)]

    def plain_step(self, meta_gradient_fn: Callable[..., dict]) -> Callable[[int], None]:
        params = {k: v.detach().clone().requires_grad_(True) for k, v in self.model.named_parameters()}
        opt = torch.optim.Adam(params.values(), lr=1e-3)

        def step(i: int) -> None:
            grads = meta_gradient_fn(self.model, params, self.batches[i % 8], self.cfg, self.kind)
            for k, v in params.items():
                v.grad = grads[k] / len(self.batches[0])
            opt.step()

        return step

    def project_step(
        self, scaling: ScalingConfig, device: str = "cpu"
    ) -> tuple[Callable[[int], None], Any, dict[str, float] | None]:
        """The project's own path: sampler ids -> shards -> executor -> reduction -> Adam; and
        where its time goes (`spent`: seconds in the fan-out/in and in the learner). Collective
        mode: one call runs COLLECTIVE_CHUNK unlogged steps in the group (as between two logged
        steps of a run); its learner works inside rank 0, so `spent` is None."""
        from .stepping import Steps, fan_out_in

        if device == "cpu":
            executor: Any = executor_mod.make(self.store, self.model_cfg, self.cfg, scaling)
        else:
            executor = InProcessExecutor(self.store, self.model_cfg, self.cfg, "vmap", scaling.gpu_step, device)
        spec = maml.meta_spec(self.cfg, ParamSpec.of(self.model))  # learned step sizes too, if any
        initial = maml.with_learned_lrs(self.cfg, dict(self.model.named_parameters()), self.cfg.inner_lr)
        learner = Learner(spec, spec.flatten(initial), 1e-3)
        if scaling.mode == "collective":

            def chunk(i: int) -> None:
                first = i * COLLECTIVE_CHUNK + 1
                steps = Steps(first, first + COLLECTIVE_CHUNK - 1, log_last=False, stop_on_nonfinite=True)
                executor.run_steps(learner, self.sampler, steps, _ignore)

            return chunk, executor, None
        spent = {"workers_s": 0.0, "learner_s": 0.0}

        def step(i: int) -> None:
            t0 = time.perf_counter()
            _, reduced = fan_out_in(executor, learner, self.sampler.ids(i), before=False)  # an unlogged step
            t1 = time.perf_counter()
            learner.apply(reduced.grad)
            spent["workers_s"] += t1 - t0
            spent["learner_s"] += time.perf_counter() - t1

        return step, executor, spent


COLLECTIVE_CHUNK = 25  # steps per collective call in `bench`: training.log_every's default


def _ignore(outcome: object) -> None:
    pass


def communication(n_params: int, workers: int, mode: str) -> dict[str, int]:
    """Bytes a step moves. Driver mode: the weights out (one object-store copy, fetched once by
    each worker) and one summed float32 gradient back from each worker. Collective: rank 0's
    broadcast of the weights and gather of the gradients reach the other ranks only."""
    peers = workers if mode == "driver" else workers - 1
    return {"weights_out_bytes": 4 * n_params * peers, "gradients_in_bytes": 4 * n_params * peers}


def measure(cell: Cell, min_seconds: float) -> dict[str, Any]:
    problem, executor, spent, extra = _Problem(cell), None, None, {}
    if cell.method == "loop":
        step = problem.plain_step(loop_meta_gradient)
    elif cell.method == "bare_vmap":
        step = problem.plain_step(bare_vmap_meta_gradient)
    elif cell.method.startswith("gpu_"):  # the project's in-process path on cuda:0, eager or graph
        step, executor, spent = problem.project_step(ScalingConfig(num_workers=0, gpu_step=cell.method[4:]), "cuda")
        extra = {"gpu_step": executor.computer.step_kind}
    else:
        n = 0 if cell.method == "in_process" else int(cell.method.split("_")[1])
        mode = "collective" if cell.method.startswith("collective") else "driver"
        step, executor, spent = problem.project_step(ScalingConfig(num_workers=n, task_map="vmap", mode=mode))
        if n:
            extra = communication(ParamSpec.of(problem.model).numel, n, mode)
    per_call = COLLECTIVE_CHUNK if cell.method.startswith("collective") else 1
    try:
        counter = iter(range(10**9))
        seconds = _time(lambda: step(next(counter)), min_seconds) / per_call
        if executor is not None and hasattr(executor, "worker_info"):  # Ray workers' peak memory
            info = executor.worker_info()
            extra["worker_peak_rss_mib"] = max(i["peak_rss_mib"] or 0.0 for i in info)
            if info[0]["peak_gpu_mib"] is not None:
                extra["worker_peak_gpu_mib"] = max(i["peak_gpu_mib"] for i in info)
    finally:
        if executor is not None:
            executor.close()
    if spent is not None:  # the learner's share of the time the project's path spent
        extra["learner_share"] = spent["learner_s"] / (spent["learner_s"] + spent["workers_s"])
    return {**asdict(cell), "tasks_per_s": cell.meta_batch / seconds, "step_ms": 1e3 * seconds, **extra}


def gradients_agree(model: str, meta_batch: int = 25) -> float:
    """Max relative difference of the loop's, the bare script's and the project's meta-gradients
    (second order, 1 inner step) at the same weights: the methods compute the same thing."""
    problem = _Problem(Cell("loop", model, meta_batch, 1, False))
    params = {k: v.detach() for k, v in problem.model.named_parameters()}
    spec = ParamSpec.of(problem.model)
    batch = problem.batches[0]
    ours = maml.meta_gradient(functional(problem.model), problem.kind, params, batch, problem.cfg)[0]
    ref = spec.flatten(loop_meta_gradient(problem.model, params, batch, problem.cfg, problem.kind))
    others = [
        spec.flatten(ours),
        spec.flatten(bare_vmap_meta_gradient(problem.model, params, batch, problem.cfg, problem.kind)),
    ]
    return max(float((g - ref).abs().max() / ref.abs().max()) for g in others)


def run(
    quick: bool = False, min_seconds: float = 1.0, workers: int | None = None, methods: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Every cell in one process tree, one torch thread per process (Ray workers: one CPU each);
    `methods`: only those."""
    torch.set_num_threads(1)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 4)
    todo = [c for c in cells(quick, workers) if methods is None or c.method in methods]
    if not todo:
        raise UserError(f"--methods {','.join(methods or ())} names no method this machine runs (see `bench --help`)")
    rows = []
    for cell in tqdm(todo, desc="bench", unit="cell", disable=None):
        rows.append(measure(cell, min_seconds))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory = [] if quick else memory_per_task("sinusoid_mlp", (1, 5, 10), 1000, (False, True), device)
    return {
        "benchmark": "a full meta-step (meta-gradient + Adam) per method, tasks/s; median of timed rounds after warm-up",
        "rows": rows,
        "memory": memory,
        "gradients_max_rel_diff": {m: gradients_agree(m) for m in ({r["model"] for r in rows})},
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": 1,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
    }


def format_table(result: dict[str, Any]) -> str:
    """One line per problem, one column per method (tasks/s), and in_process / bare_vmap."""
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    problems = list(dict.fromkeys((r["model"], r["meta_batch"], r["inner_steps"], r["first_order"]) for r in rows))
    speed = {
        (r["model"], r["meta_batch"], r["inner_steps"], r["first_order"], r["method"]): r["tasks_per_s"] for r in rows
    }
    head = ["model", "meta-batch", "steps", "order", *methods, "in_process/bare_vmap"]
    lines = [
        f"{result['benchmark']}; {result['machine']['cpus']} CPUs, torch {result['machine']['torch']}",
        " | ".join(head),
        " | ".join("-" * len(h) for h in head),
    ]
    for p in problems:
        cols = [speed.get((*p, m)) for m in methods]
        ratio = speed.get((*p, "in_process"), 0) / speed[(*p, "bare_vmap")] if (*p, "bare_vmap") in speed else None
        lines.append(
            " | ".join(
                [p[0], str(p[1]), str(p[2]), "first" if p[3] else "second"]
                + ["-" if c is None else f"{c:,.0f}" for c in cols]
                + ["-" if ratio is None else f"{ratio:.2f}x"]
            )
        )
    agree = ", ".join(f"{m} {d:.1e}" for m, d in result["gradients_max_rel_diff"].items())
    lines += ["", f"meta-gradients agree (max rel diff vs the loop): {agree}", ""]
    lines += [
        "the project's path | model | meta-batch | steps | order | learner share | KiB out / in per step "
        "| worker peak RSS MiB",
        "------------------ | ----- | ---------- | ----- | ----- | ------------- | --------------------- "
        "| -------------------",
    ]
    for r in rows:
        if r["method"] not in ("loop", "bare_vmap"):
            kib = (
                f"{r['weights_out_bytes'] / 1024:.1f} / {r['gradients_in_bytes'] / 1024:.1f}"
                if "weights_out_bytes" in r
                else "- (in-process)"
            )
            rss = f"{r['worker_peak_rss_mib']:.0f}" if "worker_peak_rss_mib" in r else "-"
            share = f"{100 * r['learner_share']:.1f}%" if "learner_share" in r else "- (in rank 0)"
            lines.append(
                f"{r['method']} | {r['model']} | {r['meta_batch']} | {r['inner_steps']} | "
                f"{'first' if r['first_order'] else 'second'} | {share} | {kib} | {rss}"
            )
    if result.get("memory"):
        lines += ["", "peak memory per task (vmap) | model | meta-batch | inner steps | order | MiB per task"]
        lines += [
            f"| {r['model']} | {r['meta_batch']} | {r['inner_steps']} | {'first' if r['first_order'] else 'second'} "
            f"| {r['mib_per_task']:.3f}"
            for r in result["memory"]
        ]
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
from distributed_maml.bench import _memory_setup
from distributed_maml.maml import meta_gradient
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
    import subprocess
    import sys

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


def main(
    min_seconds: float = 1.0,
    quick: bool = False,
    workers: int | None = None,
    as_json: bool = False,
    methods: tuple[str, ...] | None = None,
) -> dict:
    result = run(quick, min_seconds, workers, methods)
    if not as_json:
        print(format_table(result))
    print(json.dumps(result))  # the last line, always: {"rows": [...], "machine": {...}, ...}
    return result


def algorithms_main(min_seconds: float = 1.0, as_json: bool = False) -> dict[str, Any]:
    """`bench --algorithms`: each algorithm's full in-process meta-step on the sinusoid MLP (one
    torch thread), as tasks/s and relative to MAML's cost per step."""
    torch.set_num_threads(1)
    rows = [measure(cell, min_seconds) for cell in tqdm(algorithm_cells(), desc="bench", unit="cell", disable=None)]
    maml_speed = {(r["meta_batch"], r["inner_steps"]): r["tasks_per_s"] for r in rows if r["algorithm"] == "maml"}
    for r in rows:
        r["cost_vs_maml"] = maml_speed[(r["meta_batch"], r["inner_steps"])] / r["tasks_per_s"]
    result = {"benchmark": "in-process meta-step per algorithm, sinusoid MLP, tasks/s", "rows": rows}
    if not as_json:
        print("algorithm | meta-batch | inner steps | tasks/s | cost per step vs maml")
        print("--------- | ---------- | ----------- | ------- | ---------------------")
        for r in rows:
            print(
                f"{r['algorithm']} | {r['meta_batch']} | {r['inner_steps']} | {r['tasks_per_s']:,.0f} | "
                f"{r['cost_vs_maml']:.2f}x"
            )
    print(json.dumps(result))
    return result
