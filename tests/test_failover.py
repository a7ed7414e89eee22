"""The failover policy's decisions, and the rule that every wait on the cluster is bounded.
Ray-free: no cluster is started here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from distributed_maml.errors import TrainingError
from distributed_maml.execution.failover import Action, Failover

PACKAGE = Path(__file__).resolve().parents[1] / "distributed_maml"


def test_no_wait_on_the_cluster_outside_the_bounded_helper():
    """ray.get / ray.wait only in raywait.py (each there with a timeout): a new raw call
    elsewhere is how a run came to hang forever on a lost node."""
    raw = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("get", "wait")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "ray"
            ):
                where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
                bounded = any(k.arg == "timeout" for k in node.keywords)
                if path.name != "raywait.py" or not bounded:
                    raw.append(where)
    assert not raw, f"unbounded or raw ray.get/ray.wait (use distributed_maml.raywait): {raw}"


def test_shards_stay_home_until_their_worker_retires_then_come_back():
    p = Failover(size=3, max_failures=3, timeout_s=5)
    assert p.owners(3) == [0, 1, 2]
    d = p.silent(1, shard=1)
    assert d.action is Action.MOVE and 1 in p.retired and p.owners(3) == [0, 2, 2]  # round robin over [0, 2]
    assert p.may_return() == [1]  # lost, not broken: its slot may be placed again
    p.back(1)
    assert p.owners(3) == [0, 1, 2] and p.failures == [0, 0, 0]


def test_a_failed_worker_is_retried_while_it_restarts_and_has_failures_left():
    p = Failover(size=2, max_failures=3, timeout_s=5)
    first = p.failed(1, shard=1, restarted=True)
    assert first.action is Action.RETRY and first.worker == 1 and p.failures == [0, 1]
    no_restart = p.failed(1, shard=1, restarted=False)
    assert no_restart.action is Action.MOVE and no_restart.worker == 0 and p.retired == {1}
    assert p.may_return() == []  # retired for failing: it stays out


def test_the_last_allowed_failure_retires_even_a_restarted_worker():
    p = Failover(size=2, max_failures=1, timeout_s=5)
    d = p.failed(0, shard=0, restarted=True)
    assert d.action is Action.MOVE and d.worker == 1 and p.failures == [1, 0] and p.healthy() == [1]


def test_no_healthy_worker_left_is_one_line_that_says_how_to_go_on():
    p = Failover(size=1, max_failures=3, timeout_s=7)
    with pytest.raises(TrainingError, match="no healthy worker left .* silent 7 s.*--resume"):
        p.silent(0, shard=0)


def test_shards_go_by_measured_speed_each_worker_at_least_one():
    from distributed_maml.execution.failover import proportional

    assert proportional(8, [1.0, 1.0]) == [4, 4]
    assert proportional(8, [2.0, 1.0]) == [5, 3]  # 5.33 / 2.67: the remainder to the most under target
    assert proportional(8, [100.0, 1.0]) == [7, 1]  # a crawling worker keeps one (its speed stays measured)
    assert proportional(3, [1.0, 1.0, 1.0, 1.0]) == [1, 1, 1, 0]  # fewer shards than workers
    assert sum(proportional(13, [3.0, 1.0, 0.5])) == 13
    p = Failover(size=2, max_failures=3, timeout_s=5)
    assert p.owners(4) == [0, 1, 0, 1]  # no speeds yet: round robin
    p.observe(0, tasks=30, seconds=1.0)
    assert p.owners(4) == [0, 1, 0, 1]  # worker 1 not measured yet
    p.observe(1, tasks=10, seconds=1.0)
    assert p.owners(4) == [0, 0, 0, 1]  # 3:1
    p.observe(1, tasks=50, seconds=1.0)  # an average: 0.5 * 10 + 0.5 * 50 = 30 tasks/s
    assert p.speeds[1] == 30.0 and p.owners(4) == [0, 0, 1, 1]
    p.silent(1, shard=2)
    assert p.owners(4) == [0, 0, 0, 0]  # retired: its shards to the rest


def test_a_gpu_pool_beside_cpu_pools_gives_each_worker_its_slice_and_device(monkeypatch):
    """scaling.pools = [1 x 1 GPU, 2 x 1 CPU]: the slots' Ray bundles and each worker's device,
    in worker order; a GPU slice on a node whose torch sees no CUDA is one line naming the
    worker, not a CPU worker holding GPU shards. (A real GPU beside CPUs: tests/test_gpu.py.)"""
    import torch

    from distributed_maml.config import ScalingConfig
    from distributed_maml.execution.actor import slice_device

    pools = [{"num_workers": 1, "gpus_per_worker": 1}, {"num_workers": 2, "cpus_per_worker": 1}]
    scaling = ScalingConfig(pools=pools)
    assert scaling.num_workers == 3
    slices = scaling.slices(3)
    assert slices == [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}], slices
    assert scaling.describe_slices() == "1 x 1 CPU, 1 GPU; 2 x 1 CPU", scaling.describe_slices()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [slice_device(s.get("GPU", 0.0), f"worker-{i}") for i, s in enumerate(slices)] == ["cuda:0", "cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        RuntimeError, match=r"^worker-0 holds 1 GPU but torch .* sees no CUDA device; .*gpus_per_worker = 0"
    ):
        slice_device(1.0, "worker-0")
    assert slice_device(0.0, "worker-1") == "cpu"
