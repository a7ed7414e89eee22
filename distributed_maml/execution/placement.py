"""Where the workers run: one Ray placement group per worker slot.

Why not one group for the pool: when a node dies, Ray reschedules every group that had a bundle
on it, and a group whose lost bundle fits nowhere is retried by the GCS in a tight loop, with no
backoff. Measured on two hosts (separate addresses, 1 CPU each, one worker each, the link cut):
once Ray declared the node dead the GCS sat at 100% of a core ("Scheduling pending placement
group count: 6,926,862" in its debug state), and the surviving worker's step went from 8 ms to
250-330 ms. A group that never had a bundle placed does not spin. So each worker gets its own
group, and a retired worker's group is removed at once: nothing is left for the GCS to
reschedule, and a slot that is placed again later (elastic workers) starts from a fresh group.

Inside a `distributed-maml tune` trial, Tune has already reserved the trial's group: a bundle for
the trial's driver, then one per worker. The slots then use those bundles (`_enclosing`) and
place nothing of their own.

The pool is first placed as one group with the configured strategy (PACK or SPREAD), which
keeps the all-or-nothing check and the strategy's choice of nodes; it is then split into
per-slot groups pinned to the nodes the pool group chose (by Ray's `ray.io/node-id` label: a
soft target misses, since the pool's resources return to the raylet asynchronously).
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distributed_maml.errors import ConfigError
from distributed_maml.execution import raywait

PLACEMENT_TIMEOUT_S = 60.0  # a pool that cannot be placed by then never will be, on a fixed cluster


class Slots:
    """One placement group per worker slot; `strategy(i)` schedules an actor into slot i."""

    def __init__(self, bundles: list[dict[str, float]], strategy: str, placed: int = 0, timeout_s: float = 0.0) -> None:
        """One slot per bundle (a worker's CPUs and GPUs: the same for every slot, or the pools'
        of scaling.pools). Places slots 0..placed-1 now (all when placed = 0), all or nothing;
        the others start empty and ask for room later (`request`)."""
        size = len(bundles)
        self.bundles = bundles
        self.groups: list[PlacementGroup | None] = [None] * size
        self.nodes: list[str | None] = [None] * size  # where each slot was placed (None: not known)
        self.enclosing = _enclosing(bundles)
        if self.enclosing is not None:  # a sweep's trial: its workers' bundles are already reserved
            nodes = placement_group_table(self.enclosing)["bundles_to_node_id"]
            for i in range(size):
                self.groups[i], self.nodes[i] = self.enclosing, nodes.get(i + 1)
            return
        timeout_s = timeout_s or PLACEMENT_TIMEOUT_S
        size = placed or size
        pool = placement_group(bundles[:size], strategy=strategy.upper())
        what = _describe(bundles[:size])
        try:
            raywait.get(pool.ready(), timeout_s, "placing the workers")
            nodes = placement_group_table(pool)["bundles_to_node_id"]
        except raywait.ClusterTimeout:
            raise ConfigError(
                f"cannot place {what} on this cluster within {timeout_s:g} s (it has "
                f"{_free(ray.cluster_resources())}); lower scaling.num_workers, cpus_per_worker or gpus_per_worker, "
                "or add nodes"
            ) from None
        finally:
            remove_placement_group(pool)
        for i in range(size):
            self.groups[i], self.nodes[i] = self._group(i, nodes[i]), nodes[i]
        deadline = time.monotonic() + timeout_s
        for i, g in enumerate(self.groups[:size]):
            assert g is not None
            try:
                raywait.get(g.ready(), max(0.1, deadline - time.monotonic()), f"placing worker slot {i}")
            except raywait.ClusterTimeout:
                self.close()
                raise ConfigError(
                    f"worker slot {i} of {bundles[i]} lost its place on node {nodes.get(i)} while the pool was set up "
                    f"(within {timeout_s:g} s); the cluster changed under the run: try again"
                ) from None

    def _group(self, i: int, node: str | None) -> PlacementGroup:
        pin = [{"ray.io/node-id": node}] if node else None
        return placement_group([self.bundles[i]], strategy="PACK", bundle_label_selector=pin)

    def strategy(self, i: int) -> PlacementGroupSchedulingStrategy:
        index = 0 if self.enclosing is None else i + 1  # the trial's own bundle is 0
        return PlacementGroupSchedulingStrategy(placement_group=self.groups[i], placement_group_bundle_index=index)

    def release(self, i: int) -> None:
        """Slot i's group removed (its actor goes with it): nothing for Ray to reschedule. A
        trial's group is Tune's: the slot only lets go of it."""
        g, self.groups[i], self.nodes[i] = self.groups[i], None, None
        if g is not None and self.enclosing is None:
            remove_placement_group(g)

    def request(self, i: int) -> Any:
        """A fresh group for slot i, on any node with room (elastic: a retired slot asks again);
        its ready() ref, to poll without blocking. A group no node can hold yet waits quietly.
        In a trial: its bundle in the trial's group again."""
        self.release(i)
        if self.enclosing is not None:
            self.groups[i] = self.enclosing
            return self.enclosing.ready()
        self.groups[i] = self._group(i, None)
        return self.groups[i].ready()

    def lost(self) -> set[int]:
        """The slots whose node Ray has declared dead."""
        dead = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
        return {i for i, node in enumerate(self.nodes) if node in dead}

    def close(self) -> None:
        for i in range(len(self.groups)):
            self.release(i)


def _describe(bundles: list[dict[str, float]]) -> str:
    """'2 workers of {'CPU': 1.0}' or, for pools, each kind with its count."""
    kinds: dict[str, int] = {}
    for b in bundles:
        kinds[str(b)] = kinds.get(str(b), 0) + 1
    return " and ".join(f"{n} worker{'s' if n > 1 else ''} of {b}" for b, n in kinds.items())


def _enclosing(bundles: list[dict[str, float]]) -> PlacementGroup | None:
    """The placement group this process runs in when it reserved a bundle for each worker after
    its own (a `distributed-maml tune` trial: execution/tuning.py asks Tune for [driver, worker
    x size]); None otherwise. Placing new groups there would ask the cluster twice for the
    same workers, and trials would starve each other."""
    from ray.util import get_current_placement_group

    group = get_current_placement_group()
    if group is None:
        return None
    specs = group.bundle_specs
    fits = len(specs) >= len(bundles) + 1 and all(
        specs[i + 1].get(k, 0) >= v for i, bundle in enumerate(bundles) for k, v in bundle.items() if v
    )
    return group if fits else None


def _free(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {resources[k]:g}" for k in ("CPU", "GPU") if k in resources)
