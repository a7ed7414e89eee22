"""`ray job submit` as the README says it: the shell commands of its job section, run as written
(ports, the output folder and the run's length changed) in a clean environment — no variable of
this test process leaks in — against a head started by the README's own `ray start` line."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from distributed_maml.training import checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.cluster]  # its own tier: pytest -m cluster

REPO = Path(__file__).resolve().parents[1]
RUN_LENGTH = ["--set", "training.steps=100000", "--set", "task.num_tasks=2000", "--set", "training.log_every=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_job_commands() -> list[str]:
    """The README's `ray job submit` block: one string per command (continuations joined,
    comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = text.split("### `ray job submit`", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        command = line.split("  #", 1)[0].strip()
        if command:
            commands.append(" ".join(command.split()))
    return commands


class Shell:
    """Runs README lines with bash in a clean environment: PATH (this venv first, for `ray` and
    `python`), a private HOME, and whatever the README's own `export` lines set."""

    def __init__(self, home: Path, dashboard: int, port: int, out: Path) -> None:
        venv_bin = str(Path(sys.executable).parent)
        self.env = {"PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
        self.dashboard, self.port, self.out = dashboard, port, out
        # the head's own temp dir (short: Ray's socket paths must fit 107 bytes): its
        # ray_current_cluster stays there, so no other Ray on this machine joins this head, and
        # the teardown can stop exactly this head's processes
        self.temp = tempfile.mkdtemp(prefix="dmjob", dir="/tmp")

    def adapt(self, command: str) -> str:
        """The test's changes: free ports, a small head, a temporary output folder, a run
        long enough to stop."""
        command = command.replace("127.0.0.1:8265", f"127.0.0.1:{self.dashboard}")
        command = command.replace("/shared/runs/sinusoid", str(self.out))
        if command.startswith("ray start"):
            command += (
                f" --port={self.port} --dashboard-port={self.dashboard} --num-cpus=2"
                f" --dashboard-agent-listen-port={_free_port()}"  # not 52365: a local Ray may hold it
                f" --object-store-memory=150000000 --disable-usage-stats --temp-dir={self.temp}"
            )
        if "--config jobs/sinusoid.toml" in command:
            command += " " + shlex.join(RUN_LENGTH)
        return command

    def run(self, command: str, timeout: float = 180) -> subprocess.CompletedProcess:
        if command.startswith("export "):
            name, value = command.removeprefix("export ").split("=", 1)
            self.env[name] = value
            return subprocess.CompletedProcess(command, 0, "", "")
        return subprocess.run(
            ["bash", "-c", self.adapt(command)],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    commands = readme_job_commands()
    home = tmp_path_factory.mktemp("home")
    sh = Shell(home, _free_port(), _free_port(), tmp_path_factory.mktemp("shared") / "runs" / "sinusoid")
    sh.commands = commands
    for command in commands[: commands.index(next(c for c in commands if c.startswith("ray start"))) + 1]:
        proc = sh.run(command)
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
    try:
        yield sh
    finally:
        assert "ray stop" in commands  # the README ends its block with it; here it would stop every Ray
        _stop_head(sh)


def _stop_head(shell: Shell) -> None:
    """What the README's `ray stop` does, for this head only (`ray stop` kills every Ray on the
    machine, a neighbouring test module's too): every process whose command line names the
    head's temp dir or GCS port, and all their descendants."""
    procs = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(d.name)] = (ppid, args)
    doomed = {pid for pid, (_, args) in procs.items() if shell.temp in args or f":{shell.port} " in args + " "}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in doomed} - doomed
        doomed |= more
        grew = bool(more)
    doomed.discard(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in doomed:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(1)


def _the(shell: Shell, prefix: str, nth: int = 0) -> str:
    return [c for c in shell.commands if c.startswith(prefix)][nth]


def _logs(shell: Shell, job: str) -> str:
    command = _the(shell, "ray job logs").replace(" -f ", " ").replace("raysubmit_XXXXXXXX", job)
    return shell.run(command).stdout


def _status(shell: Shell, job: str) -> str:
    """succeeded, failed, stopped, or running (anything else `ray job status` says)."""
    proc = shell.run(f"ray job status --address http://127.0.0.1:{shell.dashboard} {job}")
    found = re.findall(rf"Job '{job}' (succeeded|failed|stopped)", proc.stdout + proc.stderr)
    return found[-1] if found else "running"


def _wait(shell: Shell, job: str, until, timeout: float = 240) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if until(job):
            return _logs(shell, job)
        time.sleep(1)
    raise AssertionError(_logs(shell, job))


def _submit(shell: Shell, command: str) -> str:
    proc = shell.run(command)
    assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
    return re.search(r"raysubmit_\w+", proc.stdout + proc.stderr).group(0)


def test_readme_job_section_submit_list_logs_stop_resume(shell):
    """Submit, list, follow, `ray job stop` (SIGTERM: the last step is saved), resubmit with
    --resume: the run continues from the step it stopped at."""
    job = _submit(shell, _the(shell, "ray job submit", 0))
    listed = shell.run(_the(shell, "ray job list"))
    assert listed.returncode == 0 and job in listed.stdout, listed.stderr

    def past_step_5(j: str) -> bool:
        return re.search(r"Step ([6-9]|\d\d+),", _logs(shell, j)) is not None

    _wait(shell, job, past_step_5)
    stop = shell.run(_the(shell, "ray job stop").replace("raysubmit_XXXXXXXX", job))
    assert stop.returncode == 0, stop.stderr
    followed = shell.run(_the(shell, "ray job logs").replace("raysubmit_XXXXXXXX", job), timeout=60).stdout
    line = re.search(r"distributed-maml: stopped at step (\d+); continue with (.*)", followed)
    assert line, followed
    assert "Traceback" not in followed and "SIGTERM received" not in followed, followed
    stopped = int(line.group(1))
    assert line.group(2) == f"distributed-maml train --resume {shell.out}"
    assert checkpoint.latest(shell.out).name == f"step_{stopped}"  # saved, not lost since the last periodic one

    resume = _the(shell, "ray job submit", 1) + f" --set training.steps={stopped + 3} --no-progress"
    job2 = _submit(shell, resume)
    logs = _wait(shell, job2, lambda j: _status(shell, j) != "running")
    assert _status(shell, job2) == "succeeded", logs
    assert f"steps {stopped}..{stopped + 3}" in logs and f"done: {stopped + 3} steps" in logs, logs
    assert checkpoint.latest(shell.out).name == f"step_{stopped + 3}"


def test_a_failing_job_fails_with_the_one_line_error(shell):
    submit = _the(shell, "ray job submit", 0).split(" -- ")[0].replace(" --no-wait", "")
    proc = shell.run(f"{submit} -- python -m distributed_maml train --set maml.inner_lr=-1")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "maml.inner_lr must be a finite number > 0, got -1.0" in out and "Traceback" not in out, out


def _listeners(port: int) -> list[str]:
    """Addresses listening on a TCP port, read from /proc/net/tcp{,6} (state 0A = LISTEN)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:
                found.append(socket.inet_ntoa(bytes.fromhex(addr)[::-1]) if len(addr) == 8 else addr)
    return found


def test_dashboard_binds_to_loopback_only(shell):
    listeners = _listeners(shell.dashboard)
    assert listeners and all(a == "127.0.0.1" for a in listeners), listeners


def test_the_job_cli_without_the_token_export_is_refused(shell):
    """Why the README exports RAY_AUTH_MODE: without it Ray 2.60's job CLI sends no token."""
    env = {k: v for k, v in shell.env.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run(
        ["bash", "-c", shell.adapt(_the(shell, "ray job list"))], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "auth" in (proc.stdout + proc.stderr).lower()


def test_the_sweep_docs_job_block_runs_a_sweep_on_the_head(shell, tmp_path):
    """docs/sweeps.md's `ray job submit` line for `tune`, against this module's head: a short
    sweep (two trials of 20 steps) ends with its table and best.toml in the output folder."""
    text = (REPO / "docs" / "sweeps.md").read_text()
    block = text.split("### Under `ray job submit`", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    command = " ".join(block.replace("\\\n", " ").split())
    assert command.startswith("ray job submit") and " tune jobs/sweep-sinusoid.toml " in command, command
    out = tmp_path / "sweep"
    command = command.replace("/shared/runs/sweep-sin", str(out)).replace("--trials 8", "--trials 2")
    command += " --set training.steps=20 --set training.eval_every=10 --set task.num_tasks=200"
    proc = shell.run(command, timeout=240)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in logs, logs[-4000:]
    assert "best: " in logs and (out / "best.toml").exists() and len(list((out / "trials").iterdir())) == 2, logs[
        -4000:
    ]
