"""Ray Tune under `distributed-maml tune` (sweeps/sweep.py holds the sweep file and the trials'
record): the search space in Tune's terms, the early-stopping scheduler, the trials' resources,
and the report a trial makes at each validation. Ray stays in execution/; the trial function
(a training run) comes from the app layer.

Tune maximises one number, OBJECTIVE: the validation accuracy, or minus the validation loss.
ASHA compares trials at the same number of reports (one per validation): a trial below the top
1/REDUCTION of its rung is stopped there; its run folder keeps what it did.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed_maml.errors import ConfigError
from distributed_maml.execution.driver import connect

OBJECTIVE = "objective"
REDUCTION = 2


@dataclass(frozen=True)
class TrialResult:
    name: str  # Tune's trial id: the trial's run folder is SWEEP_DIR/trials/<name>
    values: dict[str, Any]  # the searched keys' values
    failed: bool


def _space(dimensions: Sequence[Any]) -> dict[str, Any]:
    from ray import tune

    make = {
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
        "choice": lambda v: tune.choice(list(v)),
        "grid": lambda v: tune.grid_search(list(v)),
    }
    return {d.key: make[d.kind](d.values) for d in dimensions}


def trial_resources(scaling: Any) -> list[dict[str, float]]:
    """A trial's bundles: its driver (one CPU; the run itself when in-process), then one per
    Ray worker, as the run's Slots will use them (placement.py: `_enclosing`)."""
    return [{"CPU": 1.0}, *scaling.slices(scaling.num_workers)]


def run(
    trainable: Callable[[dict[str, Any]], None],
    resources: Callable[[dict[str, Any]], tuple[list[dict[str, float]], str]],
    dimensions: Sequence[Any],
    storage: Path,
    trials: int,
    max_concurrent: int,
    early_stop: bool,
    max_reports: int,
    resume: bool = False,
) -> list[TrialResult]:
    """Runs (or, `resume`, continues) the sweep whose Tune state lives in `storage`/tune; a
    trial's placement group is `resources(values)` (bundles, strategy): all of a trial's
    workers are reserved before it starts, so trials never wait on each other. Returns each
    trial's id and values."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own status tables off (verbose=0)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # its TensorBoard files: each run writes its own
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # a failed trial ends without a validation
    connect()
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import FIFOScheduler

    # the table at the end says which trials failed or stopped: Tune's own lines about it go
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)

    path = storage / "tune"

    def placement(values: dict[str, Any]) -> Any:
        bundles, strategy = resources(values)
        return tune.PlacementGroupFactory(bundles, strategy=strategy.upper())

    resourced = tune.with_resources(trainable, placement)
    if resume:
        tuner = tune.Tuner.restore(str(path), trainable=resourced, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = _asha(storage, max_reports) if early_stop else FIFOScheduler()
        tuner = tune.Tuner(
            resourced,
            param_space=_space(dimensions),
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE,
                mode="max",
                num_samples=trials,
                max_concurrent_trials=max_concurrent,
                scheduler=scheduler,
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(storage),
                verbose=0,
                callbacks=[JsonLoggerCallback(), CSVLoggerCallback()],  # what Tune reads its results from
            ),
        )
    previous = signal.signal(signal.SIGTERM, _as_sigint)  # `ray job stop`, kill: Tune's own graceful stop
    try:
        grid = tuner.fit()
    finally:
        signal.signal(signal.SIGTERM, previous)
    keys = [d.key for d in dimensions]
    out = []
    for i in range(len(grid)):
        r = grid[i]
        out.append(TrialResult(Path(r.path).name, {k: (r.config or {}).get(k) for k in keys}, r.error is not None))
    return out


EARLY_STOPPED = "stopped_early.txt"  # in a trial's run folder: ASHA stopped it (not the user)


def _asha(storage: Path, max_reports: int) -> Any:
    """ASHA on OBJECTIVE, one rung per validation; a trial it stops gets EARLY_STOPPED in its run
    folder, so that the sweep tells its decisions from a user's stop (which `--resume` undoes)."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class Asha(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            decision = super().on_trial_result(tune_controller, trial, result)
            cut = result.get("training_iteration", max_reports) < max_reports  # not its last validation
            if decision == TrialScheduler.STOP and cut:
                folder = storage / "trials" / trial.trial_id
                if folder.is_dir():
                    (folder / EARLY_STOPPED).write_text(
                        f"stopped by ASHA after the validation of step {result['step']}\n"
                    )
            return decision

    return Asha(time_attr="training_iteration", max_t=max_reports, grace_period=1, reduction_factor=REDUCTION)


def check_fits(bundles: list[dict[str, float]]) -> None:
    """Before a sweep starts (Ray connected here): a trial that needs more than the whole
    cluster would wait for ever (Tune keeps it pending), so it is one line instead."""
    import ray

    connect()
    have = ray.cluster_resources()
    for kind in ("CPU", "GPU"):
        need = sum(b.get(kind, 0.0) for b in bundles)
        if need > have.get(kind, 0.0):
            raise ConfigError(
                f"a trial needs {need:g} {kind} (1 CPU for its run, then its {len(bundles) - 1} workers) and the "
                f"cluster has {have.get(kind, 0.0):g}; lower scaling.num_workers or cpus_per_worker, or add nodes"
            )


def _as_sigint(signum: int, frame: Any) -> None:
    os.kill(os.getpid(), signal.SIGINT)


def trial_name() -> str:
    """Inside a trial: its id (the name of its run folder)."""
    from ray import tune

    return tune.get_context().get_trial_id()


def report(step: int, line: dict[str, Any], metric: str) -> None:
    """Inside a trial: a validated step's numbers to Tune (the scheduler's input)."""
    from ray import tune

    value = line[metric]
    tune.report({OBJECTIVE: value if metric == "val_acc" else -value, "step": step, metric: value})
