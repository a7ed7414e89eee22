"""A batch of served requests answered, and the task cache they read and fill (Ray-free: the
service in use/serving.py is a thin shell over these, so both are tested without a server).

- `answer`: each request's task adapted (tasks of one `steps` in one `adapt_many` call), then
  every task scored on its queries in one `predict_many` call: a `Reply` each, with the adapted
  weights to cache when the request named a `task_id` and sent a support set.
- `TaskCache`: adapted weights by task id, least recently used dropped first; a hit makes an
  entry the most recently used. The service keeps one for all its replicas (a deployment of its
  own), so a task adapted on one replica is answered by any.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distributed_maml.use.adaptrequest import AdaptRequest
from distributed_maml.use.metamodel import Adapted, MetaModel

DIVERGED = "adaptation diverged (non-finite outputs): check the examples' scale, or send fewer steps"


@dataclass(frozen=True)
class CachedTask:
    """A task's adapted weights as the cache keeps them: numpy arrays (picklable between
    replicas; float32 both ways, so a cached answer has the bits of a fresh one)."""

    params: dict[str, np.ndarray]
    classes: tuple[Any, ...] | None
    steps: int

    @classmethod
    def of(cls, adapted: Adapted) -> CachedTask:
        return cls({k: v.detach().cpu().numpy() for k, v in adapted.params.items()}, adapted.classes, adapted.steps)

    def adapted(self, meta: MetaModel) -> Adapted:
        params = {k: torch.from_numpy(v).to(meta.device) for k, v in self.params.items()}
        return Adapted(meta, params, self.classes, self.steps)


class TaskCache:
    """At most `size` tasks' adapted weights by id (0: none kept); least recently used first out."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, CachedTask] = OrderedDict()

    def get(self, task_id: str) -> CachedTask | None:
        """The task's weights, made the most recently used (None: not cached)."""
        entry = self._entries.get(task_id)
        if entry is not None:
            self._entries.move_to_end(task_id)
        return entry

    def put(self, task_id: str, entry: CachedTask) -> None:
        """Keeps (or replaces) the task's weights as the most recently used; drops the least
        recently used beyond `size`."""
        if self.size <= 0:
            return
        self._entries[task_id] = entry
        self._entries.move_to_end(task_id)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def ids(self) -> list[str]:
        """The cached ids, least recently used first."""
        return list(self._entries)


@dataclass(frozen=True)
class Job:
    """A checked request, and its cached weights when it names a task adapted before."""

    request: AdaptRequest
    cached: CachedTask | None = None


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    remember: CachedTask | None = None  # to cache under the request's task_id


def answer(meta: MetaModel, jobs: list[Job]) -> list[Reply]:
    """The batch's tasks adapted (one call per `steps`) and scored (one call), a Reply each."""
    adapted: list[Adapted | None] = [None if j.cached is None else j.cached.adapted(meta) for j in jobs]
    fresh: dict[int | None, list[int]] = {}
    for i, job in enumerate(jobs):
        if job.cached is None:
            assert job.request.support is not None, "a request without a support set is looked up first"
            fresh.setdefault(job.request.steps, []).append(i)
    for steps, idx in fresh.items():
        tasks = [jobs[i].request.support for i in idx]
        for i, a in zip(idx, meta.adapt_many(tasks, steps), strict=True):  # type: ignore[arg-type]
            adapted[i] = a
    preds = meta.predict_many(adapted, [j.request.query for j in jobs])  # type: ignore[arg-type]
    out = []
    for job, a, pred in zip(jobs, adapted, preds, strict=True):
        assert a is not None
        if not pred.finite():
            out.append(Reply(422, {"error": DIVERGED}))
            continue
        r = job.request
        body = {
            "task_id": r.task_id,
            "cached": job.cached is not None,
            "steps": a.steps,
            "batch": len(jobs),  # requests adapted and scored together with this one
            **pred.to_json(),
        }
        keep = r.task_id is not None and job.cached is None
        out.append(Reply(200, body, CachedTask.of(a) if keep else None))
    return out
