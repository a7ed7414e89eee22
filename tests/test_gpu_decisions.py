"""The GPU path's decisions, on the CPU (issue 37): which device a worker's slice computes on,
which TF32 switches a precision sets, whether a step is a CUDA graph or eager, where the learner
lives, and how many GPUs a worker asks Ray for. Each is a decision made from configuration and
from whether torch sees CUDA, so each is tested here with CUDA's availability patched; only what
needs a card (a captured graph, NCCL, the numbers) stays in the gpu-marked tests/test_gpu.py.
Ray-free: nothing here starts Ray."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from distributed_maml.config import MamlConfig, ScalingConfig
from distributed_maml.errors import ConfigError
from distributed_maml.execution import devices
from distributed_maml.execution.actor import slice_device
from distributed_maml.execution.computer import why_eager
from distributed_maml.execution.inprocess import InProcessExecutor

CUDA = torch.device("cuda", 0)


@pytest.fixture
def cuda_seen(monkeypatch):
    """torch sees one CUDA device (nothing here touches one: only the decisions ask)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.fixture
def tf32_switches():
    """The process-wide TF32 switches, restored after the test."""
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def switches() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


# -- device per slice (execution/actor.py: slice_device) ------------------------------------


@pytest.mark.parametrize("gpus", [1.0, 0.5, 0.25, 0.01, 2.0])
def test_a_slice_with_any_share_of_a_gpu_computes_on_it(cuda_seen, gpus):
    """A fractional slice (two workers sharing a card) computes on the card: a CPU worker
    holding a GPU's reservation would compute at a CPU's pace while the card idles."""
    assert slice_device(gpus, "worker-0") == "cuda:0"


def test_a_slice_without_a_gpu_computes_on_the_cpu_even_beside_cuda(cuda_seen):
    assert slice_device(0.0, "worker-1") == "cpu"


@pytest.mark.parametrize("gpus", [1.0, 0.5])
def test_a_gpu_slice_where_torch_sees_no_cuda_is_one_line(monkeypatch, gpus):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=rf"^worker-3 holds {gpus:g} GPU but torch .* sees no CUDA device"):
        slice_device(gpus, "worker-3")


# -- precision switches (core/precision.py, through devices.resolve) ---------------------------


@pytest.mark.parametrize(
    "precision, expect", [("fp32", (False, False)), ("bf16", (False, False)), ("tf32", (True, True))]
)
def test_a_cuda_run_sets_the_tf32_switches_its_precision_asks_for(cuda_seen, tf32_switches, precision, expect):
    """PyTorch's default lets cuDNN convolve in TF32 (cudnn.allow_tf32 is True): an fp32 run that
    left the switches alone would convolve in TF32 (3% off the CPU's meta-gradient on an H100).
    Both switches start the wrong way round, so a mode that skips setting either one fails."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not expect[0]
    compute = devices.resolve(ScalingConfig(device="auto", precision=precision, num_workers=0))
    assert compute.device == CUDA and compute.precision == precision
    assert switches() == expect


def test_a_cpu_run_leaves_the_process_tf32_switches_alone(cuda_seen, tf32_switches):
    """scaling.device = "cpu" on a machine with CUDA: nothing of CUDA's is touched."""
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    compute = devices.resolve(ScalingConfig(device="cpu", precision="tf32", num_workers=0))
    assert compute.device == torch.device("cpu")
    assert switches() == (True, False)


# -- the run's device (execution/devices.py: resolve) -----------------------------------------


def test_device_auto_takes_cuda_when_torch_sees_it_and_the_cpu_otherwise(monkeypatch, cuda_seen):
    assert devices.resolve(ScalingConfig(device="auto", num_workers=0)).device == CUDA
    assert devices.resolve(ScalingConfig(device="cuda", num_workers=0)).device == CUDA
    assert devices.resolve(ScalingConfig(device="cpu", num_workers=0)).device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve(ScalingConfig(device="auto", num_workers=0)).device == torch.device("cpu")


def test_device_cuda_without_cuda_is_an_error_only_where_this_process_computes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^scaling.device = 'cuda' but this machine has no CUDA device"):
        devices.resolve(ScalingConfig(device="cuda", num_workers=0))
    # Ray workers hold the GPUs: the driver does its own part (validation) on its CPU
    assert devices.resolve(ScalingConfig(device="cuda", num_workers=2)).device == torch.device("cpu")


# -- graph or eager (execution/computer.py: why_eager) ----------------------------------------


def test_only_a_cuda_vmap_step_with_a_fixed_plan_is_a_graph():
    plain, mamlpp = MamlConfig(), MamlConfig(multi_step_loss=True)
    assert why_eager("graph", CUDA, "vmap", plain) is None
    assert why_eager("eager", CUDA, "vmap", plain) == "scaling.gpu_step = 'eager'"
    assert why_eager("graph", torch.device("cpu"), "vmap", plain) == "graphs need CUDA"
    assert why_eager("graph", CUDA, "loop", plain) == "tasks by loop"
    assert why_eager("graph", CUDA, "vmap", mamlpp) == "MAML++ schedules change the step"
    assert why_eager("graph", CUDA, "vmap", plain, shapes_vary=True) == "episodes of variable shape"


def test_variable_episodes_are_never_fused_nor_run_on_the_collective_device_path():
    """A padded batch's shape changes from step to step: the fused step and the collective
    loop's device path (one input buffer of one shape) must refuse it."""
    from distributed_maml.execution import collectivesteps
    from distributed_maml.execution.devicesteps import why_not_fused

    for vary in (False, True):
        c = SimpleNamespace(task_map="vmap", maml_cfg=MamlConfig(), shapes_vary=vary)
        assert (why_not_fused(c) == "episodes of variable shape") is vary
        assert collectivesteps.eligible(c) is not vary


# -- where the learner lives (execution/inprocess.py; the Ray executors) ----------------------


def _computer_on(device: torch.device, gpu_step: str = "graph") -> SimpleNamespace:
    """What InProcessExecutor reads of its computer to decide (a real one would need the card)."""
    return SimpleNamespace(device=device, gpu_step=gpu_step, task_map="vmap", maml_cfg=MamlConfig())


@pytest.mark.parametrize("gpu_step, capture", [("graph", True), ("eager", False)])
def test_an_in_process_run_on_cuda_keeps_its_learner_there_with_fused_steps(gpu_step, capture):
    ex = InProcessExecutor(_computer_on(CUDA, gpu_step))  # type: ignore[arg-type]
    assert ex.learner_device == "cuda:0"
    assert ex.device_steps is not None and ex.device_steps.capture is capture


def test_an_in_process_run_on_the_cpu_keeps_the_driver_loop():
    ex = InProcessExecutor(_computer_on(torch.device("cpu")))  # type: ignore[arg-type]
    assert ex.learner_device == "cpu" and ex.device_steps is None


def test_ray_executors_keep_the_learner_on_the_driver_cpu():
    from distributed_maml.execution.collective import CollectiveExecutor
    from distributed_maml.execution.driver import RayExecutor

    assert RayExecutor.learner_device == "cpu" and CollectiveExecutor.learner_device == "cpu"


# -- the GPUs a worker asks Ray for (execution/driver.py: auto_gpus) --------------------------


@pytest.mark.parametrize(
    "device, num_workers, gpus, cluster_gpus, expect",
    [
        ("cuda", 2, 0.0, 0, 1.0),  # "cuda": each worker one GPU
        ("auto", -1, 0.0, 4, 1.0),  # auto-sized on a GPU cluster: one worker per GPU
        ("auto", 2, 0.0, 4, 0.0),  # an explicit worker count without GPUs asked for: CPU workers
        ("auto", -1, 0.0, 0, 0.0),  # no GPU in the cluster
        ("cpu", -1, 0.0, 4, 0.0),  # "cpu": never a GPU
        ("auto", 2, 0.5, 4, 0.5),  # a fraction asked for is kept
    ],
)
def test_workers_ask_for_the_gpus_the_device_setting_implies(
    monkeypatch, device, num_workers, gpus, cluster_gpus, expect
):
    import ray

    from distributed_maml.execution.driver import auto_gpus

    monkeypatch.setattr(
        ray, "cluster_resources", lambda: {"CPU": 8.0, **({"GPU": cluster_gpus} if cluster_gpus else {})}
    )
    got = auto_gpus(ScalingConfig(device=device, num_workers=num_workers, gpus_per_worker=gpus))
    assert got.gpus_per_worker == expect
