"""The meta-training loop. The whole algorithm is on this page:

    ids of step s (sampler) -> shards -> workers: summed meta-gradients -> learner: mean, Adam

Everything else (config, run folder, store, Ray) is set up before the loop and passed in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm.auto import tqdm

from distributed_maml import stopping
from distributed_maml.config import TrainingConfig
from distributed_maml.core.learner import Learner
from distributed_maml.core.network import assemble
from distributed_maml.data.format import StoreInfo
from distributed_maml.data.sampler import Sampler
from distributed_maml.errors import TrainingError, os_error_line
from distributed_maml.execution import factory
from distributed_maml.execution.protocol import Executor
from distributed_maml.execution.steps import StepOutcome, Steps
from distributed_maml.training import checkpoint
from distributed_maml.training import validation as validation_mod
from distributed_maml.training.run import Run, append_line
from distributed_maml.training.scalars import Scalars
from distributed_maml.training.validation import Validation


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    weights: np.ndarray
    last_metrics: dict[str, Any]


def make_executor(run: Run) -> Executor:
    return factory.make(run.store, run.cfg.model, run.cfg.maml, run.cfg.scaling)


def make_learner(run: Run, device: str = "cpu") -> Learner:
    """The learner over the meta-parameters: the model's weights, then any learned inner step
    sizes (Meta-SGD, MAML++'s LSLR), which start at maml.inner_lr; on `device` (the executor's
    learner_device: an in-process run's GPU, else the CPU)."""
    net = assemble(run.cfg.model, run.cfg.maml, run.store.info, seed=run.cfg.training.seed)
    learner = Learner.of(net.spec, net.initial(), run.cfg.maml, run.cfg.optimizer.lr, device)
    if run.start is not None:
        learner.load({**run.start.model, **run.start.inner_lr}, run.start.optimizer, run.start.version)
    return learner


OnValidation = Callable[[int, dict[str, Any], str], None]  # (step, its metrics line, the ranked metric)


def train(
    run: Run, executor: Executor, progress: bool = True, on_validation: OnValidation | None = None
) -> TrainResult:
    """Trains `run` to its last step; `on_validation` sees every validated step's metrics line
    once it is logged (a sweep reports it to Ray Tune)."""
    try:
        return _train(run, executor, progress, on_validation)
    except OSError as e:  # a full disk or a vanished folder mid-run: checkpoints are atomic, so `latest` is whole
        raise TrainingError(
            f"{os_error_line(e)}; the last checkpoint ({run.last_checkpoint()}) is intact: fix this, then continue with "
            f"distributed-maml train --resume {run.dir}"
        ) from None
    finally:  # the run folder's one-writer lock (taken by prepare/resume) ends with the training
        if run.lock is not None:
            run.lock.release()


def _train(run: Run, executor: Executor, progress: bool, on_validation: OnValidation | None) -> TrainResult:
    cfg = run.cfg.training
    learner = make_learner(run, executor.learner_device)
    validation = validation_mod.make(run.cfg, run.store)
    sampler = Sampler.of(run.store, cfg.seed, run.cfg.task.meta_batch)
    start = run.start.step if run.start else 0
    if run.start is None:  # step 0 on disk at once: a run stopped or failed before its first checkpoint resumes
        run.save(learner, 0, sampler)
    stopping.install()  # again: connecting to Ray replaced the SIGTERM handler
    executor.watch(run.lost)
    print(
        f"run {run.dir}: {_tasks_line(run.store.info)}, {executor.describe()}, "
        f"steps {start}..{cfg.steps}"
        + (f", validated on {validation.source} on {validation.where}" if validation else ""),
        flush=True,
    )
    with (
        open(run.dir / "metrics.jsonl", "ab", buffering=0) as log,
        tqdm(total=cfg.steps, initial=start, desc="meta-train", unit="step", disable=not progress or None) as bar,
    ):
        recorder = _Recorder(run, learner, sampler, validation, log, bar, Scalars(run.dir, start))
        recorder.on_validation = on_validation
        try:
            result = _loop(run, executor, learner, sampler, recorder, validation is not None, start)
        except BaseException:
            recorder.scalars.close(quiet=True)  # the error on its way out is the one to report
            raise
        recorder.scalars.close()
        return result


def _loop(
    run: Run, executor: Executor, learner: Learner, sampler: Sampler, recorder: _Recorder, validated: bool, start: int
) -> TrainResult:
    """The steps from `start` to the end: chunks, stops, checkpoints."""
    cfg = run.cfg.training
    step = start  # `step` counts completed meta-steps
    while step < cfg.steps:
        if stopping.requested():  # SIGINT/SIGTERM: the last step is applied; keep it, then stop
            run.stop(learner, step, sampler)
        # Steps run in chunks that end where the driver must act (log, checkpoint, validation):
        # the driver loop still checks for stops between steps, the collective loop hands back
        # control only at a chunk's end.
        last = _chunk_end(step + 1, cfg, validated)
        steps = Steps(step + 1, last, recorder.logged(last), cfg.on_nonfinite == "stop")
        try:
            step = executor.run_steps(learner, sampler, steps, recorder.on_step)
        except TrainingError as e:  # stopped before Adam saw a bad step, or the workers are gone
            path = run.save(learner, recorder.done, sampler)
            raise TrainingError(f"{e}; the last good weights are saved in {path}") from None
        periodic = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps
        if step == last and periodic:
            run.save_unless_latest(learner, step, sampler)  # a best step may have saved it already
    return TrainResult(run.dir, cfg.steps, learner.weights(), recorder.record)


def _tasks_line(info: StoreInfo) -> str:
    """The run's tasks for its first line."""
    if not info.on_the_fly:
        return f"{info.num_tasks} {info.family} tasks"
    return f"{info.family} episodes drawn on the fly ({info.spec.describe()}; {info.num_tasks:.3g} ids)"


def _by_source(record: dict[str, Any]) -> str:
    """ ", By source: alpha 0.412 (62%), beta 0.530 (38%)": a logged step's query loss (accuracy for
    classification) on each source's tasks, and the source's share of the step."""
    metric = "acc_after" if "acc_after" in record else "loss_after"
    names = [k.partition("@")[2] for k in record if k.startswith("tasks@")]
    if not names:
        return ""
    parts = [
        f"{n} {record[f'{metric}@{n}']:.3f} ({100 * record[f'tasks@{n}']:.0f}%)"
        if f"{metric}@{n}" in record
        else f"{n} -"
        for n in names
    ]
    return ", By source: " + ", ".join(parts)


def _shares(timing: dict[str, Any], shards_per_worker: int) -> str:
    """ ", Shares: worker-0 5, worker-1 3 (straggler 0.004 s)" for a log line: who computed how many
    of the step's shards (handed out by speed when shards_per_worker > 1)."""
    shares = timing.get("shares", {})
    if shards_per_worker == 1 or len(shares) < 2:
        return ""
    who = ", ".join(f"{w} {n}" for w, n in sorted(shares.items()))
    return f", Shares: {who} (straggler {timing['straggler_s']:.3f} s)"


def _chunk_end(first: int, cfg: TrainingConfig, validated: bool) -> int:
    """The first step from `first` on that is logged, checkpointed, validated, or the last."""
    periods = [cfg.log_every] + [p for p in (cfg.checkpoint_every, cfg.eval_every if validated else 0) if p]
    return min([cfg.steps, *(first + (-first) % p for p in periods)]) if first > 1 else 1


class _Recorder:
    """What the loop does with each step's outcome: the non-finite policy, the metrics line,
    the progress bar, the validation and the best checkpoints."""

    def __init__(
        self,
        run: Run,
        learner: Learner,
        sampler: Sampler,
        validation: Validation | None,
        log: IO[bytes],
        bar: Any,
        scalars: Scalars,
    ) -> None:
        self.run, self.learner, self.sampler, self.validation, self.log, self.bar = (
            run,
            learner,
            sampler,
            validation,
            log,
            bar,
        )
        self.scalars = scalars  # the logged lines again, as TensorBoard scalars
        self.cfg = run.cfg.training
        self.skipped = 0
        self.record: dict[str, Any] = {}
        self.last_val: dict[str, float] = {}  # the progress bar shows the last validation
        self.on_validation: OnValidation | None = None
        self.done = run.start.step if run.start else 0  # the last step settled (the learner's state)
        # best.json as of the step this run starts from (later entries are validated again)
        self.best = [e for e in checkpoint.read_best(run.dir) if e.step <= self.done] if validation else []

    def validated(self, step: int) -> bool:
        return self.validation is not None and (step % self.cfg.eval_every == 0 or step == self.cfg.steps)

    def logged(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step in (1, self.cfg.steps) or self.validated(step)

    def validate(self, step: int) -> dict[str, float]:
        """The validation scores of the learner's weights (step `step`); a step among the
        keep_best best is checkpointed (unless it is already) and recorded in best.json."""
        assert self.validation is not None
        scores = self.validation.score(self.learner.snapshot())
        value, metric = scores[self.validation.metric], self.validation.metric
        if not self.cfg.keep_best or not math.isfinite(value):
            return scores
        entry = checkpoint.BestEntry(step, metric, value)
        rank = self.validation.rank
        ranked = sorted([*(e for e in self.best if e.step != step), entry], key=rank)[: self.cfg.keep_best]
        if entry in ranked:
            self.run.save_unless_latest(self.learner, step, self.sampler)
            checkpoint.write_best(self.run.dir, ranked, self.cfg.keep_checkpoints)
            self.best = ranked
        return scores

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
        if self.validated(o.step):
            record.update(self.validate(o.step))
            self.last_val = {k: v for k, v in record.items() if k in ("val_loss", "val_acc")}
        self.bar.set_postfix(
            meta_loss=f"{record['meta_loss']:.4f}",
            tasks_s=f"{record['tasks_per_s']:.0f}",
            **{k: f"{v:.4f}" for k, v in self.last_val.items()},
            refresh=False,
        )
        self.bar.update()
        if self.logged(o.step):
            append_line(self.log, json.dumps(record) + "\n")
            self.scalars.write(record)
            tqdm.write(
                f"Step {o.step}, Meta Loss: {record['meta_loss']:.4f}"
                + (f", Accuracy: {record['acc_after']:.3f}" if "acc_after" in record else "")
                + "".join(
                    f", {name}: {record[k]:.4f} ± {record[k + '_ci95']:.4f}"
                    for k, name in (("val_loss", "Val Loss"), ("val_acc", "Val Accuracy"))
                    if k in record
                )
                + _shares(o.timing, self.run.cfg.scaling.shards_per_worker)
                + _by_source(record)
            )
        self.record = record
        self.done = o.step
        if self.on_validation is not None and self.validation is not None and self.validated(o.step):
            self.on_validation(o.step, record, self.validation.metric)
