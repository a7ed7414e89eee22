"""scaling.device and the learner on the device (issue 29), on the CPU.

- The fused step (execution/devicesteps.py: meta-gradient, mean, finiteness, Adam in one
  device function, read back once per chunk) runs eagerly here with `capture=False` and must
  give the driver loop's weights bit for bit, stop where it stops and skip what it skips.
- Every computation of a run (training, validation, eval's curves, its step-size tuning and
  pretrained baseline, bench --eval) is built on the device scaling.device resolves to (a spy).
- scaling.device = "cuda" without CUDA is one line, before anything is made.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distributed_maml.execution import devices
from distributed_maml.execution.computer import ShardComputer
from distributed_maml.execution.devicesteps import DeviceSteps
from distributed_maml.execution.inprocess import InProcessExecutor

from .conftest import assert_user_error, cli_in_process, train_on

BASE = [
    "task.meta_batch=8",
    "task.num_tasks=64",
    "training.steps=12",
    "training.log_every=5",
    "training.eval_every=0",
    "scaling.num_workers=0",
    "maml.inner_steps=2",
]


def fused(ex: InProcessExecutor) -> None:
    ex.device_steps = DeviceSteps(ex.computer, capture=False)


def losses(run_dir) -> list[float]:
    return [json.loads(line)["meta_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fused_steps_equal_the_driver_loop(tmp_path, store_path):
    ref, _ = train_on(tmp_path / "ref", store_path, BASE)
    got, ex = train_on(tmp_path / "fused", store_path, BASE, hook=fused)
    assert ex.device_steps is not None and ex.device_steps.fused is not None  # the fused path ran
    assert "fused steps" in ex.describe()
    np.testing.assert_array_equal(got.weights, ref.weights)
    assert losses(tmp_path / "fused") == losses(tmp_path / "ref")
    a = torch.load(tmp_path / "ref" / "checkpoints" / "step_12" / "optimizer.pt", weights_only=True)
    b = torch.load(tmp_path / "fused" / "checkpoints" / "step_12" / "optimizer.pt", weights_only=True)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(a["state"][0][k], b["state"][0][k]), k


POISONED_STEP = 7  # an unlogged step in the middle of the chunk 6..10 (log_every 5)


def poisoned_store(
    path,
    num_tasks: int = 64,
    meta_batch: int = 8,
    step: int = POISONED_STEP,
    family: str = "seed",
    column: str = "x_support",
    value: float = np.nan,
):
    """A `family` store whose one task, drawn first at `step`, has `column` all `value` (NaN
    features by default: a non-finite loss and gradient)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from distributed_maml.data.sampler import Sampler
    from distributed_maml.data.writing import build

    clean = path.with_suffix(".clean.arrow")
    build(clean, family, num_tasks, seed=0, progress=False)
    table = ipc.open_file(pa.memory_map(str(clean))).read_all()
    bad = int(Sampler(0, num_tasks, meta_batch).ids(step - 1)[0])
    x = table.column(column).combine_chunks()
    values = x.values.to_numpy(zero_copy_only=False).copy()
    width = x.type.list_size
    values[bad * width : (bad + 1) * width] = value
    poisoned = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), width)
    index = table.schema.get_field_index(column)
    table = table.set_column(index, pa.field(column, x.type, nullable=False), poisoned)
    with ipc.new_file(str(path), table.schema) as w:
        w.write_table(table)
    return path


# A step made non-finite two ways: NaN features (loss and gradient NaN), or a query target of
# 1e19 on a sinusoid (the squared error overflows: the loss is inf while every gradient entry
# stays finite, ~1e24; a finiteness check that reads the gradient only lets Adam take it).
POISONS = {
    "nan-features": ({}, []),
    "inf-loss-finite-gradient": (
        {"family": "sinusoid", "column": "y_query", "value": 1e19},
        ["task.family=sinusoid", "model.name=sinusoid_mlp"],
    ),
}


@pytest.mark.parametrize("poison", sorted(POISONS))
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_fused_steps_handle_a_non_finite_step_as_the_driver_loop(tmp_path, policy, poison):
    """A task that makes a step non-finite, first drawn at an unlogged step in mid-chunk: "stop"
    ends at that step with the same saved weights, "skip" drops the same steps, same final
    weights."""
    store_kw, sets = POISONS[poison]
    store = poisoned_store(tmp_path / "poisoned.arrow", **store_kw)
    cfg = [*BASE, *sets, f"training.on_nonfinite={policy}"]
    outcomes = {}
    for name, hook in (("ref", None), ("fused", fused)):
        try:
            result, _ = train_on(tmp_path / name, store, cfg, hook=hook)
            outcomes[name] = ("done", result.weights, result.last_metrics.get("skipped_steps"))
        except Exception as e:  # TrainingError: the step and the saved weights are named
            outcomes[name] = ("stopped", int(str(e).split("step ")[1].split(":")[0]), None)
    kind = outcomes["ref"][0]
    assert kind == ("stopped" if policy == "stop" else "done"), outcomes["ref"]  # the fault happened
    assert outcomes["fused"][0] == kind
    if kind == "stopped":
        assert outcomes["fused"][1] == outcomes["ref"][1] == POISONED_STEP
        ref_ckpt = sorted((tmp_path / "ref" / "checkpoints").glob("step_*"))[-1]
        got_ckpt = sorted((tmp_path / "fused" / "checkpoints").glob("step_*"))[-1]
        assert ref_ckpt.name == got_ckpt.name
        a = torch.load(ref_ckpt / "model.pt", weights_only=True)
        b = torch.load(got_ckpt / "model.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert outcomes["ref"][2] > 0  # steps were skipped
        assert outcomes["fused"][2] == outcomes["ref"][2]
        np.testing.assert_array_equal(outcomes["fused"][1], outcomes["ref"][1])


def test_fused_steps_after_a_skipped_first_step_start_adams_state_as_the_driver_loop(tmp_path, monkeypatch):
    """The training loop logs step 1 through the driver loop, so the fused path meets an Adam
    with no state only when step 1 was not applied: on_nonfinite = "skip" with a bad first step
    (or a resume of such a run). The fused steps then make Adam's state themselves
    (masked._init_state) and must equal the driver loop, whose Adam makes it lazily."""
    from distributed_maml.execution.devicesteps import FusedStep

    store = poisoned_store(tmp_path / "poisoned.arrow", step=1)  # drawn again at steps 12 and 19 (fused)
    cfg = [*BASE, "training.on_nonfinite=skip", "training.steps=20"]
    fresh: list[bool] = []  # per FusedStep made: whether Adam had no state yet
    made = FusedStep.__init__

    def spy(self, computer, learner, *rest):
        fresh.append(not learner.optimizer.state)
        made(self, computer, learner, *rest)

    monkeypatch.setattr(FusedStep, "__init__", spy)
    ref, _ = train_on(tmp_path / "ref", store, cfg)
    got, _ = train_on(tmp_path / "fused", store, cfg, hook=fused)
    first = json.loads((tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["skipped_steps"] == 1  # the fault: step 1 was not applied
    assert fresh and fresh[0], fresh  # the fused path met Adam without state, as meant
    assert ref.last_metrics["skipped_steps"] == got.last_metrics["skipped_steps"] == 3  # steps 1, 12 and 19
    np.testing.assert_array_equal(got.weights, ref.weights)
    a = torch.load(tmp_path / "ref" / "checkpoints" / "step_20" / "optimizer.pt", weights_only=True)
    b = torch.load(tmp_path / "fused" / "checkpoints" / "step_20" / "optimizer.pt", weights_only=True)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(a["state"][0][k], b["state"][0][k]), k


def test_a_finite_gradient_with_a_non_finite_loss_is_never_applied():
    """MaskedUpdate (the fused step's and the collective device path's update) reads the loss
    as well as the gradient: a step whose loss is inf leaves the weights and Adam's state as
    they were, and under "stop" so does every step after it."""
    from distributed_maml.config import MamlConfig
    from distributed_maml.core.learner import Learner
    from distributed_maml.core.models import ParamSpec
    from distributed_maml.execution.masked import MaskedUpdate

    learner = Learner.of(ParamSpec(("w",), ((3,),)), torch.zeros(3), MamlConfig(), lr=0.1)
    update = MaskedUpdate(learner, stop=True)
    grad = torch.tensor([1.0, -2.0, 0.5])
    assert bool(update.apply(grad, torch.tensor(0.3)))  # a good step: applied
    before = [t.clone() for t in update.state]
    assert not bool(update.apply(grad, torch.tensor(float("inf"))))  # finite gradient, inf loss
    assert not bool(update.apply(grad, torch.tensor(float("nan"))))
    assert all(torch.equal(a, b) for a, b in zip(update.state, before, strict=True))
    assert bool(update.halted)  # "stop": nothing after it is applied either
    assert bool(update.apply(grad, torch.tensor(0.3)))  # finite, but halted
    assert all(torch.equal(a, b) for a, b in zip(update.state, before, strict=True))


def test_every_computation_gets_the_configured_device(tmp_path, monkeypatch):
    """A spy on ShardComputer and the Learner: with scaling.device resolving to a device of its
    own ("cpu:0", distinguishable from the default "cpu"), training, validation, eval's curves,
    its step-size tuning, its pretrained baseline and bench --eval are all built on it."""
    from distributed_maml.bench import evaluation as bench_eval
    from distributed_maml.core import learner as learner_mod
    from distributed_maml.evaluation import evaluate

    spied = torch.device("cpu", 0)
    monkeypatch.setattr(devices, "resolve", lambda scaling: devices.Compute(spied, "fp32"))
    built: list[tuple[str, str]] = []
    init_computer, init_learner = ShardComputer.__init__, learner_mod.Learner.__init__

    def computer(self, store, model_cfg, maml_cfg, device="cpu", name="in-process", **kw):
        built.append((f"computer:{name}", str(device)))
        init_computer(self, store, model_cfg, maml_cfg, device, name, **kw)

    def learner(self, spec, initial, lr, optimizer="adam", device="cpu"):
        built.append(("learner", str(device)))
        init_learner(self, spec, initial, lr, optimizer, device)

    monkeypatch.setattr(ShardComputer, "__init__", computer)
    monkeypatch.setattr(learner_mod.Learner, "__init__", learner)
    # the protocol's sizes cut to what the spy needs: which device each piece is built on
    monkeypatch.setattr(evaluate, "VALIDATION_TASKS", 4)
    monkeypatch.setattr(evaluate, "PRETRAINED_LR_GRID", (0.3, 1.0, 3.0))
    monkeypatch.setattr(bench_eval, "STEPS", (0, 1))
    cfg = [*BASE, "task.num_tasks=0", "training.steps=4", "training.eval_every=2", "training.eval_tasks=10"]
    train_on(tmp_path / "run", None, cfg)
    evaluate.evaluate(tmp_path / "run", steps=(0, 1), num_tasks=6, pretrain_steps=2)
    names = {n for n, _ in built}
    for want in ("computer:in-process", "computer:validation", "computer:step-size tuning", "learner"):
        assert want in names, (want, built)
    assert sum(n == "learner" for n, _ in built) >= 2  # the run's learner and the pretrained baseline's
    built_bench_start = len(built)
    monkeypatch.setattr(
        bench_eval, "GLYPH_RUN", [*bench_eval.GLYPH_RUN, "model.channels=4", "task.meta_batch=2", "task.num_tasks=8"]
    )
    bench_eval.measure(train_tasks=2, eval_tasks=2, pretrain_steps=1)
    assert any(n == "computer:bench" for n, _ in built[built_bench_start:])
    assert [b for b in built if b[1] != "cpu:0"] == []


def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    proc = cli_in_process(
        capsys, "train", "--set", "scaling.device=cuda", "--set", "scaling.num_workers=0", "--output-dir", out
    )
    assert_user_error(proc, "scaling.device = 'cuda'", "no CUDA device")
    assert not out.exists()
    proc = cli_in_process(capsys, "train", "--set", "scaling.device=cpu", "--set", "scaling.gpus_per_worker=1")
    assert_user_error(proc, "contradicts scaling.gpus_per_worker")


def test_bf16_meta_gradient_is_close_to_fp32(store_path):
    """precision = "bf16" autocasts the meta-gradient (weights stay float32): close to fp32,
    not equal (the error is the point of the option; bench --precision measures it)."""
    from distributed_maml.config import MamlConfig, ModelConfig
    from distributed_maml.data.store import TaskStore

    store = TaskStore.open(store_path)
    ids = np.arange(16)
    fp32 = ShardComputer(store, ModelConfig(), MamlConfig(inner_steps=1))
    bf16 = ShardComputer(store, ModelConfig(), MamlConfig(inner_steps=1), precision="bf16")
    w = fp32.spec.flatten(dict(fp32.model.named_parameters())).detach().numpy()
    a, b = fp32.compute(w, ids).grad_sum, bf16.compute(w, ids).grad_sum
    assert b.dtype == np.float32
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert 0 < rel < 0.1, rel


@pytest.mark.parametrize("stop_after", [1, 3])
def test_a_stop_inside_a_fused_chunk_reports_the_last_step_applied(tmp_path, store_path, monkeypatch, stop_after):
    """SIGTERM while the fused path runs the unlogged steps 6..9 (log_every 5): the chunk ends
    after the step in flight, the run saves and reports that step (not one past it), and its
    weights are the driver loop's at that step, bit for bit. On a GPU the fused path is the
    default in-process loop: a Ctrl-C there must never save a step that was not applied."""
    import signal

    from distributed_maml import stopping
    from distributed_maml.execution.devicesteps import FusedStep
    from distributed_maml.training import checkpoint

    runs: list[int] = []  # the fused steps run
    original = FusedStep.run

    def run(self, ids):
        original(self, ids)
        runs.append(1)
        if len(runs) == 3 + stop_after:  # steps 2..4 are the first chunk's unlogged ones; then `stop_after` of 6..9
            stopping._handle(signal.SIGTERM, None)  # what the handler does on the signal

    monkeypatch.setattr(FusedStep, "run", run)
    try:
        with pytest.raises(stopping.Stopped, match=r"stopped at step (\d+)") as e:
            train_on(tmp_path / "fused", store_path, BASE, hook=fused)
    finally:
        stopping.reset()
    stopped = 5 + stop_after
    assert f"stopped at step {stopped};" in str(e.value)
    assert len(runs) == 3 + stop_after  # the fault happened where meant: no fused step after the stop
    saved = checkpoint.load(checkpoint.latest(tmp_path / "fused"))
    assert saved.step == stopped
    ref, _ = train_on(tmp_path / "ref", store_path, [*BASE, f"training.steps={stopped}"])
    want = torch.load(tmp_path / "ref" / "checkpoints" / f"step_{stopped}" / "model.pt", weights_only=True)
    assert all(torch.equal(saved.model[k], want[k]) for k in want)
    assert saved.version == stopped  # every step applied, none more
