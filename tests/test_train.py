"""Training, checkpoints and resume (in-process), through the library and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distributed_maml import config
from distributed_maml.core import models
from distributed_maml.errors import CheckpointError, ConfigError
from distributed_maml.training import checkpoint, run, train

from .conftest import assert_user_error, run_cli, tree_digest

SMALL = ["task.meta_batch=8", "training.log_every=2", "maml.inner_steps=2", "scaling.num_workers=0"]


def _train(tmp, name, steps, extra=(), resume=False):
    if resume:
        r = run.resume(tmp / name, overrides=[f"training.steps={steps}", *extra])
    else:
        cfg = config.load(None, [*SMALL, f"training.steps={steps}", "task.num_tasks=40", *extra])
        r = run.prepare(cfg, tmp / name, progress=False)
    ex = train.make_executor(r)
    try:
        return train.train(r, ex, progress=False)
    finally:
        ex.close()


def _load(run_dir):
    return checkpoint.load(checkpoint.latest(run_dir))


VARIANTS = {
    "maml": [],
    "reptile": ["maml.algorithm=reptile"],  # SGD's state, not Adam's
    "anil": ["maml.algorithm=anil"],
    "maml++": [  # schedules, and learned per-layer per-step inner step sizes
        "maml.multi_step_loss=true",
        "maml.msl_anneal_steps=6",
        "maml.first_order_until=3",
        "maml.learn_inner_lr=per-layer-per-step",
    ],
    "meta-sgd": ["maml.algorithm=meta-sgd"],  # a step size per weight element, in inner_lr.pt
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, variant):
    extra = VARIANTS[variant]
    _train(tmp_path, "straight", 9, extra)
    _train(tmp_path, "stopped", 4, extra)
    _train(tmp_path, "stopped", 9, resume=True)
    a, b = _load(tmp_path / "straight"), _load(tmp_path / "stopped")
    assert a.step == b.step == 9 and a.version == b.version == 9
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    for sa, sb in zip(a.optimizer["state"].values(), b.optimizer["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    lines = [json.loads(x) for x in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 4, 6, 8, 9]
    assert set(a.inner_lr) == set(b.inner_lr) and all(torch.equal(a.inner_lr[k], b.inner_lr[k]) for k in a.inner_lr)
    learned = "learn_inner_lr" in str(extra) or "meta-sgd" in str(extra)
    assert bool(a.inner_lr) == learned  # learned step sizes live beside model.pt, which stays the network's
    if learned:  # and they moved: they are meta-trained, not constants
        assert any(not torch.all(v == 0.5) for v in a.inner_lr.values())
    model = models.build(config.load(None, SMALL).model, run.resume(tmp_path / "straight").store.info, seed=0)
    model.load_state_dict(a.model)  # strict: exactly the network's parameters


def test_resume_from_a_middle_checkpoint_after_a_crash(tmp_path):
    """Checkpoints every 3 steps; the run 'dies' after step 7 (latest = step 6); resume to 9."""
    _train(tmp_path, "straight", 9)
    _train(tmp_path, "crashed", 7, ["training.checkpoint_every=3"])
    # simulate the crash: step 7's end-of-run checkpoint never happened
    ckdir = tmp_path / "crashed" / "checkpoints"
    import shutil

    shutil.rmtree(ckdir / "step_7")
    (ckdir / "latest").write_text("step_6")
    _train(tmp_path, "crashed", 9, resume=True)
    a, b = _load(tmp_path / "straight"), _load(tmp_path / "crashed")
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k


def test_checkpoint_is_a_plain_state_dict(tmp_path):
    result = _train(tmp_path, "r", 3)
    path = checkpoint.latest(tmp_path / "r") / "model.pt"
    state = torch.load(path, weights_only=True)
    cfg = config.load(None, SMALL)
    from distributed_maml.data.store import TaskStore

    model = models.build(cfg.model, TaskStore.open(tmp_path / "r" / "tasks.arrow").info, seed=0)
    model.load_state_dict(state)  # strict: names and shapes are the nn.Module's own
    flat = models.ParamSpec.of(model).flatten(dict(model.named_parameters())).detach().numpy()
    np.testing.assert_array_equal(flat, result.weights)
    meta = json.loads((path.parent / "state.json").read_text())
    assert meta["sampler"] == {"seed": 0, "num_tasks": 40, "meta_batch": 8} and meta["step"] == 3


def test_an_interrupted_save_leaves_latest_on_a_complete_checkpoint(tmp_path, monkeypatch):
    _train(tmp_path, "r", 2)
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # model.pt written, optimizer.pt not: the process 'dies' here
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "r", 4, resume=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text() == "step_2"
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == [
        "best",
        "best.json",
        "latest",
        "step_0",
        "step_2",
    ]
    assert _load(tmp_path / "r").step == 2


def test_resume_rejects_a_conflicting_config(tmp_path):
    _train(tmp_path, "r", 2)
    before = tree_digest(tmp_path / "r")
    with pytest.raises(ConfigError, match="maml.inner_lr"):
        run.resume(tmp_path / "r", overrides=["maml.inner_lr=0.1"])
    assert tree_digest(tmp_path / "r") == before


def test_resume_needs_a_run_with_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        run.resume(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a distributed-maml run"):
        run.resume(tmp_path / "empty")


def test_existing_run_folder_is_never_overwritten(tmp_path):
    _train(tmp_path, "r", 2)
    before = tree_digest(tmp_path / "r")
    proc = run_cli("train", "--output-dir", tmp_path / "r", "--no-progress")
    assert_user_error(proc, "already holds a run", "--resume")
    assert tree_digest(tmp_path / "r") == before


def test_eval_on_a_run_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.toml").write_text("")
    assert_user_error(run_cli("eval", "--run", tmp_path / "r"), "has no checkpoint")


def test_nonfinite_loss_stops_before_adam_and_keeps_good_weights(tmp_path):
    # an absurd inner step makes the support loss explode within a few steps
    with pytest.raises(Exception, match="non-finite") as e:
        _train(tmp_path, "r", 6, ["maml.inner_lr=1e30", "task.family=sinusoid", "model.name=sinusoid_mlp"])
    assert "step 1" in str(e.value) and "inner_lr" in str(e.value)
    ck = _load(tmp_path / "r")
    assert ck.step == 0 and all(torch.isfinite(v).all() for v in ck.model.values())


def test_one_writer_per_run_folder(tmp_path):
    """A run being written refuses a second writer (one line naming the holder, exit 2, nothing
    changed); the lock ends with the training, and a SIGKILLed holder never blocks a resume."""
    import os
    import signal
    import subprocess
    import sys

    cfg = config.load(None, ["training.steps=2", "task.meta_batch=4", "scaling.num_workers=0", "training.eval_every=0"])
    r = run.prepare(cfg, tmp_path / "r", progress=False)
    train.train(r, train.make_executor(r), progress=False)
    held = run.resume(tmp_path / "r", overrides=["training.steps=3"])  # this process now writes it
    before = tree_digest(tmp_path / "r")
    proc = run_cli("train", "--resume", tmp_path / "r", "--set", "training.steps=4")
    assert_user_error(proc, f"being written by pid {os.getpid()}", "--resume")
    assert tree_digest(tmp_path / "r") == before
    with pytest.raises(CheckpointError, match="one writer per run"):
        run.resume(tmp_path / "r")
    train.train(held, train.make_executor(held), progress=False)  # releases the lock at the end
    # a holder killed with SIGKILL: the kernel drops its lock
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from distributed_maml.training.runlock import RunLock; "
            "lock = RunLock(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
            str(tmp_path / "r"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(CheckpointError, match=f"pid {holder.pid}"):
        run.resume(tmp_path / "r")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    again = run.resume(tmp_path / "r", overrides=["training.steps=4"])
    assert train.train(again, train.make_executor(again), progress=False).step == 4


@pytest.mark.parametrize("keep, expected", [(3, [6, 8, 10]), (0, [0, 2, 4, 6, 8, 10])])
def test_checkpoint_retention(tmp_path, keep, expected):
    overrides = [
        "training.steps=10",
        "training.checkpoint_every=2",
        f"training.keep_checkpoints={keep}",
        "task.meta_batch=4",
        "scaling.num_workers=0",
        "training.eval_every=0",
    ]
    r = run.prepare(config.load(None, overrides), tmp_path / "r", progress=False)
    train.train(r, train.make_executor(r), progress=False)
    kept = sorted(int(p.name[5:]) for p in (tmp_path / "r" / "checkpoints").glob("step_*"))
    assert kept == expected and checkpoint.latest(tmp_path / "r").name == "step_10"
    assert not list((tmp_path / "r" / "checkpoints").glob(".step_*"))  # no temporary folder left
    again = run.resume(tmp_path / "r", overrides=["training.steps=12", "training.keep_checkpoints=1"])
    train.train(again, train.make_executor(again), progress=False)
    assert [p.name for p in (tmp_path / "r" / "checkpoints").glob("step_*")] == ["step_12"]


def test_tensorboard_event_files_hold_the_logged_numbers_across_a_resume(tmp_path):
    """Every metrics.jsonl number is a TensorBoard scalar at its step (TensorBoard's own reader);
    a resume from an earlier checkpoint than the last logged step leaves one value per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, "r", 6, ["training.checkpoint_every=2", "training.eval_every=3", "training.eval_tasks=8"])
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints" / "latest").write_text("step_4")  # as if it crashed after step 4's checkpoint
    _train(tmp_path, "r", 8, ["training.checkpoint_every=2", "training.eval_every=3"], resume=True)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    lines = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        lines[rec["step"]] = rec  # a re-logged step: its later line, as TensorBoard's purge keeps
    tags = set(events.Tags()["scalars"])
    assert {"train/meta_loss", "train/loss_before", "val/val_loss", "time/tasks_per_s", "time/compute_s"} <= tags
    for tag, key, sub in [
        ("train/meta_loss", "meta_loss", None),
        ("train/loss_after", "loss_after", None),
        ("val/val_loss", "val_loss", None),
        ("val/val_loss_ci95", "val_loss_ci95", None),
        ("time/compute_s", "time", "compute_s"),
    ]:
        want = {s: (r[key][sub] if sub else r[key]) for s, r in lines.items() if key in r}
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert len(events.Scalars(tag)) == len(got), tag  # step 6, logged twice, is kept once
        assert got.keys() == want.keys(), (tag, got, want)
        assert all(got[s] == pytest.approx(want[s], rel=1e-6) for s in want), (tag, got, want)


def test_a_resumed_runs_events_file_sorts_after_the_previous_one(tmp_path, monkeypatch):
    """TensorBoard reads a folder's event files in name order (events.out.tfevents.<second>.
    <host>.<pid>.<counter>), and a resume's purge of the older file's later steps needs the new
    file last. The same process making the next file in the same second, its counter past 9
    (".10" sorts before ".9"), put it first: a sweep's trials and a long test session do."""
    import os
    import socket
    import time

    from tensorboard.summary.writer import event_file_writer

    from distributed_maml.training.scalars import Scalars

    tb = tmp_path / "tensorboard"
    tb.mkdir()
    (tb / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.9").write_bytes(b"")
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(10))
    scalars = Scalars(tmp_path, 4)
    scalars.close()
    files = sorted(p.name for p in tb.iterdir())
    assert len(files) == 2 and files[-1].endswith(".10"), files
