"""The meta-training loop. The whole algorithm is on this page:

    ids of step s (sampler) -> shards -> workers: summed meta-gradients -> learner: mean, Adam

Everything else (config, run folder, store, Ray) is set up before the loop and passed in.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm.auto import tqdm

from . import checkpoint, maml, models, stopping
from . import executor as executor_mod
from .config import TrainingConfig
from .errors import CheckpointError, TrainingError, os_error_line, with_filename
from .executor import Executor
from .learner import Learner
from .run import Run
from .sampler import Sampler
from .stepping import StepOutcome, Steps
from .store import build_in_memory
from .tasks import FROM_FILES
from .worker import ShardComputer


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    weights: np.ndarray
    last_metrics: dict[str, Any]


def make_executor(run: Run) -> Executor:
    return executor_mod.make(run.store, run.cfg.model, run.cfg.maml, run.cfg.scaling)


def make_learner(run: Run) -> Learner:
    """The learner over the meta-parameters: the model's weights, then any learned inner step
    sizes (Meta-SGD, MAML++'s LSLR), which start at maml.inner_lr."""
    cfg = run.cfg.maml
    model = models.build(run.cfg.model, run.store.info, seed=run.cfg.training.seed)
    maml.head_of(cfg, models.ParamSpec.of(model).names)  # a wrong ANIL head: one line now, not in every worker
    spec = maml.meta_spec(cfg, models.ParamSpec.of(model))
    initial = maml.with_learned_lrs(cfg, dict(model.named_parameters()), cfg.inner_lr)
    learner = Learner.of(spec, spec.flatten(initial), cfg, run.cfg.optimizer.lr)
    if run.start is not None:
        learner.load({**run.start.model, **run.start.inner_lr}, run.start.optimizer, run.start.version)
    return learner


def save_checkpoint(run: Run, learner: Learner, step: int, sampler: Sampler) -> Path:
    state = checkpoint.RunState(run.cfg, sampler, run.store_ref)
    keep = run.cfg.training.keep_checkpoints
    model, lrs = maml.split_lrs(learner.state_dict())  # model.pt stays a plain state_dict of the network
    return checkpoint.save(run.dir, step, learner.version, model, learner.optimizer.state_dict(), state, keep, lrs)


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
        recorder = _Recorder(run, learner, sampler, heldout, log, bar)
        step = start  # `step` counts completed meta-steps
        while step < cfg.steps:
            if stopping.requested():  # SIGINT/SIGTERM: the last step is applied; keep it, then stop
                _stop(run, learner, step, sampler)
            # Steps run in chunks that end where the driver must act (log, checkpoint, held-out
            # evaluation): the driver loop still checks for stops between steps, the collective
            # loop hands back control only at a chunk's end.
            last = _chunk_end(step + 1, cfg, heldout is not None)
            steps = Steps(step + 1, last, recorder.logged(last), cfg.on_nonfinite == "stop")
            try:
                step = executor.run_steps(learner, sampler, steps, recorder.on_step)
            except TrainingError as e:  # stopped before Adam saw a bad step, or the workers are gone
                path = save_checkpoint(run, learner, recorder.done, sampler)
                raise TrainingError(f"{e}; the last good weights are saved in {path}") from None
            if step == last and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps):
                save_checkpoint(run, learner, step, sampler)
    return TrainResult(run.dir, cfg.steps, learner.weights(), recorder.record)


def _chunk_end(first: int, cfg: TrainingConfig, heldout: bool) -> int:
    """The first step from `first` on that is logged, checkpointed, evaluated, or the last."""
    periods = [cfg.log_every] + [p for p in (cfg.checkpoint_every, cfg.eval_every if heldout else 0) if p]
    return min([cfg.steps, *(first + (-first) % p for p in periods)]) if first > 1 else 1


class _Recorder:
    """What the loop does with each step's outcome: the non-finite policy, the metrics line,
    the progress bar, the held-out score."""

    def __init__(
        self,
        run: Run,
        learner: Learner,
        sampler: Sampler,
        heldout: Callable[[np.ndarray], float] | None,
        log: IO[bytes],
        bar: Any,
    ) -> None:
        self.run, self.learner, self.sampler, self.heldout, self.log, self.bar = (
            run,
            learner,
            sampler,
            heldout,
            log,
            bar,
        )
        self.cfg = run.cfg.training
        self.skipped = 0
        self.record: dict[str, Any] = {}
        self.done = run.start.step if run.start else 0  # the last step settled (the learner's state)

    def heldout_step(self, step: int) -> bool:
        return self.heldout is not None and (step % self.cfg.eval_every == 0 or step == self.cfg.steps)

    def logged(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step in (1, self.cfg.steps) or self.heldout_step(step)

    def on_step(self, o: StepOutcome) -> None:
        """Called after step `o.step` settled (the learner holds its weights when it is logged)."""
        if not o.finite and self.cfg.on_nonfinite == "stop":  # Adam never saw it: the learner holds step - 1
            maml, lr = self.run.cfg.maml, self.run.cfg.optimizer.lr
            raise TrainingError(
                f"step {o.step}: non-finite meta-loss or meta-gradient (loss {o.metrics.get('loss_after')}); "
                f"likely maml.inner_lr ({maml.inner_lr}) or optimizer.lr ({lr}) is too large"
            )
        self.skipped += not o.finite  # on_nonfinite = "skip": dropped, counted
        record = {
            "step": o.step,
            "meta_loss": o.metrics["loss_after"],
            **o.metrics,
            "tasks_per_s": o.count / o.wall_s,
            "skipped_steps": self.skipped,
            "time": o.timing,
        }
        self.bar.set_postfix(
            meta_loss=f"{record['meta_loss']:.4f}", tasks_s=f"{record['tasks_per_s']:.0f}", refresh=False
        )
        self.bar.update()
        if self.heldout is not None and self.heldout_step(o.step):
            record["heldout_loss"] = self.heldout(self.learner.weights())
        if self.logged(o.step):
            _append(self.log, json.dumps(record) + "\n")
            tqdm.write(
                f"Step {o.step}, Meta Loss: {record['meta_loss']:.4f}"
                + (f", Accuracy: {record['acc_after']:.3f}" if "acc_after" in record else "")
                + (f", Held-out Loss: {record['heldout_loss']:.4f}" if "heldout_loss" in record else "")
            )
        self.record = record
        self.done = o.step
