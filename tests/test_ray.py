"""The Ray runtime on one node: same answer at any scale, store sharing, placement, thread
slices, and a worker killed mid-run. One Ray instance for the whole module."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import numpy as np
import pytest
import ray

from distributed_maml import config
from distributed_maml.errors import ConfigError
from distributed_maml.execution.collective import CollectiveExecutor
from distributed_maml.execution.driver import RayExecutor
from distributed_maml.training import run, train

from .conftest import train_on

pytestmark = pytest.mark.ray

BASE = ["task.meta_batch=10", "task.num_tasks=60", "training.steps=6", "training.log_every=3", "maml.inner_steps=2"]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=150 * 2**20)
    yield
    ray.shutdown()


def train_run(tmp_path, store_path, name, workers, extra=(), executor_hook=None):
    return train_on(tmp_path / name, store_path, [*BASE, f"scaling.num_workers={workers}", *extra], executor_hook)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, store_path):
    result, _ = train_run(tmp_path_factory.mktemp("ref"), store_path, "inproc", 0)
    return result.weights


# 2 workers: also every test_variants_* below (-m slow runs it here too)
@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow), 3])
def test_same_weights_at_any_scale(tmp_path, store_path, reference, workers):
    """Meta-batch 10 over 3 workers makes uneven shards (4, 3, 3)."""
    infos = {}
    result, ex = train_run(
        tmp_path, store_path, "r", workers, executor_hook=lambda ex: infos.update(w=ex.worker_info())
    )
    assert ex.num_shards == workers
    assert len({i.pid for i in infos["w"]}) == workers  # distinct actor processes
    assert all(i.store_mode == "path" and i.torch_threads == 1 for i in infos["w"])
    np.testing.assert_allclose(result.weights, reference, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(result.weights, np.zeros_like(reference))


def test_store_through_the_object_store(tmp_path, store_path, reference):
    infos = {}
    result, ex = train_run(
        tmp_path,
        store_path,
        "r",
        2,
        ["scaling.store_sharing=object_store"],
        executor_hook=lambda ex: infos.update(w=ex.worker_info()),
    )
    assert ex.store_mode == "object_store"
    assert all(i.store_mode == "object_store" for i in infos["w"])
    np.testing.assert_allclose(result.weights, reference, rtol=1e-5, atol=1e-6)


def test_cpu_slices_set_torch_threads(store_path, tmp_path):
    cfg = config.load(None, [*BASE, "scaling.num_workers=1", "scaling.cpus_per_worker=2"])
    r = run.prepare(cfg, tmp_path / "r", tasks=store_path, progress=False)
    ex = train.make_executor(r)
    try:
        assert ex.worker_info()[0].torch_threads == 2
    finally:
        ex.close()


def test_unplaceable_pool_is_a_clear_error(store_path, tmp_path, monkeypatch):
    from distributed_maml.execution import placement

    monkeypatch.setattr(placement, "PLACEMENT_TIMEOUT_S", 3)
    cfg = config.load(None, [*BASE, "scaling.num_workers=9"])
    r = run.prepare(cfg, tmp_path / "r", tasks=store_path, progress=False)
    with pytest.raises(ConfigError, match="cannot place 9 workers"):
        RayExecutor(r.store_path, cfg.model, cfg.maml, cfg.scaling)


def test_auto_sizes_the_pool_to_the_cluster(store_path, tmp_path):
    cfg = config.load(None, [*BASE, "scaling.num_workers=-1", "scaling.cpus_per_worker=2"])
    r = run.prepare(cfg, tmp_path / "r", tasks=store_path, progress=False)
    ex = train.make_executor(r)
    try:
        assert ex.num_shards == 2  # 4 CPUs / 2 per worker
    finally:
        ex.close()


def kill_worker_at_steps(worker: int, calls: set[int], record: list):
    """An executor hook: before the compute calls numbered in `calls`, SIGKILL the worker's
    process, so that the step's call to it fails and must be recomputed."""

    def hook(ex):
        original = ex.compute
        n = {"calls": 0}

        def compute(weights, version, shards, *rest):
            n["calls"] += 1
            if n["calls"] in calls:
                pid = ex.worker_info()[worker].pid
                os.kill(pid, signal.SIGKILL)
                record.append(pid)
            return original(weights, version, shards, *rest)

        ex.compute = compute

    return hook


def test_killed_worker_is_restarted_and_its_shard_recomputed(tmp_path, store_path, reference):
    killed: list[int] = []
    infos = {}

    def hook(ex):
        kill_worker_at_steps(1, {3}, killed)(ex)
        infos["ex"] = ex

    result, ex = train_run(tmp_path, store_path, "r", 2, executor_hook=hook)
    np.testing.assert_allclose(result.weights, reference, rtol=1e-5, atol=1e-6)
    assert len(killed) == 1 and ex.failures == [0, 1]


@pytest.mark.parametrize(
    "variant",
    [
        # The default tier: the algorithms whose learner or worker path differs (Reptile's SGD
        # learner, iMAML's implicit gradient); the rest compute another meta_gradient on the same
        # path (each equal to its oracle Ray-free), with the cluster tier (the suite's time budget)
        pytest.param(["maml.algorithm=anil"], marks=pytest.mark.cluster),
        ["maml.algorithm=reptile"],
        pytest.param(
            ["maml.multi_step_loss=true", "maml.msl_anneal_steps=4", "maml.first_order_until=2"],
            marks=pytest.mark.cluster,
        ),
        pytest.param(["maml.algorithm=meta-sgd"], marks=pytest.mark.cluster),
        ["maml.algorithm=imaml", "maml.imaml_cg_steps=3"],
        pytest.param(["maml.checkpoint_inner=true", "maml.multi_step_loss=true"], marks=pytest.mark.cluster),
    ],
    ids=["anil", "reptile", "maml++", "meta-sgd", "imaml", "checkpointed"],
)
def test_variants_give_the_same_weights_in_process_and_with_2_workers(tmp_path, store_path, reference, variant):
    inproc, _ = train_run(tmp_path, store_path, "0", 0, variant)
    ray2, _ = train_run(tmp_path, store_path, "2", 2, variant)
    np.testing.assert_allclose(ray2.weights, inproc.weights, rtol=1e-5, atol=1e-6)
    network = inproc.weights[: reference.size]  # meta-sgd's learned step sizes follow the network's weights
    assert not np.allclose(network, reference, rtol=1e-4, atol=1e-6)  # not plain MAML's


def _metric_lines(run_dir):
    """metrics.jsonl without the timings (which differ run to run)."""
    import json

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "tasks_per_s")} for r in lines]


# 2 ranks: also the iMAML and fault-phase collective tests below (-m slow runs it here too)
@pytest.mark.parametrize("workers", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_collective_mode_equals_driver_mode_bit_for_bit(tmp_path, store_path, reference, workers):
    """Workers in a gloo group run the steps themselves: the same weights, Adam state and
    metrics as the driver calling them (and as in-process, to float32 rounding). With 3 ranks
    the shards' order matters to the last bit (with 2, a + b = b + a hides an order bug)."""
    driver, _ = train_run(tmp_path, store_path, "driver", workers)
    result, ex = train_run(tmp_path, store_path, "collective", workers, ["scaling.mode=collective"])
    assert isinstance(ex, CollectiveExecutor) and ex.backend == "gloo" and ex.restarts == 0
    np.testing.assert_array_equal(result.weights, driver.weights)
    np.testing.assert_allclose(result.weights, reference, rtol=1e-5, atol=1e-6)
    assert _metric_lines(tmp_path / "collective") == _metric_lines(tmp_path / "driver")
    assert [r["step"] for r in _metric_lines(tmp_path / "collective")] == [1, 3, 6]


@pytest.mark.cluster  # a second collective group (~8 s); the default tier's group is MAML's above
def test_imaml_in_a_collective_group_equals_driver_mode_bit_for_bit(tmp_path, store_path):
    """iMAML (implicit meta-gradients, conjugate gradient in every worker) through the collective
    path: the weights of the driver-mode run, bit for bit."""
    variant = ["maml.algorithm=imaml", "maml.imaml_cg_steps=3"]
    driver, _ = train_run(tmp_path, store_path, "imaml-driver", 2, variant)
    group, _ = train_run(tmp_path, store_path, "imaml-collective", 2, [*variant, "scaling.mode=collective"])
    np.testing.assert_array_equal(group.weights, driver.weights)


@pytest.mark.slow  # the default run kills a rank inside a chunk below (bit-identical, a stronger check)
def test_collective_group_restarts_from_the_chunk_start_when_a_rank_dies(tmp_path, store_path, reference):
    """Rank 1's process is killed before the chunk of steps 4..6: the group is restarted and
    the chunk rerun from the state the driver holds; the weights equal an undisturbed run's."""
    killed: list[int] = []

    def hook(ex):
        original = ex.run_steps

        def run_steps(learner, sampler, steps, on_step):
            if 4 not in steps or killed:
                return original(learner, sampler, steps, on_step)
            killed.append(ex.worker_info()[1].pid)
            os.kill(killed[0], signal.SIGKILL)
            done = original(learner, sampler, steps, on_step)
            killed.append(ex.worker_info()[1].pid)  # rank 1 after the restart
            return done

        ex.run_steps = run_steps

    result, ex = train_run(tmp_path, store_path, "r", 2, ["scaling.mode=collective"], executor_hook=hook)
    assert len(killed) == 2 and killed[1] != killed[0] and ex.restarts == 1
    np.testing.assert_allclose(result.weights, reference, rtol=1e-5, atol=1e-6)


def test_a_collective_group_that_cannot_form_is_one_line_naming_where(tmp_path, store_path):
    """A rank that cannot reach the others (here: told an interface that does not exist) ends
    the run before its first step in one line naming rank 0's address and port, each worker's
    node and what to set."""
    from distributed_maml.errors import TrainingError

    with pytest.raises(
        TrainingError, match=r"could not form at [\d.]+:\d+ \(worker-0 on [\d.]+.*scaling.interface"
    ) as e:
        train_run(tmp_path, store_path, "r", 2, ["scaling.mode=collective", "scaling.interface=nosuch0"])
    assert "\n" not in str(e.value)


@pytest.mark.cluster  # a fault phase (~6 s): the default tier keeps a killed worker's restart and the last worker's loss
def test_a_worker_that_keeps_failing_hands_its_shards_over(tmp_path, store_path, reference):
    killed: list[int] = []
    result, ex = train_run(
        tmp_path,
        store_path,
        "r",
        2,
        ["scaling.max_worker_failures=1"],
        executor_hook=kill_worker_at_steps(0, {2}, killed),
    )
    np.testing.assert_allclose(result.weights, reference, rtol=1e-5, atol=1e-6)
    assert ex.failures == [1, 0] and ex.healthy() == [1]


def test_no_healthy_worker_left_stops_with_a_valid_checkpoint(tmp_path, store_path):
    from distributed_maml.errors import TrainingError
    from distributed_maml.training import checkpoint

    killed: list[int] = []
    with pytest.raises(TrainingError, match="no healthy worker left") as e:
        train_run(
            tmp_path,
            store_path,
            "r",
            1,
            ["scaling.max_worker_failures=1"],
            executor_hook=kill_worker_at_steps(0, {4}, killed),
        )
    assert "step_3" in str(e.value)
    ck = checkpoint.load(checkpoint.latest(tmp_path / "r"))
    assert ck.step == 3 and ck.version == 3


def test_evaluation_through_ray_workers_matches_in_process(tmp_path, store_path):
    """Held-out tasks (generated in memory, so they travel through the object store) split over
    2 workers give the in-process evaluation's numbers."""
    from distributed_maml.evaluation import evaluate

    train_run(tmp_path, store_path, "r", 0)
    local = evaluate.evaluate(tmp_path / "r", steps=[0, 2], num_tasks=60, baselines=False, workers=0)
    remote = evaluate.evaluate(tmp_path / "r", steps=[0, 2], num_tasks=60, baselines=False, workers=2)
    assert "2 Ray workers" in remote["evaluated_by"] and "object_store" in remote["evaluated_by"]
    for key in ("loss_mean", "loss_ci95", "accuracy_mean"):
        np.testing.assert_allclose(remote[key], local[key], rtol=1e-5)


@pytest.fixture(scope="module")
def glyph_store_path(tmp_path_factory):
    from distributed_maml.data.writing import build

    path = tmp_path_factory.mktemp("glyphs") / "glyphs.arrow"
    build(path, "glyphs", 24, seed=0, shots=1, queries=2, ways=3, progress=False)
    return path


@pytest.mark.parametrize("model", ["model.name=conv4", "model.name=tests.usercode.nets:small_cnn"])
def test_image_models_same_weights_at_0_and_2_workers(tmp_path, glyph_store_path, model):
    """conv4 and a user network on glyph tasks: the workers import the user module themselves
    (from the folder the driver imported it from) and agree with the in-process run."""
    extra = [
        "task.family=glyphs",
        "task.ways=3",
        "task.shots=1",
        "task.queries=2",
        "task.meta_batch=4",
        "task.num_tasks=24",
        "training.steps=3",
        "training.eval_every=0",
        "maml.inner_steps=1",
        "maml.inner_lr=0.4",
        "model.channels=4",
        model,
    ]
    ref, _ = train_on(tmp_path / "r0", glyph_store_path, [*extra, "scaling.num_workers=0"])
    infos = {}
    two, ex = train_on(
        tmp_path / "r2",
        glyph_store_path,
        [*extra, "scaling.num_workers=2"],
        lambda ex: infos.update(w=ex.worker_info(), d=ex.describe()),
    )
    assert {i.task_map for i in infos["w"]} == {"loop"} and "tasks by loop" in infos["d"]
    np.testing.assert_allclose(two.weights, ref.weights, rtol=1e-5, atol=1e-6)
    assert not np.allclose(
        ref.weights,
        train_on(tmp_path / "rx", glyph_store_path, [*extra, "scaling.num_workers=0", "training.steps=1"])[0].weights,
    )


# --- a worker lost in every phase of a run (issue 15): the undisturbed run's weights, bit for bit ---

PHASED = ["training.checkpoint_every=2", "training.eval_every=3", "training.log_every=3", "scaling.worker_timeout_s=3"]


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, store_path):
    """Two workers in driver mode, nothing lost (collective mode equals it bit for bit: above)."""
    started = time.monotonic()
    result, _ = train_run(tmp_path_factory.mktemp("undisturbed"), store_path, "r", 2, PHASED)
    return result.weights, time.monotonic() - started


def _crash(ex, w: int = 1) -> None:
    """Worker w's process dies as after a SIGKILL; Ray restarts its actor (max_restarts)."""
    ray.kill(ex.workers[w], no_restart=False)


def _phase_run(tmp_path, store_path, mode, hook):
    started = time.monotonic()
    result, ex = train_run(tmp_path, store_path, "r", 2, [*PHASED, f"scaling.mode={mode}"], executor_hook=hook)
    return result, ex, time.monotonic() - started


# Every phase in each mode; the default run takes the driver's first line and checkpoint, the
# cluster tier the collective validation (with its rank-loss tests), the other three -m slow
@pytest.mark.parametrize(
    "phase,mode",
    [
        ("first-line", "driver"),
        ("checkpoint", "driver"),
        pytest.param("validation", "collective", marks=pytest.mark.cluster),  # collective faults: the cluster tier's
        pytest.param("first-line", "collective", marks=pytest.mark.slow),
        pytest.param("checkpoint", "collective", marks=pytest.mark.slow),
        pytest.param("validation", "driver", marks=pytest.mark.slow),
    ],
)
def test_a_worker_lost_in_any_phase_costs_no_weight(tmp_path, store_path, undisturbed, monkeypatch, mode, phase):
    """A worker dies while the workers start and the first line is written (driver mode's
    workers start then; a collective group has formed by then and loses a rank before its first
    chunk), while the driver writes a checkpoint, or while it scores the validation tasks: the
    run ends with the undisturbed run's weights, bit for bit (nothing lost, nothing doubled),
    within worker_timeout_s plus a restart of the time an undisturbed run takes."""
    from distributed_maml.training import validation
    from distributed_maml.training.run import Run

    lost = []

    def hook(ex):
        if phase == "first-line":
            _crash(ex)
            lost.append(ex)
            return

        def once(original):
            def wrapped(*args, **kwargs):
                if not lost:
                    _crash(ex)
                    lost.append(ex)
                return original(*args, **kwargs)

            return wrapped

        if phase == "checkpoint":
            monkeypatch.setattr(Run, "save", once(Run.save))
        else:
            make = validation.make

            def faulty(*args):
                v = make(*args)
                return dataclasses.replace(v, score=once(v.score))

            monkeypatch.setattr(validation, "make", faulty)

    result, ex, took = _phase_run(tmp_path, store_path, mode, hook)
    weights, undisturbed_s = undisturbed
    print(
        f"{phase}/{mode}: {took:.1f} s (undisturbed {undisturbed_s:.1f} s), restarts or failures: "
        f"{getattr(ex, 'restarts', None)} {ex.failures}"
    )
    assert lost, "the fault was never injected"
    assert ex.healthy() == [0, 1]  # restarted in place: a crash that Ray can undo costs no worker
    np.testing.assert_array_equal(result.weights, weights)
    assert took < undisturbed_s + 3 + 30  # worker_timeout_s + a restart (the start grace) at most


@pytest.mark.cluster  # a node lost during the store probe (~7 s): with the cluster tier's node-loss tests
def test_a_slot_that_does_not_answer_the_store_probe_reads_it_from_the_object_store(
    tmp_path, store_path, undisturbed, monkeypatch
):
    """Store sharing: a slot whose node is lost while the driver asks who sees the store file
    never answers; after worker_timeout_s the store travels through the object store (which
    works on any node) and the run ends with the undisturbed weights."""
    from distributed_maml.execution import driver

    @ray.remote(num_cpus=0)
    def lost_node(path, size):  # the probe of a node that went away: no answer, ever
        time.sleep(3600)

    monkeypatch.setattr(driver, "_sees_store", lost_node)
    result, ex, took = _phase_run(tmp_path, store_path, "driver", None)
    print(f"store sharing/driver: {took:.1f} s (undisturbed {undisturbed[1]:.1f} s)")
    assert ex.store_mode == "object_store"
    np.testing.assert_array_equal(result.weights, undisturbed[0])


@pytest.mark.cluster
@pytest.mark.parametrize("when", ["after-rendezvous", "mid-join"])
def test_a_rank_lost_during_the_rendezvous_reforms_the_group(tmp_path, store_path, undisturbed, monkeypatch, when):
    """Rank 1 dies between the rendezvous (rank 0's address and port) and the join, or while the
    ranks join (rank 0's join then fails too: a refused or silent peer, which must read as a lost
    rank, not as a network to fix): the group is formed again around the restarted worker, and
    the run ends with the undisturbed weights."""
    from distributed_maml.execution import collective, raywait

    real_get, lost = raywait.get, []
    fault_at = "the collective group's address" if when == "after-rendezvous" else "forming the collective group"

    def get(refs, timeout_s, what):
        if what.startswith(fault_at) and when == "mid-join" and not lost:
            # Rank 1 dies inside its join, and rank 0's join fails before Ray reports rank 1
            # dead (CI's order: rank 0 dialled the address rank 1 had just published, refused)
            lost.append(what)
            ray.kill(created[-1].workers[1], no_restart=False)
            raise raywait.ClusterTimeout(f"{what}: rank 0 failed first")
        got = real_get(refs, timeout_s, what)
        if what.startswith(fault_at) and not lost:
            lost.append(what)
            ray.kill(created[-1].workers[1], no_restart=False)
        return got

    created = []
    real_form = collective.CollectiveExecutor._form_group

    def form(self):
        created.append(self)
        return real_form(self)

    monkeypatch.setattr(collective.raywait, "get", get)
    monkeypatch.setattr(collective.CollectiveExecutor, "_form_group", form)
    result, ex, took = _phase_run(tmp_path, store_path, "collective", None)
    print(f"rendezvous/{when}: {took:.1f} s (undisturbed {undisturbed[1]:.1f} s), restarts {ex.restarts}")
    assert lost and ex.restarts >= 1 and ex.healthy() == [0, 1]
    np.testing.assert_array_equal(result.weights, undisturbed[0])


@pytest.mark.cluster
def test_a_rank_lost_inside_a_chunk_reruns_the_chunk_from_its_start(tmp_path, store_path, undisturbed):
    """A rank's process exits in the middle of a collective chunk (at its second step: the first
    step's update is already applied on rank 0): the group is restarted and the chunk rerun from
    the state the driver holds; no step applied twice, the undisturbed weights."""
    from distributed_maml.data.sampler import Sampler

    marker = tmp_path / "died"

    mark, here = str(marker), os.getpid()

    @dataclasses.dataclass(frozen=True)
    class DyingSampler(Sampler):  # pickled by value into the ranks: a rank dies, once
        def ids(self, step):
            # 0-based 5 = step 6, the second of the chunk 5..6 (chunks end at each logged,
            # checkpointed or validated step)
            if step == 5 and os.getpid() != here and not os.path.exists(mark):
                open(mark, "w").close()
                os._exit(1)
            return super().ids(step)

    def hook(ex):
        original = ex.run_steps

        def run_steps(learner, sampler, steps, on_step):
            dying = DyingSampler(sampler.seed, sampler.num_tasks, sampler.meta_batch)
            return original(learner, dying, steps, on_step)

        ex.run_steps = run_steps

    result, ex, took = _phase_run(tmp_path, store_path, "collective", hook)
    print(f"collective chunk/collective: {took:.1f} s (undisturbed {undisturbed[1]:.1f} s), restarts {ex.restarts}")
    assert marker.exists() and ex.restarts == 1 and ex.healthy() == [0, 1]
    np.testing.assert_array_equal(result.weights, undisturbed[0])


SHARDS8 = [*BASE, "training.log_every=2"]


@pytest.fixture(scope="module")
def shards8_oracle(tmp_path_factory, store_path):
    """The in-process run of 8 shards a step, computed as 1-CPU workers compute them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1-CPU worker's arithmetic
    try:
        oracle, _ = train_on(
            tmp_path_factory.mktemp("inproc8") / "inproc",
            store_path,
            [*SHARDS8, "scaling.num_workers=0", "scaling.shards_per_worker=8"],
        )
    finally:
        torch.set_num_threads(threads)
    return oracle


def test_shards_by_speed_give_the_bits_of_any_pool_with_the_same_shards(tmp_path, store_path, shards8_oracle):
    """8 shards a step, computed by 2 workers x 4 (worker-1 slowed: it gets fewer of them, its
    share logged) and by 2 x 4 with worker-1 killed while it holds several (each of them computed
    again once): the in-process run of the same 8 shards, bit for bit. (4 x 2: below.)"""
    import json

    oracle = shards8_oracle

    def slowed(ex):
        ex.start()  # the workers up (bounded), then the straggler made
        ray.get(ex.workers[1].slow_down.remote(per_task_s=0.01), timeout=120)

    slow, ex = train_run(
        tmp_path, store_path, "slow", 2, ["training.log_every=2", "scaling.shards_per_worker=4"], slowed
    )
    assert ex.num_shards == 8 and ex.num_workers == 2
    last = json.loads((tmp_path / "slow" / "metrics.jsonl").read_text().splitlines()[-1])
    shares = last["time"]["shares"]
    assert shares["worker-1"] < shares["worker-0"] and sum(shares.values()) == 8, shares  # the straggler got fewer
    assert last["time"]["worker_tasks"]["worker-1"] < last["time"]["worker_tasks"]["worker-0"]
    np.testing.assert_array_equal(slow.weights, oracle.weights)

    sent: list[tuple[int, ...]] = []
    killed: list[int] = []

    def kill_and_count(ex):
        original = ex._map

        def counting_map(call, shards):
            def counted(worker, mine):
                sent.extend(tuple(int(t) for t in s) for s in mine)
                return call(worker, mine)

            return original(counted, shards)

        ex._map = counting_map
        kill_worker_at_steps(1, {4}, killed)(ex)

    lost, ex = train_run(
        tmp_path, store_path, "lost", 2, ["training.log_every=2", "scaling.shards_per_worker=4"], kill_and_count
    )
    assert len(killed) == 1 and ex.failures == [0, 1]
    counts = {s: sent.count(s) for s in set(sent)}
    again = [s for s, n in counts.items() if n == 2]
    assert len(again) >= 2 and all(n in (1, 2) for n in counts.values()), counts  # its shards, each once more
    np.testing.assert_array_equal(lost.weights, oracle.weights)


@pytest.mark.cluster  # four workers on two cores (~7 s): the default tier's pool of the same shards is 2 x 4 above
def test_the_same_shards_by_four_workers_give_the_same_bits(tmp_path, store_path, shards8_oracle):
    """The 8 shards by 4 workers x 2: the in-process run's bits."""
    four, _ = train_run(tmp_path, store_path, "four", 4, ["training.log_every=2", "scaling.shards_per_worker=2"])
    np.testing.assert_array_equal(four.weights, shards8_oracle.weights)


@pytest.mark.cluster  # three workers of two slice sizes (~5 s): shards by speed above keeps the default tier's handout
def test_pools_of_different_slices_in_one_run(tmp_path, store_path):
    """scaling.pools: one worker of 1 CPU beside two of half a CPU, each its own slot and slice,
    6 shards a step by speed: the in-process run of the same 6 shards, bit for bit."""
    import torch

    pools = "scaling.pools=[{num_workers = 1, cpus_per_worker = 1}, {num_workers = 2, cpus_per_worker = 0.5}]"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        oracle, _ = train_on(
            tmp_path / "inproc", store_path, [*BASE, "scaling.num_workers=0", "scaling.shards_per_worker=6"]
        )
    finally:
        torch.set_num_threads(threads)
    seen = {}

    def hook(ex):
        seen["describe"] = ex.describe()
        seen["free"] = ray.available_resources().get("CPU", 0)

    mixed, ex = train_on(tmp_path / "pools", store_path, [*BASE, pools, "scaling.shards_per_worker=2"], hook)
    assert ex.num_workers == 3 and ex.num_shards == 6
    assert ex.slots.bundles == [{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 0.5}]
    assert seen["free"] == 2 and "(1 x 1 CPU; 2 x 0.5 CPU, pack" in seen["describe"], seen  # 2 of the 4 CPUs reserved
    np.testing.assert_array_equal(mixed.weights, oracle.weights)
