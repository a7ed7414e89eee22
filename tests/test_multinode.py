"""Two Ray nodes on this machine (ray.cluster_utils.Cluster): spread placement puts workers on
distinct nodes, the store is shared, and the weights equal the in-process run's. Removing the
worker node mid-run loses nothing."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from .conftest import train_on

pytestmark = [pytest.mark.ray, pytest.mark.cluster]  # its own tier: pytest -m cluster

BASE = ["task.meta_batch=10", "task.num_tasks=60", "training.steps=6", "training.log_every=3", "maml.inner_steps=2"]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 100 * 2**20})
    c.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


def _idle(timeout: float = 30) -> None:
    """Until the previous pool's CPUs are back: Ray returns a killed actor's and a removed
    placement group's resources asynchronously, and SPREAD is soft (a node still busy is
    skipped), so a pool placed at once after another may land on fewer nodes."""
    end = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        assert time.monotonic() < end, (ray.available_resources(), ray.cluster_resources())
        time.sleep(0.1)


def test_spread_workers_land_on_distinct_nodes_with_the_in_process_weights(cluster, tmp_path, store_path):
    reference, _ = train_on(tmp_path / "ref", store_path, [*BASE, "scaling.num_workers=0"])
    seen = {}
    result, ex = train_on(
        tmp_path / "spread",
        store_path,
        [*BASE, "scaling.num_workers=2", "scaling.placement=spread"],
        hook=lambda ex: seen.update(info=ex.worker_info()),
    )
    nodes = {i.node_id for i in seen["info"]}
    assert len(nodes) == 2, seen
    np.testing.assert_allclose(result.weights, reference.weights, rtol=1e-5, atol=1e-6)
    for extra in (["scaling.store_sharing=object_store"],):
        _idle()
        again, ex = train_on(
            tmp_path / "spread-os", store_path, [*BASE, "scaling.num_workers=2", "scaling.placement=spread", *extra]
        )
        assert ex.store_mode == "object_store"
        np.testing.assert_allclose(again.weights, reference.weights, rtol=1e-5, atol=1e-6)
    # the same two nodes as one gloo group (rank 0's node address through Ray): driver mode's weights
    _idle()
    group, ex = train_on(
        tmp_path / "spread-collective",
        store_path,
        [*BASE, "scaling.num_workers=2", "scaling.placement=spread", "scaling.mode=collective"],
        hook=lambda ex: seen.update(group=ex.worker_info()),
    )
    assert ex.backend == "gloo" and len({i.node_id for i in seen["group"]}) == 2
    np.testing.assert_array_equal(group.weights, result.weights)


def _remove_at_call(cluster, node, at: int, seen: dict, until_known_dead: bool = False):
    """Removes `node` before the executor's call number `at` (and, `until_known_dead`, waits
    until the cluster has marked it dead: the call then goes to an actor Ray holds pending)."""

    def hook(ex):
        seen["before"] = ex.worker_info()
        original, calls = ex.compute, {"n": 0}

        def compute(weights, version, shards, *rest):
            calls["n"] += 1
            if calls["n"] == at:
                cluster.remove_node(node)
                end = time.monotonic() + 60
                while until_known_dead and any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
                    assert time.monotonic() < end
                    time.sleep(0.2)
            return original(weights, version, shards, *rest)

        ex.compute = compute

    return hook


def test_losing_a_node_with_no_spare_slot_moves_its_shards_and_never_hangs(cluster, tmp_path, store_path):
    """Every CPU of the cluster holds a worker; the node of one goes away at step 3. Ray keeps
    that actor pending (its bundle fits nowhere) and a call to it would wait forever: it is
    silent past scaling.worker_timeout_s, retired, its shards move to the live workers, and the
    run ends with the undisturbed weights."""
    reference, _ = train_on(tmp_path / "ref", store_path, [*BASE, "scaling.num_workers=0"])
    doomed = cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    cluster.wait_for_nodes()
    seen: dict = {}
    full = int(ray.cluster_resources()["CPU"])  # one worker per CPU: no spare slot anywhere
    overrides = [*BASE, f"scaling.num_workers={full}", "scaling.placement=spread", "scaling.worker_timeout_s=5"]
    t0 = time.monotonic()
    hook = _remove_at_call(cluster, doomed, 3, seen, until_known_dead=True)
    result, ex = train_on(tmp_path / "full", store_path, overrides, hook)
    assert doomed.node_id in {i.node_id for i in seen["before"]}
    assert len(ex.healthy()) == full - 1
    assert time.monotonic() - t0 < 55  # bounded by worker_timeout_s = 5, not by a fixed minute or forever
    np.testing.assert_allclose(result.weights, reference.weights, rtol=1e-5, atol=1e-6)


def test_losing_the_worker_node_mid_run_loses_nothing(cluster, tmp_path, store_path):
    """The worker node goes away at step 3: its actor is restarted on the head node (its
    placement-group bundle is rescheduled there), the shard it owed is computed again, and the
    run ends with the undisturbed weights."""
    reference, _ = train_on(tmp_path / "ref", store_path, [*BASE, "scaling.num_workers=0"])
    doomed = cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    cluster.wait_for_nodes()
    seen: dict = {}
    hook = _remove_at_call(cluster, doomed, 3, seen)
    result, ex = train_on(
        tmp_path / "lossy",
        store_path,
        [*BASE, "scaling.num_workers=3", "scaling.placement=spread", "scaling.worker_timeout_s=8"],
        hook,
    )
    assert doomed.node_id in {i.node_id for i in seen["before"]}
    assert sum(ex.failures) >= 1
    np.testing.assert_allclose(result.weights, reference.weights, rtol=1e-5, atol=1e-6)


@ray.remote(num_cpus=1)
class _Hog:
    """Holds a CPU, so that a pool cannot be placed whole until it is killed."""

    def ping(self) -> int:
        return 1


def test_an_elastic_run_starts_at_min_and_grows_to_max_with_the_full_runs_weights(cluster, tmp_path, store_path):
    """scaling.num_workers = [2, 3] on a cluster with room for 2: the run starts with 2; the CPU
    frees up at step 3 and the third worker joins. A step's shards are always 3, summed in shard
    order: the weights equal a 3-worker run's that never lacked one, bit for bit."""
    full, _ = train_on(tmp_path / "full", store_path, [*BASE, "scaling.num_workers=3"])
    _idle()  # the reference's CPUs back first: read at once, they looked taken and no hog started
    free = int(ray.available_resources().get("CPU", 0))
    assert free == 3, ray.available_resources()
    hogs = [_Hog.remote() for _ in range(free - 2)]  # leave room for exactly 2 workers
    ray.get([h.ping.remote() for h in hogs], timeout=60)
    assert len(hogs) == 1 and ray.available_resources().get("CPU", 0) == 2  # the cluster is constrained
    seen: dict = {}

    def hook(ex):
        seen["start"] = list(ex.healthy())
        seen["placed"] = [w is not None for w in ex.workers]  # min_workers = 2 placed, the third not
        seen["room"] = ray.available_resources().get("CPU", 0)
        original, calls = ex.compute, {"n": 0}

        def compute(weights, version, shards, *rest):
            calls["n"] += 1
            if calls["n"] == 3:
                for h in hogs:
                    ray.kill(h)
                end = time.monotonic() + 60
                while 2 not in ex.take_back():
                    assert time.monotonic() < end, "the third worker never joined"
                    time.sleep(0.1)
            return original(weights, version, shards, *rest)

        ex.compute = compute

    grown, ex = train_on(tmp_path / "elastic", store_path, [*BASE, "scaling.num_workers=[2, 3]"], hook)
    assert seen["start"] == [0, 1] and seen["placed"] == [True, True, False] and seen["room"] == 0
    assert ex.healthy() == [0, 1, 2] and ex.num_shards == 3
    np.testing.assert_array_equal(grown.weights, full.weights)
