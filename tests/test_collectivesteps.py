"""The collective loop's unlogged steps with nothing read back (execution/collectivesteps.py),
Ray-free: a one-rank gloo group holding all three shards of each step, against the driver
loop over the same three shards, and against the collective loop's per-step path. Same
weights bit for bit, same Adam state, the same steps reported, on a clean store and on one
whose task turns a step non-finite in mid-chunk (stop ends there, skip drops it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from distributed_maml.config import MamlConfig, ModelConfig
from distributed_maml.core.learner import Learner
from distributed_maml.core.network import assemble
from distributed_maml.data.sampler import Sampler
from distributed_maml.data.store import TaskStore
from distributed_maml.execution import collectivesteps
from distributed_maml.execution.computer import ShardComputer
from distributed_maml.execution.inprocess import InProcessExecutor
from distributed_maml.execution.stepping import collective_chunk, drive
from distributed_maml.execution.steps import Steps

from .test_devicesteps import POISONED_STEP, poisoned_store

SHARDS = 3  # 8 tasks a step: shards of 3, 3 and 2
CHUNKS = [(1, 5), (6, 10), (11, 12)]  # log_every 5


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/rendezvous", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def run(store_path, how: str, stop: bool, monkeypatch, device: str = "cpu", algorithm: str = "maml"):
    """12 steps in the chunks above: "driver" (stepping.drive), "per-step" (the collective loop
    with the device path switched off) or "device"; the learner and every reported step."""
    maml = MamlConfig(inner_steps=2, algorithm=algorithm)
    store = TaskStore.open(store_path)
    computer = ShardComputer(store, ModelConfig(), maml, device=device)
    initial = assemble(ModelConfig(), maml, store.info, seed=0).initial()
    learner = Learner.of(computer.spec, initial, maml, 1e-3, device=device)
    sampler = Sampler(0, len(store), 8)
    calls: list[list[int]] = []
    original = collectivesteps.unlogged_steps

    def spy(computer, learner, sampler, steps, *rest):
        calls.append(list(steps))
        return original(computer, learner, sampler, steps, *rest)

    monkeypatch.setattr(collectivesteps, "unlogged_steps", spy)
    monkeypatch.setattr(collectivesteps, "eligible", lambda c: how == "device")
    seen = []
    for first, last in CHUNKS:
        steps = Steps(first, last, True, stop)
        if how == "driver":
            drive(InProcessExecutor(computer, num_shards=SHARDS), learner, sampler, steps, seen.append)
        else:
            seen.extend(collective_chunk(computer, learner, sampler, steps, 0, [list(range(SHARDS))], SHARDS))
        if seen and not seen[-1].finite and stop:
            break
    assert (calls != []) == (how == "device"), calls  # the path under test ran, and only there
    return learner, seen


@pytest.mark.parametrize("poisoned, policy", [(False, "stop"), (True, "stop"), (True, "skip")])
def test_device_path_equals_the_driver_and_the_per_step_path(
    tmp_path, store_path, group, monkeypatch, poisoned, policy
):
    path = poisoned_store(tmp_path / "poisoned.arrow") if poisoned else store_path
    stop = policy == "stop"
    got = {how: run(path, how, stop, monkeypatch) for how in ("driver", "per-step", "device")}
    ref_learner, ref_seen = got["driver"]
    bad = [o.step for o in ref_seen if not o.finite]
    assert bad == ([POISONED_STEP] if poisoned else []), bad  # the fault happened (or not) where meant
    if poisoned and stop:
        assert ref_seen[-1].step == POISONED_STEP
    for how in ("per-step", "device"):
        learner, seen = got[how]
        assert [(o.step, o.finite, o.count) for o in seen] == [(o.step, o.finite, o.count) for o in ref_seen], how
        loss = [o.metrics["loss_after"] for o in seen]
        np.testing.assert_array_equal(loss, [o.metrics["loss_after"] for o in ref_seen], err_msg=how)  # NaN = NaN
        assert learner.version == ref_learner.version
        np.testing.assert_array_equal(learner.weights(), ref_learner.weights())
        a, b = learner.optimizer.state_dict()["state"][0], ref_learner.optimizer.state_dict()["state"][0]
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step")), how


def test_device_path_reports_each_ranks_share_and_time(store_path, group, monkeypatch):
    learner, seen = run(store_path, "device", True, monkeypatch)
    unlogged = [o for o in seen if o.step not in (5, 10, 12)]
    assert len(unlogged) == 9
    for o in unlogged:
        assert o.timing["shares"] == {"worker-0": SHARDS} and o.timing["worker_tasks"] == {"worker-0": 8}
        assert o.timing["worker_compute_s"]["worker-0"] > 0


@pytest.mark.parametrize("algorithm", ["reptile", "imaml"])
def test_device_path_equals_the_driver_for_reptiles_sgd_and_imaml(store_path, group, monkeypatch, algorithm):
    """Reptile's learner is plain SGD (no optimizer state to mask), iMAML's sums are implicit:
    both through the device path give the driver loop's weights bit for bit."""
    ref, ref_seen = run(store_path, "driver", True, monkeypatch, algorithm=algorithm)
    got, seen = run(store_path, "device", True, monkeypatch, algorithm=algorithm)
    assert [(o.step, o.finite) for o in seen] == [(o.step, o.finite) for o in ref_seen] and len(seen) == 12
    np.testing.assert_array_equal(got.weights(), ref.weights())
    assert not np.array_equal(
        got.weights(), run(store_path, "driver", True, monkeypatch, algorithm="maml")[0].weights()
    )


SLOW_S = 0.1  # rank 1's extra seconds per shard


def _rank_main(rank: int, init: str, store_path: str, out) -> None:
    """One rank of a two-rank gloo group running four unlogged steps on the device path, a
    shard each; rank 1 takes SLOW_S longer per shard (a slower card). Rank 0 puts the steps'
    timings on `out`."""
    import time

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        maml = MamlConfig(inner_steps=2)
        store = TaskStore.open(store_path)
        computer = ShardComputer(store, ModelConfig(), maml)
        assert collectivesteps.eligible(computer)
        if rank == 1:
            sums = computer.sums

            def slow(*args):
                time.sleep(SLOW_S)
                return sums(*args)

            computer.sums = slow  # type: ignore[method-assign]
        learner = None
        if rank == 0:
            initial = assemble(ModelConfig(), maml, store.info, seed=0).initial()
            learner = Learner.of(computer.spec, initial, maml, 1e-3)
        steps = Steps(1, 4, False, True)  # none logged: all four on the device path
        outcomes = collective_chunk(computer, learner, Sampler(0, len(store), 8), steps, rank, [[0], [1]], 2)
        if rank == 0:
            out.put([o.timing for o in outcomes])
        dist.barrier()  # neither rank tears the group down under the other
    finally:
        dist.destroy_process_group()


def test_device_path_times_each_rank_by_its_own_clock(tmp_path, store_path):
    """Two ranks at different speeds: each step reports rank 1's compute time as rank 1's (not
    rank 0's), so shards by speed sees the slow rank in collective mode and moves shards off it.
    Two real processes (a group needs one per rank), no Ray."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ranks = [
        ctx.Process(target=_rank_main, args=(r, str(tmp_path / "rendezvous"), str(store_path), out)) for r in (0, 1)
    ]
    for p in ranks:
        p.start()
    try:
        timings = out.get(timeout=120)
    finally:
        for p in ranks:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in ranks] == [0, 0]
    assert len(timings) == 4
    for t in timings:
        busy = t["worker_compute_s"]
        assert busy["worker-1"] >= SLOW_S, busy  # the slow rank's own time
        assert busy["worker-0"] < busy["worker-1"] - SLOW_S / 2, busy  # not rank 0's time, nor the step's
        assert t["slowest_worker"] == "worker-1" and t["straggler_s"] >= SLOW_S / 2, t
