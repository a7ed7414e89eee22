"""`bench --paper`: the MAML paper's mini-ImageNet setting on synthetic images, and its wall time.

Finn et al. 2017 trained mini-ImageNet 5-way 1-shot with conv4 of 32 filters on 84x84x3 images,
15 query images per class, 5 inner steps (second order), meta-batch 4, for 60,000 meta-steps.
This times that meta-step through the project's own in-process path (a task store, the
ShardComputer, the learner on the run's device: fused steps, one CUDA graph a step on a GPU)
on random images of that shape (the arithmetic does not depend on what the pixels show), and
projects the wall time of 60,000 steps on this machine.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import torch

from distributed_maml.config import MamlConfig, ModelConfig, ScalingConfig
from distributed_maml.core.learner import Learner
from distributed_maml.core.network import assemble
from distributed_maml.data.families.images import ImageTable
from distributed_maml.data.format import image_info
from distributed_maml.data.sampler import Sampler
from distributed_maml.data.store import TaskStore
from distributed_maml.data.writing import Plan, plan_in_memory
from distributed_maml.execution import factory
from distributed_maml.execution.inprocess import InProcessExecutor
from distributed_maml.execution.steps import Steps

PAPER_STEPS = 60_000
WAYS, SHOTS, QUERIES, META_BATCH, INNER_STEPS, INNER_LR, CHANNELS = 5, 1, 15, 4, 5, 0.01, 32
SHAPE = (3, 84, 84)
CLASSES, PER_CLASS = 64, 20  # mini-ImageNet has 64 training classes (of 600 images each)


def synthetic_store(num_tasks: int = 256, seed: int = 0) -> TaskStore:
    """5-way 1-shot tasks over CLASSES classes of random 84x84x3 images, in memory."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(CLASSES * PER_CLASS, *SHAPE), dtype=np.uint8)
    labels = np.repeat(np.arange(CLASSES, dtype=np.int32), PER_CLASS)
    table = ImageTable(images, labels, tuple(f"class{c}" for c in range(CLASSES)))
    info = image_info("paper-synthetic-84", table, num_tasks, seed, WAYS, SHOTS, QUERIES, "train")
    return plan_in_memory(Plan(info, table=table), "<synthetic mini-ImageNet-shaped tasks>")


def measure(steps: int, device: str, precision: str = "fp32") -> dict[str, Any]:
    """Seconds per meta-step over `steps` unlogged steps (after a warm-up chunk that also
    captures the graph), on `device` ("auto", "cpu", "cuda")."""
    store = synthetic_store()
    model = ModelConfig(name="conv4", channels=CHANNELS)
    maml = MamlConfig(inner_steps=INNER_STEPS, inner_lr=INNER_LR)
    scaling = ScalingConfig(num_workers=0, device=device, precision=precision)  # type: ignore[arg-type]
    executor = InProcessExecutor(factory.local_computer(store, model, maml, scaling, name="paper"))
    c = executor.computer
    net = assemble(model, maml, store.info, seed=0)
    learner = Learner(net.spec, net.initial(), 1e-3, device=str(c.device))
    sampler = Sampler(0, len(store), META_BATCH)
    sync = torch.cuda.synchronize if c.device.type == "cuda" else (lambda: None)
    warm = min(steps, 3)
    executor.run_steps(learner, sampler, Steps(1, warm, False, True), _ignore)
    sync()
    start = time.perf_counter()
    executor.run_steps(learner, sampler, Steps(warm + 1, warm + steps, False, True), _ignore)
    sync()
    per_step = (time.perf_counter() - start) / steps
    return {
        "benchmark": "the MAML paper's mini-ImageNet meta-step on synthetic 84x84x3 tasks: conv4-32, 5-way 1-shot, "
        "15 queries, 5 inner steps, second order, meta-batch 4",
        "device": c.where,
        "step_kind": executor.describe(),
        "task_map": c.task_map,
        "precision": precision,
        "steps_timed": steps,
        "step_ms": 1e3 * per_step,
        "tasks_per_s": META_BATCH / per_step,
        "projected_hours_for_60000_steps": PAPER_STEPS * per_step / 3600,
        "torch": torch.__version__,
    }


def _ignore(outcome: object) -> None:
    pass


def paper_main(steps: int | None = None, as_json: bool = False, device: str = "auto") -> dict[str, Any]:
    """`steps`: how many meta-steps to time (default 50 on a GPU, 3 on a CPU: a step there is seconds)."""
    cuda = torch.cuda.is_available() and device != "cpu"
    steps = steps or (50 if cuda else 3)
    print(
        f"bench --paper: timing {steps} meta-steps of the paper's mini-ImageNet setting ...",
        file=sys.stderr,
        flush=True,
    )
    out = measure(steps, device)
    if not as_json:
        print(f"{out['benchmark']}; {out['device']}; {out['step_kind']}")
        print(
            f"{out['step_ms']:.1f} ms per meta-step ({out['tasks_per_s']:.1f} tasks/s): 60,000 meta-steps would take "
            f"{out['projected_hours_for_60000_steps']:.2f} h on this machine"
        )
    print(json.dumps(out))
    return out
