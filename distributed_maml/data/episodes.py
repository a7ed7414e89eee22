"""Episodes drawn on the fly: a task is a pure function of (the store's seed, the task id).

An on-the-fly store (layout "stream", data/format.py) holds its examples once (an image table,
a table's standardised rows) or nothing at all (a generated family), and no task rows. Task
`id` (any integer in [0, 2**63)) is drawn by `draw_episode` from its own counter-based RNG,

    rng = numpy.random.Generator(numpy.random.Philox(key=[seed, id], counter=[0, 0, 0, split]))

(split: 0 train, 1 test, 2 all, 3 val; a generated family's held-out tasks come from their own
split's counter, an image or table store's from its own classes)

in this order (every draw uniform, bounds inclusive):

1. the shape: ways w in task.ways, queries per class q in task.queries, then shots per class
   s_1..s_w, each in task.shots (an imbalanced support set, as Meta-Dataset's); when their sum
   S passes the cap M = task.max_support, each class keeps one example and shares the rest of
   the cap in proportion: s_c = 1 + floor((s_c - 1) * (M - w) / (S - w)), so the sum is at most
   M and no class goes without a support example (M >= the most ways, checked);
2. the examples: a store of examples picks w distinct classes (numpy `choice` without
   replacement; label i is the i-th class picked; a store of several sources first picks the
   source, `choice` with p = the normalised weights, then w of that source's classes), then one
   array of uniform keys [w, m] (`random`; m: the most examples a picked class has, keys past a
   class's own count +inf): class i's examples in the order of its keys' argsort, the first s_i
   to the support set and the next q to the query set; a generated family calls its own
   generate(rng, 1, max(s), q) and keeps, for each of w classes picked among its ways, the first
   s_i support examples of that class and its q queries (regression: s_1 points, q queries).

Nothing is stateful, so a resumed run, any worker or `eval` draws the same bits, and opening a
store costs the same at 10^3 or 10^18 task ids.

A batch of episodes of different shapes is padded to its largest (data/padding.py), with its masks
in its labels (core/inner.py: classification labels [N, 2] = (label, ways; 0 on padding),
regression targets [N, O + 1] = (targets, weight)): a padded example weighs nothing, a padded
class is never predicted, and per-task BatchNorm takes its statistics over real examples. A
store whose episodes all have one shape (lo = hi everywhere) gives plain, unpadded batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from distributed_maml.data import metadataset
from distributed_maml.data.padding import Episode, pad
from distributed_maml.errors import StoreError

SAMPLERS = ("uniform", "meta-dataset")  # a store's spec keeps the index (to_tuple)
SPLIT_NUMBERS = {"train": 0, "test": 1, "all": 2, "val": 3}  # a task's Philox counter starts at its split's
TASK_IDS = 2**63 - 1  # an on-the-fly store's default id space: [0, 2**63 - 1)
Bounds = tuple[int, int]


@dataclass(frozen=True)
class EpisodeSpec:
    """The shapes a store's episodes take: inclusive (lo, hi) bounds per class, and the support
    set's cap (0: none beyond ways x shots)."""

    ways: Bounds
    shots: Bounds
    queries: Bounds
    max_support: int = 0
    sampler: str = "uniform"
    """"uniform" (the draw above) or "meta-dataset" (data/metadataset.py: ways up to the
    classes there are, the queries, support budget and imbalanced shots from the classes' sizes;
    shots[1], queries[1] and max_support are then the paper's per-class cap, most queries and
    budget)."""

    @classmethod
    def fixed_shape(cls, ways: int, shots: int, queries: int) -> EpisodeSpec:
        return cls((ways, ways), (shots, shots), (queries, queries))

    @classmethod
    def from_tuple(cls, t: tuple[int, ...]) -> EpisodeSpec:
        return cls((t[0], t[1]), (t[2], t[3]), (t[4], t[5]), t[6], SAMPLERS[t[7]] if len(t) > 7 else "uniform")

    def to_tuple(self) -> tuple[int, ...]:
        """Seven numbers for the uniform draw (as every store before the sampler), an eighth
        (the sampler's index in SAMPLERS) otherwise."""
        tail = (SAMPLERS.index(self.sampler),) if self.sampler != "uniform" else ()
        return (*self.ways, *self.shots, *self.queries, self.max_support, *tail)

    @property
    def meta_dataset(self) -> bool:
        return self.sampler == "meta-dataset"

    @property
    def fixed(self) -> bool:
        """Every episode has the same shape: batches need no padding."""
        lo_hi = (self.ways, self.shots, self.queries)
        return (
            not self.meta_dataset
            and all(lo == hi for lo, hi in lo_hi)
            and (not self.max_support or self.max_support >= self.support_max)
        )

    @property
    def support_max(self) -> int:
        """The largest support set an episode can have."""
        most = self.ways[1] * self.shots[1]
        return min(most, self.max_support) if self.max_support else most

    @property
    def query_max(self) -> int:
        return self.ways[1] * self.queries[1]

    def check(self, regression: bool, where: str = "task") -> None:
        """Bounds in order and >= 1, ways >= 2 (1 for regression), the cap >= the most ways."""
        for name, (lo, hi) in (("ways", self.ways), ("shots", self.shots), ("queries", self.queries)):
            if not 1 <= lo <= hi:
                raise StoreError(f"{where}.{name} must be n or [lo, hi] with 1 <= lo <= hi, got [{lo}, {hi}]")
        if self.sampler not in SAMPLERS:
            raise StoreError(f"{where}.sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if regression and self.meta_dataset:
            raise StoreError(
                f"{where}.sampler = meta-dataset draws classification episodes from classes of examples; "
                'use sampler = "uniform" for a regression family'
            )
        if regression and self.ways != (1, 1):
            raise StoreError(f"{where}.ways must be 1 for a regression family, got {list(self.ways)}")
        if not regression and self.ways[0] < 2:
            raise StoreError(f"{where}.ways must be >= 2 for classification, got {list(self.ways)}")
        if self.max_support and self.max_support < self.ways[1]:
            raise StoreError(
                f"{where}.max_support = {self.max_support} is below the most ways ({self.ways[1]}): every class "
                "needs a support example; raise it or lower the ways"
            )

    def describe(self) -> str:
        def one(b: Bounds) -> str:
            return str(b[0]) if b[0] == b[1] else f"{b[0]}-{b[1]}"

        cap = f", support <= {self.max_support}" if self.max_support else ""
        if self.meta_dataset:
            return (
                f"Meta-Dataset episodes: {one(self.ways)}-way (at most the classes there are), <= {self.queries[1]} "
                f"queries, <= {self.shots[1]} shots per class toward the budget{cap}"
            )
        return f"{one(self.ways)}-way {one(self.shots)}-shot, {one(self.queries)} queries{cap}"


def task_rng(seed: int, task_id: int, split: int = 0) -> np.random.Generator:
    """Task `task_id`'s own generator: Philox keyed by (seed, id), its counter starting at the
    split's number; no state shared across tasks."""
    key = np.array([seed, task_id], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=np.array([0, 0, 0, split], dtype=np.uint64)))


def draw_shape(rng: np.random.Generator, spec: EpisodeSpec) -> tuple[int, np.ndarray, int]:
    """(ways, shots per class [ways], queries per class): the first draws of an episode."""
    ways = int(rng.integers(spec.ways[0], spec.ways[1] + 1))
    queries = int(rng.integers(spec.queries[0], spec.queries[1] + 1))
    shots = rng.integers(spec.shots[0], spec.shots[1] + 1, size=ways)
    total = int(shots.sum())
    if spec.max_support and total > spec.max_support:
        # one example per class, the rest of the cap shared in proportion: the sum stays <= the
        # cap (scaling every s_c and then raising zeros to 1 overshot it, by 8 for 10 ways)
        shots = 1 + (shots - 1) * (spec.max_support - ways) // (total - ways)
    return ways, shots.astype(np.int64), queries


@dataclass(frozen=True)
class Shapes:
    """What the sampler needs to sort a step's episodes by shape: (seed, spec), picklable."""

    seed: int
    spec: EpisodeSpec
    split: int = 0
    pool: metadataset.Pool | None = None  # the Meta-Dataset sampler's classes (their sizes set the shape)

    def draw(self, rng: np.random.Generator) -> tuple[int, np.ndarray, int, metadataset.Drawn | None]:
        """An episode's first draws: (ways, shots per class, queries per class), and under the
        Meta-Dataset sampler the classes and source they came from (drawn first)."""
        if self.pool is None:
            return (*draw_shape(rng, self.spec), None)
        s = self.spec
        d = metadataset.draw(rng, s.ways, s.shots[1], s.queries[1], s.max_support, self.pool)
        return len(d.classes), d.shots, d.queries, d

    def of(self, ids: np.ndarray) -> np.ndarray:
        """Each task's (ways, support size, query size): int64 [len(ids), 3]."""
        out = np.empty((len(ids), 3), dtype=np.int64)
        for i, t in enumerate(ids):
            w, s, q, _ = self.draw(task_rng(self.seed, int(t), self.split))
            out[i] = (w, s.sum(), w * q)
        return out

    def sort(self, ids: np.ndarray) -> np.ndarray:
        """`ids` ordered by shape (ways, then support, then query size; stable): contiguous shards
        then hold episodes of similar shape, and each pads to little more than its own."""
        if self.spec.fixed or len(ids) < 2:
            return ids
        s = self.of(ids)
        return ids[np.lexsort((s[:, 2], s[:, 1], s[:, 0]))]


@dataclass(frozen=True)
class Examples:
    """One source's examples, grouped by class: x [N, ...] (uint8 images or float32 rows) and
    labels [N] (non-decreasing class indices)."""

    x: np.ndarray
    labels: np.ndarray

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        counts = np.bincount(self.labels, minlength=int(self.labels.max()) + 1 if len(self.labels) else 0)
        return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64), counts

    def check(self, spec: EpisodeSpec, where: str) -> None:
        _, counts = self.bounds()
        if spec.meta_dataset:  # ways up to the classes there are; a query and a shot from each
            if len(counts) < spec.ways[0]:
                raise StoreError(
                    f"{where} has {len(counts)} classes: too few for {spec.ways[0]}-way episodes; lower the ways"
                )
            if counts.min() < 2:
                raise StoreError(
                    f"{where}: class {int(counts.argmin())} has {counts.min()} example; the meta-dataset sampler "
                    "needs 2 per class (a query and a shot)"
                )
            return
        if len(counts) < spec.ways[1]:
            raise StoreError(
                f"{where} has {len(counts)} classes: too few for {spec.ways[1]}-way episodes; lower the ways"
            )
        need = spec.shots[1] + spec.queries[1]
        if counts.min() < need:
            raise StoreError(
                f"{where}: class {int(counts.argmin())} has {counts.min()} examples, fewer than the most shots + queries "
                f"({need}); lower them"
            )


SETS = ("x_support", "y_support", "x_query", "y_query")


class Drawer:
    """Draws episodes by task id from `examples` or from a family's `generate`."""

    def __init__(
        self,
        seed: int,
        spec: EpisodeSpec,
        kind: str,
        examples: Examples | None = None,
        generate: Callable[..., dict[str, np.ndarray]] | None = None,
        family_ways: int = 1,
        split: int = 0,
        sources: tuple[tuple[float, int], ...] = (),
    ) -> None:
        assert (examples is None) != (generate is None), "a drawer draws from examples or from a family"
        self.seed, self.spec, self.kind = seed, spec, kind
        self.examples, self.generate, self.family_ways = examples, generate, family_ways
        self.split = split
        self._bounds = examples.bounds() if examples is not None else None
        # several sources: (weight, classes) each; source i's classes follow source i - 1's
        weights = np.array([w for w, _ in sources], dtype=np.float64)
        self._weights = weights / weights.sum() if sources else None
        self._first_class = np.concatenate([[0], np.cumsum([c for _, c in sources])]).astype(np.int64)
        pool = None
        if spec.meta_dataset:
            if self._bounds is None:
                raise StoreError(
                    "task.sampler = meta-dataset draws from classes of examples (an image family, --from-images "
                    'or --from-table); a generated family has none: use sampler = "uniform"'
                )
            counts = self._bounds[1]
            first = self._first_class if sources else np.array([0, len(counts)], dtype=np.int64)
            pool = metadataset.Pool(counts.astype(np.int64), first, self._weights)
        self.shapes = Shapes(seed, spec, split, pool)

    def episode(self, task_id: int) -> Episode:
        rng = task_rng(self.seed, task_id, self.split)
        ways, shots, queries, drawn = self.shapes.draw(rng)
        if self.examples is not None:
            return self._from_examples(rng, ways, shots, queries, drawn)
        return self._from_family(rng, ways, shots, queries)

    @property
    def num_sources(self) -> int:
        return 0 if self._weights is None else len(self._weights)

    def _source(self, rng: np.random.Generator) -> int:
        """Several sources: the episode's, by weight (drawn right after its shape)."""
        assert self._weights is not None
        return int(rng.choice(len(self._weights), p=self._weights))

    def sources_of(self, ids: np.ndarray) -> np.ndarray:
        """Each task's source index (int64 [len(ids)]): the shape's draws, then the source's."""
        out = np.empty(len(ids), dtype=np.int64)
        for i, t in enumerate(np.asarray(ids, dtype=np.int64)):
            rng = task_rng(self.seed, int(t), self.split)
            *_, drawn = self.shapes.draw(rng)
            out[i] = drawn.source if drawn is not None else self._source(rng)
        return out

    def _from_examples(
        self, rng: np.random.Generator, ways: int, shots: np.ndarray, queries: int, drawn: metadataset.Drawn | None
    ) -> Episode:
        support, query, classes = self._picks(rng, ways, shots, queries, drawn)
        labels = np.arange(ways, dtype=np.int64)
        assert self.examples is not None
        x = self.examples.x
        return {
            "x_support": x[support],
            "y_support": np.repeat(labels, shots),
            "x_query": x[query],
            "y_query": np.repeat(labels, queries),
            "params": classes.astype(np.float32),  # label i's class in the store (pretraining's labels)
        }

    def _picks(
        self, rng: np.random.Generator, ways: int, shots: np.ndarray, queries: int, drawn: metadataset.Drawn | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An episode's support and query example indices (class by class) and its classes (the
        Meta-Dataset sampler drew them with the shape: `drawn`)."""
        assert self.examples is not None and self._bounds is not None
        starts, counts = self._bounds
        if drawn is not None:
            classes = drawn.classes
        elif self._weights is None:
            classes = rng.choice(len(counts), ways, replace=False)
        else:  # the source by weight, then `ways` of its classes
            src = self._source(rng)
            first, n = self._first_class[src], self._first_class[src + 1] - self._first_class[src]
            classes = first + rng.choice(n, ways, replace=False)
        # one draw for all the classes (a choice per class cost ~8 us each, most of an episode):
        # uniform keys [ways, most examples of a picked class], +inf past a class's own count
        have = counts[classes]
        keys = rng.random((ways, int(have.max())))
        keys[np.arange(keys.shape[1]) >= have[:, None]] = np.inf
        order = starts[classes][:, None] + np.argsort(keys, axis=1)  # each class's examples, shuffled
        support = order[np.arange(order.shape[1]) < shots[:, None]]  # row by row: class by class
        query = order[np.arange(ways)[:, None], shots[:, None] + np.arange(queries)]
        return support, query.reshape(-1), classes

    def _from_family(self, rng: np.random.Generator, ways: int, shots: np.ndarray, queries: int) -> Episode:
        assert self.generate is not None
        raw = {k: v[0] for k, v in self.generate(rng, 1, int(shots.max()), queries).items()}
        if self.kind == "regression":
            n = int(shots[0])
            return {"x_support": raw["x_support"][:n], "y_support": raw["y_support"][:n],
                    "x_query": raw["x_query"], "y_query": raw["y_query"], "params": raw["params"]}  # fmt: skip
        if ways == self.family_ways and self.spec.fixed:  # the family's own episode, untouched
            return {k: raw[k] for k in ("x_support", "y_support", "x_query", "y_query", "params")}
        classes = rng.choice(self.family_ways, ways, replace=False)
        out: dict[str, list[np.ndarray]] = {"x_support": [], "y_support": [], "x_query": [], "y_query": []}
        for label, (c, s) in enumerate(zip(classes, shots, strict=True)):
            for part, n in (("support", int(s)), ("query", queries)):
                keep = np.flatnonzero(raw[f"y_{part}"] == c)[:n]
                out[f"x_{part}"].append(raw[f"x_{part}"][keep])
                out[f"y_{part}"].append(np.full(len(keep), label, dtype=np.int64))
        return {**{k: np.concatenate(v) for k, v in out.items()}, "params": np.zeros(0, dtype=np.float32)}

    def rows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The episodes of `ids` as one batch: stacked as they are when the spec is fixed, else
        padded to the batch's largest shape with the masks in the labels (`pad`)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.examples is not None and not self.spec.fixed:
            return self._padded_from_examples(ids)
        episodes = [self.episode(int(t)) for t in ids]
        if self.spec.fixed:
            return {k: np.stack([e[k] for e in episodes]) for k in (*SETS, "params")}
        return pad(episodes, self.kind)

    def _padded_from_examples(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """`pad` of the episodes of `ids`, with the examples gathered once for the whole batch
        (one fancy index per set, padding at index -1, zeroed after): the same arrays, without
        a copy per episode (at Meta-Dataset-like glyph episodes the gather dominated the draw)."""
        assert self.examples is not None
        drawn = []
        for t in ids:
            rng = task_rng(self.seed, int(t), self.split)
            ways, shots, queries, plan = self.shapes.draw(rng)
            drawn.append((*self._picks(rng, ways, shots, queries, plan), ways, shots, queries))
        out = {"params": np.zeros((len(ids), max(d[3] for d in drawn)), dtype=np.float32)}
        for part, at in (("support", 0), ("query", 1)):
            n = max(len(d[at]) for d in drawn)
            index = np.full((len(ids), n), -1, dtype=np.int64)
            y = np.zeros((len(ids), n, 2), dtype=np.int64)
            for t, (sup, qry, classes, ways, shots, queries) in enumerate(drawn):
                picks = sup if part == "support" else qry
                index[t, : len(picks)] = picks
                y[t, : len(picks), 0] = np.repeat(np.arange(ways), shots if part == "support" else queries)
                y[t, : len(picks), 1] = ways
                out["params"][t, :ways] = classes
            x = self.examples.x[np.maximum(index, 0)]
            x[index < 0] = 0
            out[f"x_{part}"], out[f"y_{part}"] = x, y
        return out
