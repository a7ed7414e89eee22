"""`distributed-maml bench`: a full meta-step's throughput, the project's path against others'.

Every method computes the same meta-gradient of a meta-batch of tasks on one CPU thread, then
Adam: `loop` (the textbook per-task loop), `bare` (the minimal torch.func script,
bench/minimal_script.py), `bare_funcgrad` (the same with the outer gradient by torch.func.grad),
`in_process` (the project's path: store -> executor -> reduction -> Adam), and Ray workers.
`bare`, `bare_funcgrad` and `in_process` are timed in interleaved rounds (best of each), so
their ratio does not depend on what else the machine did meanwhile. Prints a table and one JSON
line. `bench --conv4`: bench/conv4.py; `bench --memory`: bench/memory.py.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distributed_maml.bench import minimal_script
from distributed_maml.bench.baselines import funcgrad_meta_gradient, loop_meta_gradient
from distributed_maml.bench.memory import memory_per_task
from distributed_maml.bench.table import format_table
from distributed_maml.bench.timing import MODELS, time_call, time_interleaved
from distributed_maml.config import MamlConfig, ModelConfig, ScalingConfig
from distributed_maml.core import maml
from distributed_maml.core.learner import Learner
from distributed_maml.core.maml import TaskBatch
from distributed_maml.core.network import assemble
from distributed_maml.data.sampler import Sampler
from distributed_maml.data.writing import build_in_memory
from distributed_maml.errors import UserError
from distributed_maml.execution import factory
from distributed_maml.execution.computer import ShardComputer
from distributed_maml.execution.inprocess import InProcessExecutor
from distributed_maml.execution.stepping import fan_out_in
from distributed_maml.execution.steps import Steps


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
    methods = ["loop", *INTERLEAVED, *(f"ray_{n}" for n in ns), *(f"collective_{n}" for n in ns)]
    gpu = list(GPU_METHODS) if torch.cuda.is_available() else []
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
INTERLEAVED = ("bare", "bare_funcgrad", "in_process")  # timed taking turns: their ratios are the point
# The GPU rows, timed taking turns too: a CUDA-graph script of meta-gradient + Adam (the
# physical reference) and the project's in-process path with the learner on the device, its
# unlogged steps eager or as one CUDA graph each. A call runs COLLECTIVE_CHUNK steps and waits
# for the device once (a run reads the device once per logged step, log_every = 25).
GPU_METHODS = ("bare_graph", "gpu_eager", "gpu_graph")


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
        self.net = assemble(self.model_cfg, self.cfg, self.store.info, seed=0)
        self.model = self.net.model
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

    def script_step(self) -> Callable[[int], None]:
        """The bare row: bench/minimal_script.py's step on this problem's tasks."""
        step, _ = minimal_script.make_step(
            self.model, self.cfg.inner_steps, self.cfg.inner_lr, self.cfg.first_order, minimal_loss(self.kind)
        )
        return lambda i: step(self.batches[i % 8].tensors())

    def graph_script_step(self) -> Callable[[int], None]:
        """The bare_graph row: COLLECTIVE_CHUNK replays of minimal_script's CUDA-graph step on
        this problem's tasks (on the device already), then one wait for the device."""
        batches = [tuple(t.cuda() for t in b.tensors()) for b in self.batches]
        cfg = self.cfg
        step = minimal_script.make_graph_step(
            copy.deepcopy(self.model),
            cfg.inner_steps,
            cfg.inner_lr,
            cfg.first_order,
            minimal_loss(self.kind),
            batches[0],
        )

        def chunk(i: int) -> None:
            for j in range(COLLECTIVE_CHUNK):
                step(batches[(i * COLLECTIVE_CHUNK + j) % 8])
            torch.cuda.synchronize()

        return chunk

    def project_step(
        self, scaling: ScalingConfig, device: str = "cpu"
    ) -> tuple[Callable[[int], None], Any, dict[str, float] | None]:
        """The project's own path: sampler ids -> shards -> executor -> reduction -> Adam; and
        where its time goes (`spent`: seconds in the fan-out/in and in the learner). Collective
        mode: one call runs COLLECTIVE_CHUNK unlogged steps in the group (as between two logged
        steps of a run); its learner works inside rank 0, so `spent` is None."""
        if device == "cpu":
            executor: Any = factory.make(self.store, self.model_cfg, self.cfg, scaling)
        else:
            computer = ShardComputer(
                self.store, self.model_cfg, self.cfg, device, task_map="vmap", gpu_step=scaling.gpu_step
            )
            executor = InProcessExecutor(computer)  # the learner on the device, fused unlogged steps
        learner = Learner(self.net.spec, self.net.initial(), 1e-3, device=device)  # learned step sizes too, if any
        if scaling.mode == "collective" or device != "cpu":

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


def minimal_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss a minimal script calls: torch's own (the project's are core/inner.loss_fn)."""
    return F.cross_entropy if kind == "classification" else F.mse_loss


COLLECTIVE_CHUNK = 25  # steps per collective call in `bench`: training.log_every's default


def _ignore(outcome: object) -> None:
    pass


def communication(n_params: int, workers: int, mode: str) -> dict[str, int]:
    """Bytes a step moves. Driver mode: the weights out (one object-store copy, fetched once by
    each worker) and one summed float32 gradient back from each worker. Collective: rank 0's
    broadcast of the weights and gather of the gradients reach the other ranks only."""
    peers = workers if mode == "driver" else workers - 1
    return {"weights_out_bytes": 4 * n_params * peers, "gradients_in_bytes": 4 * n_params * peers}


def _method(problem: _Problem, method: str) -> tuple[Callable[[int], None], Any, dict[str, float] | None, dict]:
    """(step(i), executor or None, the project's `spent` or None, extra row fields) of a method."""
    if method == "loop":
        return problem.plain_step(loop_meta_gradient), None, None, {}
    if method == "bare":
        return problem.script_step(), None, None, {}
    if method == "bare_funcgrad":
        return problem.plain_step(funcgrad_meta_gradient), None, None, {}
    if method == "bare_graph":
        return problem.graph_script_step(), None, None, {}
    if method.startswith("gpu_"):  # the project's in-process path on cuda:0, eager or graph
        step, executor, spent = problem.project_step(ScalingConfig(num_workers=0, gpu_step=method[4:]), "cuda:0")

        def synced(i: int) -> None:
            step(i)
            torch.cuda.synchronize()

        return synced, executor, spent, {"gpu_step": executor.describe()}
    n = 0 if method == "in_process" else int(method.split("_")[1])
    mode = "collective" if method.startswith("collective") else "driver"
    step, executor, spent = problem.project_step(ScalingConfig(num_workers=n, task_map="vmap", mode=mode))
    return step, executor, spent, communication(problem.net.network_spec.numel, n, mode) if n else {}


def _row(cell: Cell, seconds: float, spent: dict[str, float] | None, extra: dict) -> dict[str, Any]:
    if spent is not None:  # the learner's share of the time the project's path spent
        extra["learner_share"] = spent["learner_s"] / (spent["learner_s"] + spent["workers_s"])
    return {**asdict(cell), "tasks_per_s": cell.meta_batch / seconds, "step_ms": 1e3 * seconds, **extra}


def measure(cell: Cell, min_seconds: float) -> dict[str, Any]:
    """One cell timed alone (median of rounds), with its Ray workers' peak memory."""
    step, executor, spent, extra = _method(_Problem(cell), cell.method)
    per_call = steps_per_call(cell.method)
    try:
        counter = iter(range(10**9))
        seconds = time_call(lambda: step(next(counter)), min_seconds) / per_call
        if executor is not None and hasattr(executor, "worker_info"):  # Ray workers' peak memory
            info = executor.worker_info()
            extra["worker_peak_rss_mib"] = max(i.peak_rss_mib or 0.0 for i in info if i is not None)
            gpu = [i.peak_gpu_mib for i in info if i is not None and i.peak_gpu_mib is not None]
            if gpu:
                extra["worker_peak_gpu_mib"] = max(gpu)
    finally:
        if executor is not None:
            executor.close()
    return _row(cell, seconds, spent, extra)


def measure_interleaved(group: list[Cell], min_seconds: float) -> list[dict[str, Any]]:
    """Cells of one problem (INTERLEAVED methods, in process) timed taking turns, best round each."""
    problem = _Problem(group[0])
    made = {c.method: _method(problem, c.method) for c in group}
    counters = {m: iter(range(10**9)) for m in made}
    steps = {m: (lambda m=m: made[m][0](next(counters[m]))) for m in made}
    c = group[0]
    if "bare" in made and (c.model, c.inner_steps, c.first_order) == ("sinusoid_mlp", 1, False):
        # the same script on its own loop and tasks: bench's harness must not slow the bare row
        steps["script_alone"] = minimal_script.standalone(c.meta_batch, 1)
        made["bare"][3]["script_alone_ms"] = 0.0
    seconds = time_interleaved(steps, min_seconds)
    if "script_alone" in seconds:
        made["bare"][3]["script_alone_ms"] = 1e3 * seconds["script_alone"]
    rows = [_row(c, seconds[c.method] / steps_per_call(c.method), made[c.method][2], made[c.method][3]) for c in group]
    for r in rows:  # the GPU path's cost, measured in the same rounds as its reference
        if r["method"] in GPU_METHODS and "bare_graph" in seconds:
            r["vs_bare_graph"] = seconds["bare_graph"] / seconds[r["method"]]
    return rows


def steps_per_call(method: str) -> int:
    """Meta-steps one timed call runs: a collective chunk, or a GPU chunk (one device wait)."""
    return COLLECTIVE_CHUNK if method.startswith("collective") or method in GPU_METHODS else 1


def gradients_agree(model: str, meta_batch: int = 25) -> float:
    """Max relative difference of the bare script's, the funcgrad variant's and the project's
    meta-gradients from the loop's (second order, 1 inner step) at the same weights."""
    problem = _Problem(Cell("loop", model, meta_batch, 1, False))
    params = {k: v.detach() for k, v in problem.model.named_parameters()}
    spec = problem.net.network_spec
    batch = problem.batches[0]
    ref = spec.flatten(loop_meta_gradient(problem.model, params, batch, problem.cfg, problem.kind))
    ours = maml.meta_gradient(problem.net.forward, problem.kind, params, batch, problem.cfg)[0]
    step, script_params = minimal_script.make_step(
        problem.model, 1, problem.cfg.inner_lr, False, minimal_loss(problem.kind)
    )
    step(batch.tensors())  # its .grad: the mean meta-gradient
    others = [
        spec.flatten(ours),
        spec.flatten(funcgrad_meta_gradient(problem.model, params, batch, problem.cfg, problem.kind)),
        spec.flatten({k: v.grad * len(batch) for k, v in script_params.items()}),
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
    done: dict[Cell, dict[str, Any]] = {}
    with tqdm(total=len(todo), desc="bench", unit="cell", disable=None) as bar:
        for _, group in itertools.groupby(todo, key=lambda c: (c.model, c.meta_batch, c.inner_steps, c.first_order)):
            cells_ = list(group)
            for kind in (INTERLEAVED, GPU_METHODS):
                together = [c for c in cells_ if c.method in kind]
                if together:
                    done.update(zip(together, measure_interleaved(together, min_seconds), strict=True))
                    bar.update(len(together))
            for cell in (c for c in cells_ if c.method not in INTERLEAVED + GPU_METHODS):
                done[cell] = measure(cell, min_seconds)
                bar.update()
    rows = [done[c] for c in todo]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory = [] if quick else memory_per_task("sinusoid_mlp", (1, 5, 10), 1000, ("second", "first"), device)
    return {
        "benchmark": "a full meta-step (meta-gradient + Adam) per method, tasks/s; "
        f"best of interleaved rounds for {', '.join(INTERLEAVED)}, median of rounds for the rest",
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
