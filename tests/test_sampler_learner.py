import numpy as np
import pytest
import torch

from distributed_maml.core.learner import Learner
from distributed_maml.core.models import ParamSpec
from distributed_maml.core.shards import ShardResult, reduce_shards
from distributed_maml.data.sampler import Sampler, split_shards


def test_ids_are_a_pure_function_of_seed_size_batch_and_step():
    a, b = Sampler(3, 100, 7), Sampler(3, 100, 7)
    for step in (0, 5, 13, 14, 200):
        np.testing.assert_array_equal(a.ids(step), b.ids(step))
    assert not np.array_equal(Sampler(4, 100, 7).ids(0), a.ids(0))


def test_an_epoch_is_a_permutation_of_the_store():
    s = Sampler(0, 50, 10)
    epoch = np.concatenate([s.ids(k) for k in range(5)])
    assert sorted(epoch.tolist()) == list(range(50))
    assert not np.array_equal(epoch, np.concatenate([s.ids(k) for k in range(5, 10)]))


def test_batches_can_straddle_epochs_and_exceed_the_store():
    s = Sampler(1, 6, 4)
    ids = np.concatenate([s.ids(k) for k in range(3)])  # 12 ids = 2 epochs of 6
    assert sorted(ids[:6].tolist()) == list(range(6)) and sorted(ids[6:].tolist()) == list(range(6))
    assert sorted(Sampler(1, 3, 9).ids(0).tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("n, k", [(10, 3), (10, 2), (10, 1), (2, 5), (4096, 3)])
def test_shards_are_contiguous_nearly_equal_and_never_empty(n, k):
    ids = np.arange(n) * 7
    shards = split_shards(ids, k)
    assert len(shards) == min(n, k)
    np.testing.assert_array_equal(np.concatenate(shards), ids)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_reduction_is_the_task_weighted_mean_in_shard_order():
    rng = np.random.default_rng(0)
    per_task = rng.normal(size=(10, 4)).astype(np.float32)
    shards = [
        ShardResult(per_task[a:b].sum(0), b - a, {"loss_after": float(b - a)}) for a, b in ((0, 3), (3, 4), (4, 10))
    ]
    r = reduce_shards(shards)
    np.testing.assert_allclose(r.grad, per_task.mean(0), rtol=1e-6)
    assert r.count == 10 and r.metrics["loss_after"] == pytest.approx(1.0)


def test_learner_applies_adam_like_torch():
    spec = ParamSpec(("w",), ((3,),))
    init = torch.tensor([1.0, -2.0, 0.5])
    learner = Learner(spec, init, lr=0.1)
    ref = torch.nn.Parameter(init.clone())
    opt = torch.optim.Adam([ref], lr=0.1)
    for g in ([0.1, 0.2, -0.3], [1.0, 0.0, 2.0]):
        learner.apply(np.array(g, dtype=np.float32))
        ref.grad = torch.tensor(g)
        opt.step()
    torch.testing.assert_close(torch.from_numpy(learner.weights()), ref.detach(), rtol=0, atol=0)
    assert learner.version == 2


class _OneShard:
    """An executor of one shard whose meta-gradient is the shard's first id (a known update)."""

    num_shards = 1

    def compute(self, weights, version, shards, before):
        return [ShardResult(np.full(3, float(shards[0][0]), dtype=np.float32), len(shards[0]), {"loss_after": 1.0})]


@pytest.mark.parametrize("signal_after", [1, 4, 9])
def test_the_driver_loop_stops_after_the_step_in_flight_inside_a_chunk(signal_after):
    """A signal during step k of a 10-step chunk (log_every = 10): the loop returns k, having
    applied exactly k updates, not the chunk's end (the subprocess tests cannot aim inside a
    chunk every time on a loaded machine; this pins the count)."""
    import os
    import signal

    from distributed_maml import stopping
    from distributed_maml.execution.stepping import drive
    from distributed_maml.execution.steps import Steps

    learner = Learner(ParamSpec(("w",), ((3,),)), torch.zeros(3), lr=0.1)
    seen: list[int] = []

    def on_step(outcome):
        seen.append(outcome.step)
        if outcome.step == signal_after:
            os.kill(os.getpid(), signal.SIGINT)

    with stopping.handling():
        last = drive(_OneShard(), learner, Sampler(0, 50, 4), Steps(1, 10, True, True), on_step)
        assert stopping.requested() == signal.SIGINT
    assert last == signal_after and seen == list(range(1, signal_after + 1)) and learner.version == signal_after
