"""A golden loss curve: the meta-loss of the first 20 steps of the default config (in-process,
640 tasks) must stay what it was when the file was written. Catches silent numeric drift in the
task generator, the sampler, the meta-gradient or Adam. Regenerate it deliberately, never to
make a failure go away."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distributed_maml import config
from distributed_maml.training import run, train

GOLDEN = Path(__file__).parent / "assets" / "losses" / "seed_inprocess_20steps.txt"


def test_meta_loss_matches_the_golden_file(tmp_path):
    expected = [
        (int(s), float(v))
        for s, v in (line.split() for line in GOLDEN.read_text().splitlines() if line and not line.startswith("#"))
    ]
    cfg = config.load(
        None,
        [
            "scaling.num_workers=0",
            "training.steps=20",
            "training.log_every=1",
            "task.num_tasks=640",
            "training.eval_every=0",
        ],
    )
    r = run.prepare(cfg, tmp_path / "r", progress=False)
    train.train(r, train.make_executor(r), progress=False)
    got = [
        (m["step"], m["meta_loss"])
        for m in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
    ]
    assert [s for s, _ in got] == [s for s, _ in expected]
    # float32 kernels may round differently across CPUs and torch builds: 1e-4 relative
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-4)
