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
