"""Reliability and security: driver crash and resume, non-finite steps, safe checkpoint
loading, no leaked objects, and the CLI's bad-input table (one line, exit 2, nothing changed)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed_maml import config, data
from distributed_maml.cli import main as cli
from distributed_maml.errors import CheckpointError
from distributed_maml.training import checkpoint, run, train

from .conftest import REPO, assert_user_error, cli_in_process, run_cli, train_in_shards, tree_digest

INPROC = ["scaling.num_workers=0", "task.meta_batch=16", "training.log_every=10"]


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _wait_for_checkpoint(run_dir: Path, min_step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        if pointer.exists() and int(pointer.read_text().removeprefix("step_")) >= min_step:
            return int(pointer.read_text().removeprefix("step_"))
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def _crash_and_resume(tmp_path: Path, reference: list[str], crashing: list[str], steps: int, kill_after: int):
    """Trains `reference` straight through; trains `crashing`, SIGKILLs its driver once a
    checkpoint at or past `kill_after` exists, resumes it; returns both final checkpoints."""
    common = [f"training.steps={steps}", "training.checkpoint_every=10"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert run_cli("train", "--output-dir", straight, "--no-progress", *_sets([*common, *reference])).returncode == 0
    argv = [sys.executable, "-m", "distributed_maml", "train", "--output-dir", str(crashed), "--no-progress"]
    proc = subprocess.Popen(
        [*argv, *_sets([*common, *crashing])], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    at = _wait_for_checkpoint(crashed, kill_after, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert at < steps
    resumed = run_cli("train", "--resume", crashed, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    # no temporary checkpoint folders are left behind
    assert all(not p.name.startswith(".") for p in (crashed / "checkpoints").iterdir())
    a, b = (checkpoint.load(checkpoint.latest(d)) for d in (straight, crashed))
    assert a.step == b.step == steps
    return a, b


def test_sigkilled_driver_resumes_bit_identical(tmp_path):
    a, b = _crash_and_resume(tmp_path, INPROC, INPROC, steps=120, kill_after=30)
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k


def _child_named(pid: int, name: str) -> int:
    """The pid of `pid`'s child process called `name` (read from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, rest = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        if comm.split("(", 1)[1] == name and int(rest.split()[1]) == pid:
            return int(stat.parent.name)
    raise AssertionError(f"no child {name} of {pid}")


def _signal_and_resume(
    tmp_path: Path, sig: int, overrides: list[str], steps: int, then_kill: bool = False, log_every: int = 1
) -> tuple[Path, int, int]:
    """Trains `overrides`, sends `sig` once the run has logged a random step, checks the one
    line and the exit code, resumes (`then_kill`: SIGKILLs the raylet of that resume's local Ray
    at its next periodic checkpoint, checks the driver's one line, and resumes again), and
    returns the run folder, the step it stopped at and the last logged step the signal followed.
    With `log_every` > 1 the signal is sent between logged steps (the step after a logged one is
    running): the chunk of steps the executor was given is cut short (in-process, Ray driver) or
    finished (collective). On a loaded machine this process may read the metrics file late
    enough that the run is already at the chunk's end when the signal lands; the callers allow
    that (tests/test_sampler_learner.py pins the stop inside a chunk without timing)."""
    at = random.Random().randint(3, steps // 2)  # a different step every time; printed on failure
    out = tmp_path / f"stopped-{sig}"
    argv = [sys.executable, "-m", "distributed_maml", "train", "--output-dir", str(out), "--no-progress"]
    every = steps // 4 if then_kill else 0
    common = [
        *overrides,
        f"training.steps={steps}",
        f"training.log_every={log_every}",
        f"training.checkpoint_every={every}",
    ]
    proc = subprocess.Popen(
        [*argv, *_sets(common)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics, end = out / "metrics.jsonl", time.monotonic() + 120

    def last_logged() -> int:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0

    while (seen := last_logged()) < at:
        assert proc.poll() is None and time.monotonic() < end, (at, proc.communicate())
        time.sleep(0.005)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    last = stderr.strip().splitlines()[-1]
    stopped = int(last.split("stopped at step ")[1].split(";")[0]) if "stopped at step" in last else -1
    assert proc.returncode == 128 + sig, (at, proc.returncode, stderr)
    assert last == f"distributed-maml: stopped at step {stopped}; continue with distributed-maml train --resume {out}"
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr
    assert at <= stopped < steps - every and checkpoint.latest(out).name == f"step_{stopped}", (at, stopped)
    if then_kill:  # the local Ray under the resumed driver dies (as when its head node goes)
        proc = subprocess.Popen(
            [*argv[:4], "--resume", str(out), "--no-progress"], cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        _wait_for_checkpoint(out, (stopped // every + 1) * every, proc)
        os.kill(_child_named(proc.pid, "raylet"), signal.SIGKILL)
        stderr = proc.communicate(timeout=60)[1]
        last = checkpoint.latest(out).name
        assert proc.returncode == 1, stderr
        assert (
            stderr.strip()
            .splitlines()[-1]
            .endswith(
                f"the last checkpoint ({last}) is intact: start Ray again (or let this command start it) and "
                f"continue with distributed-maml train --resume {out}"
            )
        ), stderr
        assert "the local Ray instance stopped (its raylet" in stderr
    resumed = run_cli("train", "--resume", out, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    expected = [s for s in range(1, steps + 1) if s % log_every == 0 or s in (1, steps)]
    assert logged == expected, (at, stopped)  # every logged step once: none lost, none doubled
    assert seen <= stopped, (seen, stopped)  # equal: the signal landed before the next chunk began
    return out, stopped, seen


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    straight = tmp_path_factory.mktemp("straight") / "run"
    common = [*INPROC, "training.steps=150", "training.checkpoint_every=0"]
    assert run_cli("train", "--output-dir", straight, "--no-progress", *_sets(common)).returncode == 0
    return straight


# Each signal once in the default tier (Ctrl-C here, SIGTERM for the stop between logged steps
# below); the other pairing with the cluster tier's fault phases (the suite's time budget)
@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.cluster)])
def test_a_signal_saves_the_last_step_and_resume_is_bit_identical(tmp_path, sig, straight_run):
    out, _, _ = _signal_and_resume(tmp_path, sig, INPROC, 150)
    a, b = (checkpoint.load(checkpoint.latest(d)) for d in (straight_run, out))
    assert a.step == b.step == 150 and a.version == b.version
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    for x, y in zip(a.optimizer["state"].values(), b.optimizer["state"].values(), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)


def _same_run(a_dir: Path, b_dir: Path, rtol: float = 0.0) -> None:
    """Weights, Adam state, version and metrics lines (less their timings) equal bit for bit
    (`rtol`: the floats within it; step, version and the lines' keys still exactly)."""
    a, b = (checkpoint.load(checkpoint.latest(d)) for d in (a_dir, b_dir))
    assert a.step == b.step and a.version == b.version

    def same(x: torch.Tensor, y: torch.Tensor) -> bool:
        return torch.equal(x, y) if rtol == 0 else torch.allclose(x, y, rtol=rtol, atol=rtol * float(y.abs().max()))

    for k in a.model:
        assert same(a.model[k], b.model[k]), k
    for x, y in zip(a.optimizer["state"].values(), b.optimizer["state"].values(), strict=True):
        assert all(same(x[k], y[k]) for k in x)

    def lines(d: Path) -> list[dict]:
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("time", "tasks_per_s")} for r in rows]

    if rtol == 0:
        assert lines(a_dir) == lines(b_dir)
    else:
        for la, lb in zip(lines(a_dir), lines(b_dir), strict=True):
            assert la.keys() == lb.keys() and la == pytest.approx(lb, rel=rtol), (la, lb)


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.cluster), signal.SIGTERM])
def test_a_stop_between_logged_steps_resumes_bit_identical(tmp_path, sig, straight_run):
    """log_every = 10, no periodic checkpoints: the stop lands inside a chunk of steps, where a
    wrong count (saving step N with N - 1 updates) would go unseen with log_every = 1."""
    out, stopped, seen = _signal_and_resume(tmp_path, sig, INPROC, 150, log_every=10)
    assert stopped <= seen + 10, (seen, stopped)  # in the chunk after the logged step it followed
    _same_run(straight_run, out)


RAY2 = [*INPROC, "scaling.num_workers=2"]
RAY_STEPS = 100


@pytest.fixture(scope="module")
def straight_ray_run(tmp_path_factory):
    """One uninterrupted 2-worker run (driver mode; collective mode is bit-identical to it,
    tests/test_ray.py), the reference of every interrupted Ray run below: its in-process
    oracle, the same two shards a step (conftest.train_in_shards)."""
    straight = tmp_path_factory.mktemp("straight-ray") / "run"
    train_in_shards(straight, None, [*RAY2, f"training.steps={RAY_STEPS}", "training.checkpoint_every=0"], shards=2)
    return straight


@pytest.mark.ray
# driver mode is -m slow: a Ray driver's stop and bit-identical resume run in the dead-raylet test
# below (SIGTERM, the harder signal: Ray replaces its handler), the count inside a chunk in the
# in-process test above and tests/test_sampler_learner.py (the same loop, without timing)
@pytest.mark.parametrize(
    "mode, sig",
    [
        pytest.param("driver", signal.SIGINT, marks=pytest.mark.slow),
        pytest.param("collective", signal.SIGTERM, marks=pytest.mark.cluster),
    ],
)
def test_a_stop_between_logged_steps_with_ray_workers_resumes_bit_identical(tmp_path, mode, sig, straight_ray_run):
    """The same with 2 Ray workers. Driver mode stops after the step in flight (inside the
    chunk, unless the run reached its end before the signal landed); a collective group hands
    back control only at its chunk's end (the next logged step), and stops there."""
    out, stopped, seen = _signal_and_resume(tmp_path, sig, [*RAY2, f"scaling.mode={mode}"], RAY_STEPS, log_every=10)
    assert stopped % 10 == 0 if mode == "collective" else stopped <= seen + 10, (seen, stopped)
    _same_run(straight_ray_run, out)


@pytest.mark.ray
@pytest.mark.cluster
def test_sigterm_then_a_dead_raylet_under_a_ray_driver_resume_bit_identical(tmp_path, straight_ray_run):
    """Two Ray workers, stopped by SIGTERM, resumed, the raylet of that resume's local Ray
    SIGKILLed (the driver ends with one line of ours), resumed again: equal to the
    uninterrupted run bit for bit (the shards and their reduction order do not depend on where
    the run stopped)."""
    out, _, _ = _signal_and_resume(tmp_path, signal.SIGTERM, RAY2, RAY_STEPS, then_kill=True)
    a, b = (checkpoint.load(checkpoint.latest(d)) for d in (straight_ray_run, out))
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k


def test_a_second_signal_stops_at_once():
    from distributed_maml import stopping

    before = signal.getsignal(signal.SIGTERM)
    with stopping.handling():
        os.kill(os.getpid(), signal.SIGTERM)  # the first: only asks
        time.sleep(0.01)
        assert stopping.requested() == signal.SIGTERM
        with pytest.raises(stopping.Stopped, match="stopped at once by a second SIGINT") as e:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert e.value.exit_code == 130
    assert stopping.requested() is None and signal.getsignal(signal.SIGTERM) is before  # restored


def test_skip_policy_drops_nonfinite_steps_and_counts_them(tmp_path):
    cfg = config.load(
        None,
        [
            *INPROC,
            "training.steps=4",
            "training.log_every=1",
            "training.on_nonfinite=skip",
            "maml.inner_lr=1e30",
            "task.family=sinusoid",
            "model.name=sinusoid_mlp",
            "task.shots=10",
            "task.queries=10",
        ],
    )
    r = run.prepare(cfg, tmp_path / "r", progress=False)
    learner0 = train.make_learner(r).weights()
    result = train.train(r, train.make_executor(r), progress=False)
    assert result.last_metrics["skipped_steps"] == 4
    assert (result.weights == learner0).all()  # Adam never saw a non-finite gradient


def test_nonfinite_stop_through_the_cli_is_one_line(tmp_path):
    out = tmp_path / "r"
    proc = run_cli(
        "train", "--output-dir", out, "--no-progress", *_sets([*INPROC, "training.steps=5", "maml.inner_lr=1e30"])
    )
    assert_user_error(proc, "step 1: non-finite", "maml.inner_lr", "step_0")
    assert checkpoint.load(checkpoint.latest(out)).step == 0


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_checkpoint_is_refused_and_never_runs(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli("train", "--output-dir", out, "--no-progress", *_sets([*INPROC, "training.steps=2"])).returncode == 0
    marker = tmp_path / "pwned"
    evil = _Boom()
    evil.marker = marker
    model_pt = checkpoint.latest(out) / "model.pt"
    with open(model_pt, "wb") as f:
        pickle.dump({"0.weight": evil}, f)
    with pytest.raises(CheckpointError, match="refused by the safe loader"):
        checkpoint.load(checkpoint.latest(out))
    assert_user_error(run_cli("eval", "--run", out), "refused by the safe loader")
    assert_user_error(cli_in_process(capsys, "train", "--resume", out, "--no-progress"), "refused by the safe loader")
    assert not marker.exists()


def test_product_code_never_turns_ray_auth_off():
    for f in (REPO / "distributed_maml").rglob("*.py"):
        text = f.read_text()
        assert "RAY_AUTH_MODE" not in text and "auth_mode" not in text.lower(), f


@pytest.mark.parametrize("address", [None, "local", "10.0.0.1:6379"])
def test_local_ray_starts_without_a_dashboard(monkeypatch, address):
    import ray

    from distributed_maml.execution import driver

    seen = {}
    if address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    driver.connect()
    # joining a cluster leaves its dashboard as the cluster has it; a local Ray starts none
    assert ("include_dashboard" in seen) == (address != "10.0.0.1:6379")
    assert seen.get("include_dashboard", False) is False


# --- the bad-input table, through the CLI's main() (same code path as the console script) ---

BAD_SETS = [
    ("task.shots=0", "task.shots must be >= 1"),
    ("task.meta_batch=-3", "task.meta_batch must be >= 1"),
    ("task.family=omniglot", "task.family must be one of"),
    ("model.name=resnet", "model.name must be one of"),
    ("model.hidden=[0]", "model.hidden widths must be >= 1"),
    ("maml.inner_steps=0", "maml.inner_steps must be in [1, 100]"),
    ("maml.inner_lr=-0.1", "maml.inner_lr must be a finite number > 0"),
    ("maml.first_order=maybe", "maml.first_order must be true or false"),
    ("optimizer.lr=0", "optimizer.lr must be a finite number > 0"),
    ("training.steps=0", "training.steps must be >= 1"),
    ("training.steps=1.5", "training.steps must be an integer"),
    ("training.log_every=0", "training.log_every must be >= 1"),
    ("training.checkpoint_every=-1", "training.checkpoint_every must be >= 0"),
    ("training.on_nonfinite=ignore", "training.on_nonfinite must be one of"),
    ("scaling.num_workers=-2", "scaling.num_workers must be >= 0"),
    ("scaling.cpus_per_worker=0", "scaling.cpus_per_worker must be > 0"),
    ("scaling.gpus_per_worker=-1", "scaling.gpus_per_worker must be >= 0"),
    ("scaling.placement=random", "scaling.placement must be one of"),
    ("scaling.store_sharing=s3", "scaling.store_sharing must be one of"),
    ("scaling.max_worker_failures=0", "scaling.max_worker_failures must be >= 1"),
    ("training.stpes=3", "unknown key training.stpes"),
    ("trainer.steps=3", "unknown section [trainer]"),
    ("nodot=3", "--set takes section.key=value"),
    # a value of the wrong TOML type, in every section
    ('task.shots="5"', "task.shots must be an integer or [lo, hi], got '5'"),
    ('model.hidden="x"', "model.hidden must be a list of integers"),
    ('maml.inner_lr="fast"', "maml.inner_lr must be a number"),
    ("optimizer.lr=true", "optimizer.lr must be a number"),
    ('training.seed="a"', "training.seed must be an integer"),
    ('scaling.num_workers="2"', "scaling.num_workers must be an integer"),
    # a default store that could not hold one meta-batch (it would be built, then every step OOM)
    ("task.meta_batch=100000000", "larger than the default store"),
]


@pytest.mark.parametrize("override, needle", BAD_SETS)
def test_bad_config_values_through_the_cli(override, needle, tmp_path, capsys):
    code = cli.main(["train", "--set", override, "--output-dir", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def _path_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Every user-given path, made unusable in each way a user meets (root ignores permission
    bits, so permissions are shown by /sys and /proc, which refuse even root)."""
    afile = tmp / "afile"
    afile.write_text("x")
    build = ["tasks", "build", "--family", "seed", "--num-tasks", "10", "--out"]
    train = ["train", "--no-progress", "--set", "scaling.num_workers=0", "--set", "training.steps=2"]
    return {
        "output-dir on /proc": ([*train, "--output-dir", "/proc/dmaml-run"], "/proc/dmaml-run"),
        "output-dir on read-only /sys": ([*train, "--output-dir", "/sys/dmaml-run"], "/sys/dmaml-run"),
        "output-dir under a file": ([*train, "--output-dir", str(afile / "run")], "Not a directory"),
        "output-dir is a file": ([*train, "--output-dir", str(afile)], "is not an empty folder"),
        "out on /proc": ([*build, "/proc/dmaml.arrow"], "/proc/"),
        "out on read-only /sys": ([*build, "/sys/dmaml.arrow"], "/sys/"),
        "out under a file": ([*build, str(afile / "s.arrow")], "a file stands where a folder is needed"),
        "out is a folder": ([*build, str(tmp), "--overwrite"], "is a folder"),
        "out beyond the disk": ([*build[:5], "1000000000000", "--out", str(tmp / "big.arrow")], "would take about"),
        # a new user's first try at many tasks: the line names what that user wants
        "train beyond the disk": (
            [*train, "--set", "task.num_tasks=1000000000", "--output-dir", str(tmp / "big")],
            "task.on_the_fly = true",
        ),
        "tasks is a folder": ([*train, "--tasks", str(tmp), "--output-dir", str(tmp / "r")], "is a folder"),
        "resume a file": (["train", "--resume", str(afile)], "is a file, not a run folder"),
        "resume /proc": (["train", "--resume", "/proc"], "not a distributed-maml run folder"),
        "run a file": (["eval", "--run", str(afile)], "is a file, not a run folder"),
        "plot a file": (["plot", str(afile)], "not a distributed-maml run folder"),
        "config a folder": (["train", "--config", str(tmp)], "cannot be read"),
    }


def test_unusable_paths_are_one_line_and_write_nothing(tmp_path, capsys):
    for case, (argv, needle) in _path_cases(tmp_path).items():
        before = tree_digest(tmp_path)
        code = cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and needle in err and "Traceback" not in err, (case, err)
        assert tree_digest(tmp_path) == before, case
        assert not Path("/proc/dmaml-run").exists() and not Path("/sys/dmaml.arrow").exists()


def _file_size_limit(kib: int):
    """A real write error without filling the machine's disk: RLIMIT_FSIZE makes a write past
    `kib` KiB fail with EFBIG (Python ignores SIGXFSZ), as ENOSPC fails a write on a full disk."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, kib * 1024))


def test_a_write_error_mid_run_is_one_line_and_resume_continues(tmp_path):
    tasks = tmp_path / "tasks.arrow"
    data.build(tasks, "seed", 2000, progress=False)
    out = tmp_path / "r"
    overrides = [*INPROC, "training.steps=300", "training.log_every=1", "training.checkpoint_every=20"]
    argv = [sys.executable, "-m", "distributed_maml", "train", "--tasks", str(tasks), "--output-dir", str(out)]
    proc = subprocess.run(
        [*argv, "--no-progress", *_sets(overrides)],
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(64),  # metrics.jsonl passes 64 KiB after ~150 steps
    )
    assert_user_error(proc, "File too large", "is intact", f"--resume {out}")
    # the first file past the limit is named: the log, or TensorBoard's copy of it (it grows faster)
    assert f"{out / 'metrics.jsonl'}: File too large" in proc.stderr or f"{out / 'tensorboard'}" in proc.stderr
    last = checkpoint.latest(out).name
    assert f"the last checkpoint ({last}) is intact" in proc.stderr and last != "step_0"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary left
    resumed = run_cli("train", "--resume", out, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 301))  # the torn line was dropped, nothing doubled


def test_a_write_error_while_building_a_store_leaves_nothing(tmp_path):
    out = tmp_path / "s.arrow"
    proc = subprocess.run(
        [sys.executable, "-m", "distributed_maml", "tasks", "build", "--family", "seed", "--num-tasks", "20000"]
        + ["--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(256),
    )
    assert_user_error(proc, f"{out}: ", "File too large")
    assert list(tmp_path.iterdir()) == []  # neither the store nor its temporary file


def test_a_failed_checkpoint_write_keeps_latest_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    real = checkpoint._write_file

    def full_disk(path, data):
        if path.name == "optimizer.pt" and ".step_4." in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint, "_write_file", full_disk)
    out = tmp_path / "r"
    argv = ["train", "--output-dir", str(out), "--no-progress", *_sets([*INPROC, "training.steps=6"])]
    code = cli.main([*argv, "--set", "training.checkpoint_every=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "No space left on device" in err, err
    assert "the last checkpoint (step_2) is intact" in err and f"--resume {out}" in err, err
    assert checkpoint.latest(out).name == "step_2"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0", "step_2"]
    monkeypatch.setattr(checkpoint, "_write_file", real)
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert checkpoint.latest(out).name == "step_6"


def test_a_store_replaced_under_a_run_is_refused_at_resume(tmp_path):
    tasks = tmp_path / "tasks.arrow"
    data.build(tasks, "seed", 200, seed=1, progress=False)
    out = tmp_path / "r"
    assert cli.main(["train", "--tasks", str(tasks), "--output-dir", str(out), "--no-progress",
                     *_sets([*INPROC, "training.steps=2"])]) == 0  # fmt: skip
    data.build(tasks, "seed", 200, seed=2, overwrite=True, progress=False)  # same size, other tasks
    before = tree_digest(out)
    proc = run_cli("train", "--resume", out, "--set", "training.steps=4")
    assert_user_error(proc, f"{tasks} was replaced since the run trained on it", "different metadata")
    data.build(tasks, "seed", 300, seed=1, overwrite=True, progress=False)
    assert_user_error(run_cli("train", "--resume", out), "300 tasks instead of 200")
    assert tree_digest(out) == before


def test_toml_syntax_error_through_the_cli(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nsteps = = 3\n")
    assert_user_error(run_cli("train", "--config", bad), "bad.toml is not valid TOML")


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    before = tree_digest(tmp_path / "junk")
    assert_user_error(run_cli("train", "--resume", tmp_path / "junk"), "not a distributed-maml run folder")
    assert_user_error(cli_in_process(capsys, "train", "--resume", tmp_path / "nope"), "does not exist")
    assert tree_digest(tmp_path / "junk") == before


def test_resume_with_a_conflicting_config_changes_nothing(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli("train", "--output-dir", out, "--no-progress", *_sets([*INPROC, "training.steps=2"])).returncode == 0
    before = tree_digest(out)
    assert_user_error(
        run_cli("train", "--resume", out, "--set", "task.meta_batch=64"), "cannot resume", "task.meta_batch"
    )
    assert_user_error(
        cli_in_process(capsys, "train", "--resume", out, "--config", "jobs/sinusoid.toml"), "cannot resume"
    )
    assert tree_digest(out) == before


@pytest.mark.cluster  # Ray's object store over a 60-step run of 2 workers (~9 s): with the Ray-heavy tier
def test_object_references_do_not_leak_over_a_run(tmp_path):
    """The driver owns no more Ray objects after a run than before it, and the count is flat
    during the run (one weights object per step, released after the step)."""
    import gc

    import ray
    from ray._private.internal_api import memory_summary

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        core = ray._private.worker.global_worker.core_worker
        cfg = config.load(
            None,
            [
                "scaling.num_workers=2",
                "task.meta_batch=8",
                "training.steps=60",
                "training.log_every=30",
                "scaling.store_sharing=object_store",
            ],
        )
        r = run.prepare(cfg, tmp_path / "r", progress=False)
        gc.collect()
        baseline = len(core.get_all_reference_counts())
        ex = train.make_executor(r)
        counts, original = [], ex.compute

        def counting(weights, version, shards, *rest):
            counts.append(len(core.get_all_reference_counts()))
            return original(weights, version, shards, *rest)

        ex.compute = counting
        train.train(r, ex, progress=False)
        ex.close()
        del ex
        gc.collect()
        assert max(counts[10:]) <= counts[10] + 2, counts  # flat during the run (in-flight releases aside)
        assert len(core.get_all_reference_counts()) <= baseline + 1
        deadline = time.monotonic() + 20  # the object store frees asynchronously
        while "Plasma memory usage 0 MiB, 0 objects" not in (summary := memory_summary(stats_only=True)):
            assert time.monotonic() < deadline, summary
            time.sleep(0.5)
    finally:
        ray.shutdown()


OLD_RUN = REPO / "tests" / "assets" / "run-flat-layout"  # 6 steps, written by the flat layout (commit d2b143d)


@pytest.mark.cluster  # a one-time layout migration, a run and its resume in shells (~6 s): with the shell-heavy tier
def test_a_run_folder_written_before_the_layers_resumes_equal_to_a_straight_run(tmp_path):
    """A run folder of the previous layout (its checkpoint format unchanged) resumes under this
    one and ends equal to a straight run of this code on the same tasks: bit for bit until issue
    19's faster kernels (add with alpha, the losses without F's masks) moved the float rounding of
    its first 5 steps, now within 1e-6 relative (measured 1e-7) of this code's own."""
    old = tmp_path / "old"
    shutil.copytree(OLD_RUN, old)  # moved: the store is found in the folder, not at its recorded path
    resumed = run_cli("train", "--resume", old, "--no-progress", "--set", "training.steps=10")
    assert resumed.returncode == 0, resumed.stderr
    assert "steps 6..10" in resumed.stdout
    straight = run_cli(
        "train",
        "--config",
        OLD_RUN / "config.toml",
        "--tasks",
        OLD_RUN / "tasks.arrow",
        "--output-dir",
        tmp_path / "straight",
        "--no-progress",
        "--set",
        "training.steps=10",
    )
    assert straight.returncode == 0, straight.stderr
    _same_run(old, tmp_path / "straight", rtol=1e-6)
