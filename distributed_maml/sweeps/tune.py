"""`distributed-maml tune SWEEP.toml`: the sweep's folder, its trials (each a training run of
this project, in-process, one CPU), and the table and best.toml at the end.

SWEEP_DIR/
  sweep.json       the checked sweep (base config, searched keys, options): `tune --resume` reads it
  trials/<trial>/  one run folder per trial (eval, plot and train --resume work on it)
  tune/            Ray Tune's own state (what `--resume` continues)
  best.toml        the best trial's config
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed_maml import stopping
from distributed_maml.errors import UserError
from distributed_maml.evaluation import plots
from distributed_maml.execution import tuning
from distributed_maml.sweeps import sweep
from distributed_maml.training import run, train

FAILED = "failed.txt"  # in a trial's run folder: why it failed (one line)


def _trial(spec: sweep.Sweep, sweep_dir: Path) -> Callable[[dict[str, Any]], None]:
    def trial(values: dict[str, Any]) -> None:
        run_dir = sweep_dir / "trials" / tuning.trial_name()
        if (run_dir / "checkpoints" / "latest").is_file():  # a resumed sweep: the trial continues its run
            r = run.resume(run_dir)
        else:
            if run_dir.exists():  # stopped before its first checkpoint: nothing to keep
                shutil.rmtree(run_dir)
            r = run.prepare(spec.config(values), run_dir, tasks=spec.tasks, progress=False)
        executor = train.make_executor(r)
        try:
            train.train(r, executor, progress=False, on_validation=tuning.report)
        except UserError as e:  # e.g. a drawn step size that diverges: one line, the trial is marked failed
            line = " ".join(str(e).split())
            (run_dir / FAILED).write_text(line + "\n")
            print(f"distributed-maml: trial {run_dir.name} failed: {line}", flush=True)
        finally:
            executor.close()

    return trial


def _save(spec: sweep.Sweep, sweep_dir: Path, options: dict[str, Any]) -> None:
    record = {
        "base": spec.base,
        "space": [{"key": d.key, "kind": d.kind, "values": list(d.values)} for d in spec.space],
        "source": str(spec.source),
        "tasks": str(spec.tasks) if spec.tasks else None,
        "options": options,
    }
    (sweep_dir / "sweep.json").write_text(json.dumps(record, indent=1) + "\n")


def _load(sweep_dir: Path) -> tuple[sweep.Sweep, dict[str, Any]]:
    path = sweep_dir / "sweep.json"
    try:
        record = json.loads(path.read_text())
        space = tuple(sweep.Dimension(d["key"], d["kind"], tuple(d["values"])) for d in record["space"])
        tasks = Path(record["tasks"]) if record["tasks"] else None
        return sweep.Sweep(record["base"], space, Path(record["source"]), tasks), record["options"]
    except FileNotFoundError:
        raise UserError(
            f"{sweep_dir} is not a sweep folder (no sweep.json); start one with distributed-maml tune SWEEP.toml"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} cannot be read ({e}); it is written by distributed-maml tune") from None


def _corners(spec: sweep.Sweep) -> list[dict[str, Any]]:
    """Each searched scaling value with the others at their first: the trials' largest shapes."""
    first = {d.key: d.values[0] for d in spec.space}
    scaling = [d for d in spec.space if d.key.startswith("scaling.")]
    return [first] + [{**first, d.key: v} for d in scaling for v in d.values]


def tune_main(
    path: Path | None,
    overrides: list[str],
    output_dir: Path | None,
    tasks: Path | None,
    trials: int,
    max_concurrent: int,
    early_stop: bool,
    resume: Path | None,
) -> None:
    if resume is not None:
        spec, options = _load(resume)
        sweep_dir = resume
    else:
        if path is None:
            raise UserError("tune needs a sweep file (a config with a [tune] table) or --resume SWEEP_DIR")
        if trials < 1 or max_concurrent < 0:
            raise UserError(f"--trials must be >= 1 and --max-concurrent >= 0, got {trials} and {max_concurrent}")
        spec = sweep.parse(path, overrides, tasks)
        sweep_dir = output_dir or Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        if sweep_dir.exists() and any(sweep_dir.iterdir()):
            raise UserError(f"{sweep_dir} already holds files; continue a sweep there with --resume {sweep_dir}")
        options = {"trials": trials, "max_concurrent": max_concurrent, "early_stop": early_stop}
        for values in _corners(spec):  # every trial must fit the cluster: checked before the folder is made
            scaling = spec.config(values).scaling
            tuning.check_fits(tuning.trial_resources(scaling))
        (sweep_dir / "trials").mkdir(parents=True, exist_ok=True)
        _save(spec, sweep_dir, options)
    sweep_dir = sweep_dir.resolve()
    first = spec.config({d.key: d.values[0] for d in spec.space})
    reports = -(-first.training.steps // first.training.eval_every)  # validations per full trial
    samples = spec.samples(options["trials"])
    count = samples * spec.grid_size
    print(
        f"sweep {sweep_dir}: {count} trials over {', '.join(d.key for d in spec.space)}, "
        f"{options['max_concurrent'] or 'as many as fit'} at a time, "
        + ("ASHA early stopping on the validation" if options["early_stop"] else "no early stopping"),
        flush=True,
    )

    def resources(values: dict[str, Any]) -> tuple[list[dict[str, float]], str]:
        scaling = spec.config({d.key: values[d.key] for d in spec.space}).scaling
        return tuning.trial_resources(scaling), scaling.placement

    results = tuning.run(
        _trial(spec, sweep_dir),
        resources,
        spec.space,
        sweep_dir,
        samples,
        options["max_concurrent"],
        options["early_stop"],
        reports,
        resume=resume is not None,
    )
    trials = sweep_dir / "trials"
    rows = [
        sweep.summarise(
            trials / r.name,
            r.values,
            r.failed or (trials / r.name / FAILED).exists(),
            (trials / r.name / tuning.EARLY_STOPPED).exists(),
        )
        for r in results
    ]
    print(sweep.table(rows, spec.space))
    metric = next((r.metric for r in rows if r.metric), "")
    curves = plots.sweep_curves(sweep_dir, [r.name for r in sweep.ranked(rows)], metric) if metric else None
    if curves is not None:
        print(f"wrote {curves}")
    if any(r.status in ("interrupted", "not started") for r in rows):
        raise stopping.Stopped(
            signal.SIGINT, f"sweep stopped; continue with distributed-maml tune --resume {sweep_dir}"
        )
    best = sweep.ranked(rows)[0] if rows else None
    if best is None or best.best is None:
        raise sweep.no_trial_validated(sweep_dir)
    print(f"best: {best.name} ({best.metric} {best.best:.4f}); its config: {sweep.write_best(sweep_dir, best)}")
