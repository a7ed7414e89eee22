"""The examples/ scripts run as a user runs them (a fresh interpreter, from the repository)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO


def test_use_a_run_trains_adapts_predicts_and_exports(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "use_a_run.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = float(proc.stdout.split("accuracy ")[1].split()[0])
    assert 0.6 < accuracy <= 1.0, proc.stdout  # the seed problem's 2-way tasks, after 200 meta-steps
    assert "the export adapts and predicts the same, bit for bit" in proc.stdout
    assert (tmp_path / "export" / "model.safetensors").is_file() and (tmp_path / "run" / "config.toml").is_file()
