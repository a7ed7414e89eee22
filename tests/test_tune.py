"""`distributed-maml tune`: a sweep on Ray Tune whose trials are runs of this project. Bad search
spaces are one line before anything starts; a sweep's trials are normal run folders, the table
and best.toml come from them; a stopped sweep resumes without rerunning finished trials."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed_maml import config
from distributed_maml.cli import main as cli

from .conftest import REPO, assert_user_error, cli_in_process, run_cli

pytestmark = pytest.mark.ray

BASE = """
[task]
family = "sinusoid"
shots = 5
queries = 5
meta_batch = 5
num_tasks = 100

[model]
name = "sinusoid_mlp"

[training]
steps = {steps}
log_every = 10
eval_every = 10
eval_tasks = 10

[scaling]
num_workers = 0
"""


def _sweep_file(tmp_path: Path, tune: str, steps: int = 30, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(BASE.format(steps=steps) + "\n[tune]\n" + tune)
    return path


@pytest.mark.parametrize(
    "tune, needle",
    [
        ('"maml.inner_rate" = { choice = [0.1] }', "unknown key maml.inner_rate"),
        ('"maml.inner_lr" = { loguniform = [-1.0, 1.0] }', "0 < low < high"),
        ('"maml.inner_steps" = { grid = [1, 0] }', "maml.inner_steps"),
        ('"task.meta_batch" = { choice = [] }', "non-empty list"),
        ('"task.meta_batch" = { uniform = [8, 32] }', "use choice or grid for an integer key"),
        ('"maml.inner_lr" = { normal = [0.1, 1.0] }', "unknown kind 'normal'"),
        ('"maml.inner_lr" = 0.1', "must be one of"),
        ("", "no [tune] table"),
    ],
    ids=[
        "unknown-key",
        "bad-range",
        "out-of-range-value",
        "empty-choice",
        "float-for-an-integer",
        "unknown-kind",
        "not-a-table",
        "no-table",
    ],
)
def test_a_bad_search_space_is_one_line_before_any_trial(tmp_path, capsys, tune, needle):
    out = tmp_path / "sweep"
    code = cli.main(["tune", str(_sweep_file(tmp_path, tune)), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()  # nothing made, no Ray started


def test_a_sweep_that_cannot_validate_or_rank_is_refused(tmp_path, capsys):
    """No validation (eval_every = 0) and a pool sized by the cluster are refused before Ray
    starts (the parser's error path, in this interpreter); a trial larger than the cluster: below."""
    sweep = _sweep_file(tmp_path, '"maml.inner_lr" = { choice = [0.1, 0.2] }')
    for bad, needle in [
        ("training.eval_every=0", "training.eval_every >= 1"),
        ("scaling.num_workers=-1", "a fixed number"),
    ]:
        assert_user_error(cli_in_process(capsys, "tune", sweep, "--set", bad, "--output-dir", tmp_path / "x"), needle)
        assert not (tmp_path / "x").exists()


@pytest.mark.cluster  # a local Ray started in a shell to be asked its size (~7 s): with the module's Tune experiments
def test_a_trial_larger_than_the_cluster_is_refused_through_the_shell(tmp_path):
    sweep = _sweep_file(tmp_path, '"maml.inner_lr" = { choice = [0.1, 0.2] }')
    # more than this machine's local Ray holds: Tune would keep it pending for ever. Checked on the
    # cluster (Ray's own start-up lines come first), before the sweep's folder is made
    proc = run_cli("tune", sweep, "--set", "scaling.num_workers=4", "--output-dir", tmp_path / "x")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert last.startswith("distributed-maml: error: a trial needs 5 CPU (1 CPU for its run, then its 4 workers)"), last
    assert not (tmp_path / "x").exists()


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.cluster  # a Tune experiment in a shell (~30 s): the cluster tier holds the module's experiments
def test_a_sweep_runs_its_trials_as_runs_and_writes_the_best_config(tmp_path):
    """A 2x2 grid (inner step size x in-process or one Ray worker), ASHA on: every trial is a run folder with
    its drawn values in config.toml; the table ranks them by their best validation loss, read
    from their metrics.jsonl; best.toml is the best trial's config, ready for `train --config`."""
    sweep = _sweep_file(
        tmp_path, '"maml.inner_lr" = { grid = [0.001, 0.05] }\n"scaling.num_workers" = { grid = [0, 1] }\n'
    )
    out = tmp_path / "sweep"
    proc = run_cli("tune", sweep, "--output-dir", out, "--max-concurrent", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = sorted((out / "trials").iterdir())
    assert len(trials) == 4
    best_of = {}
    for t in trials:
        cfg = config.load(t / "config.toml")
        vals = [r["val_loss"] for r in _metrics(t) if "val_loss" in r]
        assert vals, t  # every trial validated at least once (ASHA's first rung)
        best_of[(cfg.maml.inner_lr, cfg.scaling.num_workers)] = (min(vals), t.name)
    assert set(best_of) == {(a, b) for a in (0.001, 0.05) for b in (0, 1)}
    # a trial with a Ray worker placed it in the bundle Tune reserved for it (2 CPUs in all)
    assert sum("1 Ray workers (1 CPU each" in line for line in proc.stdout.splitlines()) == 2, proc.stdout[-3000:]
    winner = min(best_of.values())
    table = [line for line in proc.stdout.splitlines() if " | " in line]
    assert table[0].startswith("trial ") and len(table) == 5 and table[1].startswith(winner[1]), proc.stdout
    assert f"best: {winner[1]} (val_loss {winner[0]:.4f})" in proc.stdout
    assert (out / "plots" / "validation.png").stat().st_size > 0 and f"wrote {out}/plots/validation.png" in proc.stdout
    best = config.load(out / "best.toml")
    assert best == config.load(out / "trials" / winner[1] / "config.toml")
    statuses = {line.split(" | ")[-1].strip() for line in table[1:]}
    assert statuses <= {"done", "stopped early"} and "done" in statuses, table
    # a trial is a run: eval takes its best checkpoint
    ev = run_cli(
        "eval", "--run", out / "trials" / winner[1], "--steps", "0,1", "--num-tasks", "20", "--no-baselines", "--json"
    )
    assert ev.returncode == 0 and json.loads(ev.stdout)["checkpoint"] == "best", ev.stderr[-2000:]


@pytest.mark.cluster  # the second Tune experiment of the module: its own tier
def test_a_stopped_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    """SIGINT while the second of two trials runs (one at a time): the table, one line, exit 130;
    `tune --resume` finishes the interrupted trial from its run's checkpoint and leaves the
    finished one as it was."""
    sweep = _sweep_file(tmp_path, '"maml.inner_lr" = { grid = [0.01, 0.02] }\n', steps=400)
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "distributed_maml", "tune", str(sweep), "--output-dir", str(out)]
    proc = subprocess.Popen(
        [*argv, "--max-concurrent", "1", "--no-early-stop"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        end = time.monotonic() + 240
        while True:  # the second trial has logged a step: the first is done
            runs = [p for p in (out / "trials").glob("*") if (p / "metrics.jsonl").exists()] if out.exists() else []
            if len(runs) == 2 and all(_metrics(r) for r in runs):
                break
            assert proc.poll() is None and time.monotonic() < end, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (stdout, stderr[-3000:])
    assert f"distributed-maml: sweep stopped; continue with distributed-maml tune --resume {out}" in stderr
    done = [r for r in runs if _metrics(r)[-1]["step"] == 400]
    assert len(done) == 1 and "interrupted" in stdout, stdout
    before = (done[0] / "metrics.jsonl").read_text()
    again = run_cli("tune", "--resume", out, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (done[0] / "metrics.jsonl").read_text() == before  # not rerun
    for r in runs:
        steps = [m["step"] for m in _metrics(r)]
        assert steps[-1] == 400 and len(steps) == len(set(steps)), (r, steps)  # each step logged once
    assert (out / "best.toml").exists()
