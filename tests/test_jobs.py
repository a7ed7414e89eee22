"""`ray job submit`: a local head with its dashboard on 127.0.0.1, a job submitted through
JobSubmissionClient with jobs/runtime_env.yaml, waited on until SUCCEEDED, its run folder checked."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    temp = tmp_path_factory.mktemp("ray")
    start = [
        ray_bin,
        "start",
        "--head",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        "--num-cpus=2",
        "--object-store-memory=150000000",
        "--disable-usage-stats",
    ]
    proc = subprocess.run(start, capture_output=True, text=True, env=env, cwd=temp, timeout=120)
    assert proc.returncode == 0, proc.stderr
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)


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


def test_dashboard_binds_to_loopback_only(head):
    listeners = _listeners(int(head.rsplit(":", 1)[1]))
    assert listeners and all(a == "127.0.0.1" for a in listeners), listeners


def test_job_submit_runs_training_to_success(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head)
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    out = tmp_path / "job-run"  # an absolute path: the job's working dir is a temporary copy
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m distributed_maml train --config jobs/seed.toml --output-dir {out} "
        "--set training.steps=40 --set training.log_every=20 --no-progress",
        runtime_env=runtime_env,
    )
    deadline = time.monotonic() + 240
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, client.get_job_logs(job)
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs
    assert "Ray workers" in logs and "Step 40, Meta Loss:" in logs
    assert (out / "checkpoints" / "step_40" / "model.pt").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 20, 40]


def test_a_failing_job_reports_failed_with_the_one_line_error(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head)
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m distributed_maml train --set maml.inner_lr=-1", runtime_env=runtime_env
    )
    deadline = time.monotonic() + 120
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline
        time.sleep(1)
    assert client.get_job_status(job) == JobStatus.FAILED
    logs = client.get_job_logs(job)
    assert "maml.inner_lr must be a finite number > 0, got -1.0" in logs and "Traceback" not in logs
