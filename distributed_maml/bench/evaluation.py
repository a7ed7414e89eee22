"""`bench --eval`: how long the evaluation protocol takes against training, measured in one run.

A glyph run like the one issue 19 timed (conv4-32, 5-way 1-shot, 15 queries per class, one
inner step of 0.4, meta-batch 16), trained for 2 steps in a temporary folder. Then, on the same
machine and torch threads:

- training: the meta-gradients of `train_tasks` training tasks (1,000 by default), in the
  run's meta-batches, through the run's own step (ShardComputer, its task map);
- evaluation: `eval`'s default protocol (inner steps 0, 1, 5, 10 on `eval_tasks` held-out
  tasks, 600 by default, with both baselines), its phases timed apart: the pretrained
  baseline's training (once per run: cached in the run folder), its step-size tuning, the
  three adaptation curves.

Prints a table, the ratio eval / training with and without the pretraining, and one JSON line.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distributed_maml import config
from distributed_maml.evaluation import evaluate
from distributed_maml.execution import factory
from distributed_maml.training import run, train

GLYPH_RUN = [
    "task.family=glyphs",
    "task.ways=5",
    "task.shots=1",
    "task.queries=15",
    "task.meta_batch=16",
    "task.num_tasks=2000",
    "model.name=conv4",
    "model.channels=32",
    "maml.inner_steps=1",
    "maml.inner_lr=0.4",
    "training.steps=2",
    "training.eval_every=0",
    "scaling.num_workers=0",
]


STEPS = evaluate.DEFAULT_STEPS  # eval's default protocol
INITS = ("maml", "pretrained", "scratch")  # each scored at every step count


def measure(train_tasks: int, eval_tasks: int, pretrain_steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        cfg = config.load(None, GLYPH_RUN)
        r = run.prepare(cfg, Path(tmp) / "run", progress=False)
        train.train(r, train.make_executor(r), progress=False)
        computer = factory.local_computer(r.store, cfg.model, cfg.maml, cfg.scaling, name="bench")
        weights = train.make_learner(r, str(computer.device)).weights()
        mb = cfg.task.meta_batch
        start = time.perf_counter()
        for lo in range(0, train_tasks, mb):
            computer.compute(weights, np.arange(lo, min(lo + mb, train_tasks)) % len(r.store), before=False)
        train_s = time.perf_counter() - start
        # The protocol's floor: scoring a query set, unadapted (curve at step 0), per task; the
        # protocol does it once per reported step count and initialisation for every task.
        ids = np.arange(min(mb, len(r.store)))
        computer.curve(weights, ids, (0,), cfg.maml.inner_lr)
        start = time.perf_counter()
        computer.curve(weights, ids, (0,), cfg.maml.inner_lr)
        score_s = (time.perf_counter() - start) / len(ids)
        result = evaluate.evaluate(Path(tmp) / "run", steps=STEPS, num_tasks=eval_tasks, pretrain_steps=pretrain_steps)
    phases = result["seconds"]
    eval_s = sum(phases.values())
    floor_s = eval_tasks * len(INITS) * len(STEPS) * score_s
    return {
        "benchmark": "eval's default protocol (steps 0,1,5,10, both baselines) vs training meta-gradients, "
        "glyphs conv4-32 5-way 1-shot 15 queries",
        "task_map": computer.task_map,
        "torch_threads": torch.get_num_threads(),
        "train_tasks": train_tasks,
        "train_s": train_s,
        "eval_tasks": eval_tasks,
        "pretrain_steps": pretrain_steps,
        "eval_phases_s": phases,
        "eval_s": eval_s,
        "ratio": eval_s / train_s,
        "ratio_without_pretraining": (eval_s - phases["baselines"]) / train_s,
        "query_scoring_s_per_task": score_s,
        "scoring_floor_s": floor_s,
        "scoring_floor_ratio": floor_s / train_s,
        "pretrained_lr": result["baselines"]["pretrained"]["inner_lr"],
        "pretrained_lr_grid": result["baselines"]["pretrained"]["inner_lr_tuning"]["grid"],
    }


def eval_main(quick: bool = False, as_json: bool = False) -> dict[str, Any]:
    """--quick: a tenth of the work (100 training tasks, 60 held-out tasks, 20 pretraining
    steps); the ratio is of the same scale."""
    out = measure(100, 60, 20) if quick else measure(1000, 600, 200)
    if not as_json:
        p = out["eval_phases_s"]
        print(f"{out['benchmark']}; tasks by {out['task_map']}, {out['torch_threads']} torch threads")
        print("what | tasks | seconds")
        print("---- | ----- | -------")
        print(f"training meta-gradients | {out['train_tasks']} | {out['train_s']:.1f}")
        print(f"eval: pretrained baseline ({out['pretrain_steps']} steps, cached per run) | - | {p['baselines']:.1f}")
        print(f"eval: its step-size tuning (grid {out['pretrained_lr_grid']}) | 100 | {p['tuning']:.1f}")
        print(f"eval: adaptation curves, 3 inits | {out['eval_tasks']} | {p['curves']:.1f}")
        print(
            f"\neval / training: {out['ratio']:.2f}x; without the pretraining (cached after the first eval): "
            f"{out['ratio_without_pretraining']:.2f}x"
        )
        print(
            f"the protocol's floor, scoring the query sets alone ({out['eval_tasks']} tasks x {len(INITS)} inits x "
            f"{len(STEPS)} step counts x {1e3 * out['query_scoring_s_per_task']:.1f} ms): "
            f"{out['scoring_floor_s']:.1f} s = {out['scoring_floor_ratio']:.2f}x training"
        )
    print(json.dumps(out))
    return out
