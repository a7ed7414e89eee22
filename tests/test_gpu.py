"""GPU slices (run on a CUDA machine: `pytest -m gpu`; skipped elsewhere). One GPU worker, and
two workers sharing one GPU, give the in-process CPU weights to float32 tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distributed_maml.config import MamlConfig, ModelConfig
from distributed_maml.data.store import TaskStore
from distributed_maml.data.writing import build
from distributed_maml.execution.computer import ShardComputer

from .conftest import train_on

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BASE = ["task.meta_batch=64", "task.num_tasks=256", "training.steps=6", "training.log_every=3", "maml.inner_steps=3"]


STORE_TASKS = 256  # the shared store_path fixture (conftest.py) builds this many


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


def test_shard_on_gpu_matches_cpu(store_path):
    store = TaskStore.open(store_path)
    ids = np.arange(0, 256, 3)
    weights = np.random.default_rng(0).normal(scale=0.1, size=834).astype(np.float32)
    cpu = ShardComputer(store, ModelConfig(), MamlConfig()).compute(weights, ids)
    gpu_computer = ShardComputer(store, ModelConfig(), MamlConfig(), device="cuda:0")
    assert gpu_computer.resident is not None  # the store lives on the GPU: only ids travel
    gpu = gpu_computer.compute(weights, ids)
    np.testing.assert_allclose(gpu.grad_sum, cpu.grad_sum, rtol=1e-4, atol=1e-5)
    assert gpu.metrics["loss_after"] == pytest.approx(cpu.metrics["loss_after"], rel=1e-5)


def test_glyph_shard_on_gpu_gathers_images_on_the_device(tmp_path):
    """The image table lives on the GPU; the vmap conv4 shard there equals the CPU loop."""
    path = tmp_path / "glyphs.arrow"
    build(path, "glyphs", 40, seed=0, shots=1, queries=5, progress=False)
    store = TaskStore.open(path)
    model, maml = ModelConfig(name="conv4", channels=16), MamlConfig(inner_steps=1, inner_lr=0.4)
    cpu_computer = ShardComputer(store, model, maml)
    weights = cpu_computer.spec.flatten(dict(cpu_computer.model.named_parameters())).detach().numpy()
    ids = np.arange(0, 40, 2)
    gpu_computer = ShardComputer(store, model, maml, device="cuda:0")
    assert gpu_computer.resident is not None and "images" in gpu_computer.resident
    assert (cpu_computer.task_map, gpu_computer.task_map) == ("loop", "vmap")
    cpu, gpu = cpu_computer.compute(weights, ids), gpu_computer.compute(weights, ids)
    np.testing.assert_allclose(gpu.grad_sum, cpu.grad_sum, rtol=1e-3, atol=1e-4)


@pytest.mark.ray
@pytest.mark.parametrize("workers, gpus", [(1, 1.0), (2, 0.5)])
def test_gpu_workers_match_the_cpu_in_process_run(ray_gpu, tmp_path, store_path, workers, gpus):
    reference, _ = train_on(tmp_path / "cpu", store_path, [*BASE, "scaling.num_workers=0"])
    seen = {}
    result, _ = train_on(
        tmp_path / "gpu",
        store_path,
        [*BASE, f"scaling.num_workers={workers}", f"scaling.gpus_per_worker={gpus}"],
        hook=lambda ex: seen.update(info=ex.worker_info()),
    )
    assert [i.device for i in seen["info"]] == ["cuda:0"] * workers
    assert len({tuple(i.gpu_ids) for i in seen["info"]}) == 1  # the same card, shared
    np.testing.assert_allclose(result.weights, reference.weights, rtol=1e-4, atol=1e-5)


@pytest.mark.ray
def test_a_gpu_pool_beside_a_cpu_pool_in_one_run(ray_gpu, tmp_path, store_path):
    """scaling.pools: one worker on the GPU, one on a CPU, 4 shards a step handed out by speed:
    each computes on its own device, and the weights are the CPU run's to float32 tolerance."""
    reference, _ = train_on(tmp_path / "cpu", store_path, [*BASE, "scaling.num_workers=0"])
    seen = {}
    pools = "scaling.pools=[{num_workers = 1, gpus_per_worker = 1}, {num_workers = 1, cpus_per_worker = 1}]"
    result, ex = train_on(
        tmp_path / "mixed",
        store_path,
        [*BASE, pools, "scaling.shards_per_worker=2"],
        hook=lambda ex: seen.update(info=ex.worker_info()),
    )
    assert [i.device for i in seen["info"]] == ["cuda:0", "cpu"] and ex.num_shards == 4
    np.testing.assert_allclose(result.weights, reference.weights, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [100, 64, 1000])
def test_graph_step_matches_the_eager_step(store_path, n):
    """An unlogged step replayed from a CUDA graph (padded to a power of two) gives the eager
    step's sums; a logged step (unadapted metrics too) runs eagerly."""
    from distributed_maml.execution.graphstep import padded_size

    store = TaskStore.open(store_path)
    ids = np.random.default_rng(n).integers(0, 256, size=n)
    weights = np.random.default_rng(1).normal(scale=0.1, size=834).astype(np.float32)
    maml = MamlConfig(inner_steps=5)
    eager = ShardComputer(store, ModelConfig(), maml, device="cuda:0", gpu_step="eager")
    graph = ShardComputer(store, ModelConfig(), maml, device="cuda:0", gpu_step="graph")
    want = eager.compute(weights, ids, before=False)
    for _ in range(2):  # the capture, then a replay
        got = graph.compute(weights, ids, before=False)
        assert graph.graphs is not None and graph.graphs.failed is None
        assert list(graph.graphs.graphs) == [padded_size(n)] and graph.step_kind == "CUDA-graph steps"
        np.testing.assert_allclose(got.grad_sum, want.grad_sum, rtol=1e-6, atol=1e-6 * np.abs(want.grad_sum).max())
        assert got.metrics["loss_after"] == pytest.approx(want.metrics["loss_after"], rel=1e-6)
    logged = graph.compute(weights, ids, before=True)
    assert "loss_before" in logged.metrics


def test_in_process_run_with_the_learner_on_the_gpu(tmp_path, store_path):
    """scaling.device = "cuda", in-process: the learner and Adam on the device, unlogged steps
    replayed as one CUDA graph each. Equal bit for bit to the same run with fused eager steps
    (the graph replays the eager kernels), and to the host learner's run to float32 rounding."""
    cfg = [*BASE, "scaling.num_workers=0", "training.steps=9", "training.log_every=4"]
    graph, ex = train_on(tmp_path / "graph", store_path, [*cfg, "scaling.device=cuda"])
    assert ex.device_steps is not None and ex.device_steps.fused is not None
    assert ex.device_steps.fused.graph is not None and ex.device_steps.failed is None  # the graph ran
    assert "one CUDA graph a step" in ex.describe()
    eager, _ = train_on(tmp_path / "eager", store_path, [*cfg, "scaling.device=cuda", "scaling.gpu_step=eager"])
    np.testing.assert_array_equal(graph.weights, eager.weights)
    host, _ = train_on(tmp_path / "host", store_path, [*cfg, "scaling.device=cpu"])
    np.testing.assert_allclose(graph.weights, host.weights, rtol=1e-4, atol=1e-5)
    # the checkpoint written on the GPU resumes on the CPU and goes on as the CPU run does
    from distributed_maml.training import run, train

    r = run.resume(tmp_path / "graph", None, ["training.steps=12", "scaling.device=cpu"])
    resumed = train.train(r, train.make_executor(r), progress=False)
    assert resumed.step == 12 and np.isfinite(resumed.weights).all()


@pytest.mark.parametrize("model", ["conv4", "resnet12"])
def test_conv_graph_step_with_per_task_batchnorm(tmp_path, model):
    """The CUDA-graph step for conv nets with per-task BatchNorm equals the eager step."""
    path = tmp_path / "glyphs.arrow"
    build(path, "glyphs", 40, seed=0, shots=1, queries=5, progress=False)
    store = TaskStore.open(path)
    kwargs = {"widths": [8, 16, 32, 64]} if model == "resnet12" else {}
    cfg = ModelConfig(name=model, channels=16, kwargs=kwargs)
    maml = MamlConfig(inner_steps=2, inner_lr=0.4)
    eager = ShardComputer(store, cfg, maml, device="cuda:0", gpu_step="eager")
    graph = ShardComputer(store, cfg, maml, device="cuda:0", gpu_step="graph")
    weights = eager.spec.flatten(dict(eager.model.named_parameters())).detach().cpu().numpy()
    ids = np.arange(0, 40, 2)
    want = eager.compute(weights, ids, before=False)
    got = graph.compute(weights, ids, before=False)
    assert graph.graphs is not None and graph.graphs.failed is None
    np.testing.assert_allclose(got.grad_sum, want.grad_sum, rtol=1e-5, atol=1e-5 * np.abs(want.grad_sum).max())


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_collective_device_path_on_nccl_equals_the_per_step_path(tmp_path, monkeypatch, policy):
    """A one-rank NCCL group on this GPU: the chunk's unlogged steps with nothing read back
    (collectivesteps) give the per-step path's weights and Adam state bit for bit, with a NaN
    task in mid-chunk (the learner on the GPU in both)."""
    import torch.distributed as dist

    from .test_collectivesteps import run
    from .test_devicesteps import POISONED_STEP, poisoned_store

    path = poisoned_store(tmp_path / "poisoned.arrow")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        ref, ref_seen = run(path, "per-step", policy == "stop", monkeypatch, device="cuda:0")
        got, seen = run(path, "device", policy == "stop", monkeypatch, device="cuda:0")
    finally:
        dist.destroy_process_group()
    assert [o.step for o in ref_seen if not o.finite] == [POISONED_STEP]  # the fault happened
    assert [(o.step, o.finite) for o in seen] == [(o.step, o.finite) for o in ref_seen]
    assert got.device.type == "cuda"
    np.testing.assert_array_equal(got.weights(), ref.weights())
    a, b = got.optimizer.state_dict()["state"][0], ref.optimizer.state_dict()["state"][0]
    assert all(torch.equal(a[k].cpu(), b[k].cpu()) for k in ("exp_avg", "exp_avg_sq", "step"))
