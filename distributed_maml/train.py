"""The meta-training loop. The whole algorithm is on this page:

    ids of step s (sampler) -> shards -> workers: summed meta-gradients -> learner: mean, Adam

Everything else (config, run folder, store, Ray) is set up before the loop and passed in.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm.auto import tqdm

from . import checkpoint, models, stopping
from . import executor as executor_mod
from .errors import CheckpointError, TrainingError, os_error_line, with_filename
from .executor import Executor
from .learner import Learner, Reduced, reduce_shards
from .run import Run
from .sampler import Sampler, split_shards
from .store import build_in_memory
from .tasks import FROM_FILES
from .worker import ShardComputer, ShardResult


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    weights: np.ndarray
    last_metrics: dict[str, Any]


def make_executor(run: Run) -> Executor:
    return executor_mod.make(run.store, run.cfg.model, run.cfg.maml, run.cfg.scaling)


def make_learner(run: Run) -> Learner:
    model = models.build(run.cfg.model, run.store.info, seed=run.cfg.training.seed)
    spec = models.ParamSpec.of(model)
    learner = Learner(spec, spec.flatten(dict(model.named_parameters())), run.cfg.optimizer.lr)
    if run.start is not None:
        learner.load(run.start.model, run.start.optimizer, run.start.version)
    return learner


def save_checkpoint(run: Run, learner: Learner, step: int, sampler: Sampler) -> Path:
    state = checkpoint.RunState(run.cfg, sampler, run.store_ref)
    keep = run.cfg.training.keep_checkpoints
    return checkpoint.save(
        run.dir, step, learner.version, learner.state_dict(), learner.optimizer.state_dict(), state, keep
    )


def fan_out_in(
    executor: Executor, learner: Learner, ids: np.ndarray, before: bool = True
) -> tuple[list[ShardResult], Reduced]:
    """One step's work: the ids split into the executor's shards, computed at the learner's
    weights (waiting for the slowest shard), reduced in shard order (`before`: with the unadapted
    metrics, for a logged step). `bench` times this too."""
    shards = split_shards(ids, executor.num_shards)
    results = executor.compute(learner.weights(), learner.version, shards, before)
    return results, reduce_shards(results)


def _is_finite(reduced: Reduced) -> bool:
    return bool(np.isfinite(reduced.grad).all()) and all(math.isfinite(v) for v in reduced.metrics.values())


def timing(results: list[ShardResult], wall_s: float, update_s: float) -> dict[str, Any]:
    """Where a step's time went: mean worker compute, how long the fastest worker idled for the
    slowest (stragglers), what Ray's calls and transfers added, and the learner's update."""
    compute = [r.compute_s for r in results]
    slowest = max(range(len(results)), key=lambda i: compute[i])
    return {
        "compute_s": float(np.mean(compute)),
        "straggler_s": max(compute) - min(compute),
        "overhead_s": max(0.0, wall_s - max(compute)),
        "update_s": update_s,
        "slowest_worker": results[slowest].worker,
    }


def heldout_scorer(run: Run) -> Callable[[np.ndarray], float] | None:
    """The mean post-adaptation query loss on a fixed set of held-out tasks (None if off)."""
    cfg, task = run.cfg.training, run.cfg.task
    if not cfg.eval_every or task.family in FROM_FILES:
        return None
    info = run.store.info
    store = build_in_memory(task.family, cfg.eval_tasks, cfg.seed, task.shots, task.queries, "test", info.ways)
    computer = ShardComputer(store, run.cfg.model, run.cfg.maml, task_map=run.cfg.scaling.task_map)
    ids = np.arange(len(store))
    steps, lr = run.cfg.maml.inner_steps, run.cfg.maml.inner_lr

    def score(weights: np.ndarray) -> float:
        losses, _ = computer.curve(weights, ids, steps, lr)
        return float(losses[:, -1].mean())

    return score


def _append(log: IO[bytes], line: str) -> None:
    """One metrics line, written through (the file is unbuffered: a failed write leaves nothing
    pending that closing the file would fail on again, hiding the first error)."""
    data = memoryview(line.encode())
    try:
        while data:
            data = data[log.write(data) or 0 :]
    except OSError as e:
        raise with_filename(e, log.name) from None


def _last_checkpoint(run: Run) -> str:
    """The name of the checkpoint `latest` names ("none yet" if there is none to read)."""
    try:
        return checkpoint.latest(run.dir).name
    except (CheckpointError, OSError):
        return "none yet"


def _lost(run: Run, why: str) -> None:
    """The cluster went away under the run (called from the executor's watch thread): one line
    of ours before Ray ends the process. Checkpoints are atomic, so `latest` is whole."""
    sys.stdout.flush()
    sys.stderr.write(
        f"\ndistributed-maml: error: {why}; the last checkpoint ({_last_checkpoint(run)}) is intact: start Ray again (or let "
        f"this command start it) and continue with distributed-maml train --resume {run.dir}\n"
    )
    sys.stderr.flush()
    os._exit(1)  # before Ray's own exit, which prints nothing of ours; the kernel releases the run lock


def _stop(run: Run, learner: Learner, step: int, sampler: Sampler) -> None:
    """Saves the last applied step (unless `latest` names it already) and ends the run resumably."""
    if _last_checkpoint(run) != f"step_{step}":
        save_checkpoint(run, learner, step, sampler)
    signum = stopping.requested()
    assert signum is not None
    raise stopping.Stopped(signum, f"stopped at step {step}; continue with distributed-maml train --resume {run.dir}")


def train(run: Run, executor: Executor, progress: bool = True) -> TrainResult:
    try:
        return _train(run, executor, progress)
    except OSError as e:  # a full disk or a vanished folder mid-run: checkpoints are atomic, so `latest` is whole
        raise TrainingError(
            f"{os_error_line(e)}; the last checkpoint ({_last_checkpoint(run)}) is intact: fix this, then continue with "
            f"distributed-maml train --resume {run.dir}"
        ) from None
    finally:  # the run folder's one-writer lock (taken by prepare/resume) ends with the training
        if run.lock is not None:
            run.lock.release()


def _train(run: Run, executor: Executor, progress: bool) -> TrainResult:
    cfg = run.cfg.training
    learner = make_learner(run)
    heldout = heldout_scorer(run)
    sampler = Sampler(cfg.seed, len(run.store), run.cfg.task.meta_batch)
    start = run.start.step if run.start else 0
    skipped, record = 0, {}
    if run.start is None:  # step 0 on disk at once: a run stopped or failed before its first checkpoint resumes
        save_checkpoint(run, learner, 0, sampler)
    stopping.install()  # again: connecting to Ray replaced the SIGTERM handler
    executor.watch(lambda why: _lost(run, why))
    print(
        f"run {run.dir}: {len(run.store)} {run.store.info.family} tasks, {executor.describe()}, "
        f"steps {start}..{cfg.steps}",
        flush=True,
    )
    with (
        open(run.dir / "metrics.jsonl", "ab", buffering=0) as log,
        tqdm(total=cfg.steps, initial=start, desc="meta-train", unit="step", disable=not progress or None) as bar,
    ):
        for step in range(start + 1, cfg.steps + 1):  # `step` counts completed meta-steps
            if stopping.requested():  # SIGINT/SIGTERM: the last step is applied; keep it, then stop
                _stop(run, learner, step - 1, sampler)
            heldout_step = heldout is not None and (step % cfg.eval_every == 0 or step == cfg.steps)
            logged = step % cfg.log_every == 0 or step in (1, cfg.steps) or heldout_step
            t0 = time.perf_counter()
            try:
                results, reduced = fan_out_in(executor, learner, sampler.ids(step - 1), before=logged)
                finite = _is_finite(reduced)
                if not finite and cfg.on_nonfinite == "stop":
                    raise TrainingError(
                        f"step {step}: non-finite meta-loss or meta-gradient (loss {reduced.metrics.get('loss_after')});"
                        f" likely maml.inner_lr ({run.cfg.maml.inner_lr}) or optimizer.lr ({run.cfg.optimizer.lr}) "
                        "is too large"
                    )
            except TrainingError as e:  # stop before Adam sees the step; keep the last good weights
                path = save_checkpoint(run, learner, step - 1, sampler)
                raise TrainingError(f"{e}; the last good weights are saved in {path}") from None
            t1 = time.perf_counter()
            if finite:
                learner.apply(reduced.grad)
            else:  # on_nonfinite = "skip": drop the step, count it
                skipped += 1
            t2 = time.perf_counter()
            record = {
                "step": step,
                "meta_loss": reduced.metrics["loss_after"],
                **reduced.metrics,
                "tasks_per_s": reduced.count / (t2 - t0),
                "skipped_steps": skipped,
                "time": timing(results, t1 - t0, t2 - t1),
            }
            bar.set_postfix(
                meta_loss=f"{record['meta_loss']:.4f}", tasks_s=f"{record['tasks_per_s']:.0f}", refresh=False
            )
            bar.update()
            if heldout is not None and heldout_step:
                record["heldout_loss"] = heldout(learner.weights())
            if logged:
                _append(log, json.dumps(record) + "\n")
                tqdm.write(
                    f"Step {step}, Meta Loss: {record['meta_loss']:.4f}"
                    + (f", Accuracy: {record['acc_after']:.3f}" if "acc_after" in record else "")
                    + (f", Held-out Loss: {record['heldout_loss']:.4f}" if "heldout_loss" in record else "")
                )
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
                save_checkpoint(run, learner, step, sampler)
    return TrainResult(run.dir, cfg.steps, learner.weights(), record)
