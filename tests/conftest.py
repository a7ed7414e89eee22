"""Shared helpers. Ray-free: tests that need Ray start one instance per module themselves."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "token")  # explicit, and on: as the product runs
# Every test starts its own Ray: never join a head that `ray start` left on this machine (a
# neighbouring test module's, under pytest -n, or a developer's own)
os.environ["RAY_ADDRESS"] = "local"


SLOW_TIMEOUT_S = 1800  # a `slow` test trains for minutes (the glyph demonstrations: 5-8 on 2 cores)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """pytest-timeout's 300 s bounds the default suite's tests against hangs; a `slow` test
    without its own bound gets SLOW_TIMEOUT_S instead (they train on purpose)."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 240, env: dict | None = None
) -> subprocess.CompletedProcess:
    """The real command line in a fresh interpreter (exit codes and stderr as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "distributed_maml", *map(str, args)],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def cli_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """The command line's parser and error path in this interpreter (cli.main), as a
    CompletedProcess for assert_user_error: for many bad-input cases, where a fresh interpreter
    per case costs seconds each (keep one run_cli case per test for what a shell sees)."""
    from distributed_maml.cli import main as cli

    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 or lines[0].startswith("usage:"), err
    for n in needles:
        assert n in err, (n, err)


def tree_digest(path: Path) -> dict[str, str]:
    """Content hash of every file under path (to prove nothing on disk changed)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, request):
    """A seed-family task store on disk, one per test module: STORE_TASKS tasks (a module
    attribute, default 60), seed 0."""
    from distributed_maml.data.writing import build

    path = tmp_path_factory.mktemp("store") / "seed.arrow"
    build(path, "seed", getattr(request.module, "STORE_TASKS", 60), seed=0, progress=False)
    return path


def trained_once(tmp_path_factory, name: str, train) -> Path:
    """A module's trained run (its input data), made by `train(folder)` in a temporary folder; or,
    when DMAML_TEST_RUNS names a folder (tools/mutate.py sets it), made there once and reused by
    later test sessions: a mutant of the code under test then pays for its tests, not for
    training the same run again. A run found there is complete (its `done` marker)."""
    cache = os.environ.get("DMAML_TEST_RUNS")
    if not cache:
        return train(tmp_path_factory.mktemp(name) / name)
    folder = Path(cache) / name
    if (folder / ".complete").exists():
        return folder
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    out = train(folder)
    (folder / ".complete").write_text("")
    return out


def train_on(run_dir: Path, store_path: Path | None, overrides, hook=None, config_path: Path | None = None):
    """Trains a run through the library (the CLI's path minus argv): on an existing store, or
    (store_path None) on the store its config builds, as `train` does; `hook` sees the executor
    before the first step. Returns (TrainResult, executor)."""
    from distributed_maml import config
    from distributed_maml.training import run, train

    r = run.prepare(config.load(config_path, list(overrides)), run_dir, tasks=store_path, progress=False)
    ex = train.make_executor(r)
    try:
        if hook:
            hook(ex)
        return train.train(r, ex, progress=False), ex
    finally:
        ex.close()


def train_in_shards(run_dir: Path, config_path: Path | None, overrides, shards: int):
    """The in-process oracle of a `shards`-worker driver-mode run: the same shards a step,
    computed here one after another on one torch thread (as a 1-CPU worker computes them) and
    summed in shard order by the learner, so equal to that run bit for bit. On the store its
    config builds, as `train` does."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overrides = [*overrides, "scaling.num_workers=0"]
        return train_on(run_dir, None, overrides, lambda ex: setattr(ex, "num_shards", shards), config_path)[0]
    finally:
        torch.set_num_threads(threads)
