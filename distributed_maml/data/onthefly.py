"""On-the-fly stores (layout "stream", data/episodes.py): planned from a family (its examples
once, or nothing), from several sources side by side, and held-out episodes like a run's. The
materialized stores' builders are in data/writing.py."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from distributed_maml.config import Source
from distributed_maml.data.episodes import TASK_IDS, EpisodeSpec, Examples
from distributed_maml.data.families import ImageFamily, resolve
from distributed_maml.data.families.images import ImageTable
from distributed_maml.data.format import SPLITS, StoreInfo, as_stream, family_info, image_info
from distributed_maml.data.store import TaskStore
from distributed_maml.data.writing import Plan, check_build_args, plan_in_memory
from distributed_maml.errors import StoreError


def plan_stream(
    family: str,
    spec: EpisodeSpec,
    seed: int,
    split: str,
    num_tasks: int = TASK_IDS,
    classes: tuple[int, int] | None = None,
    part: tuple[int, int] | None = None,
) -> Plan:
    """An on-the-fly store of a built-in or user family: an image family's table of `split`
    (its examples once; `classes`: only its classes lo..hi-1, e.g. one "alphabet" of glyphs), a
    vector family's nothing but its name."""
    fam = resolve(family)
    spec.check(fam.kind == "regression", "task")
    check_build_args(1, spec.shots[1], spec.queries[1], split, seed)
    if (classes or part) is not None and not isinstance(fam, ImageFamily):
        raise StoreError(
            f"a class range or part picks classes of an image family's split; {family} generates its tasks"
        )
    if spec.meta_dataset and not isinstance(fam, ImageFamily):
        raise StoreError(
            f"task.sampler = meta-dataset draws from classes of examples (an image family, --from-images or "
            f'--from-table); {family} generates its tasks: use sampler = "uniform"'
        )
    if isinstance(fam, ImageFamily):
        if split not in SPLITS:
            raise StoreError(f"--split must be one of {', '.join(SPLITS)} for {family}, got {split!r}")
        table = fam.table(split)
        if part is not None:  # the i-th of n equal parts of this split's classes
            classes = (part[0] * table.num_classes // part[1], (part[0] + 1) * table.num_classes // part[1])
        if classes is not None:
            table = _class_range(table, classes, f"the {split} classes of {family}")
        examples = Examples(table.images, table.labels)
        base = image_info(family, table, 1, seed, spec.ways[1], spec.shots[1], spec.queries[1], split)
        return Plan(as_stream(base, spec, num_tasks, examples), examples=examples)
    if fam.kind == "classification" and spec.ways[1] > fam.ways:
        raise StoreError(f"task family {family} has {fam.ways} ways; its episodes take at most that many (task.ways)")
    base = family_info(fam, 1, seed, spec.shots[1], spec.queries[1], split)
    return Plan(as_stream(base, spec, num_tasks, None), family=fam)


def episodes_of(
    family: str,
    ways: tuple[int, int],
    shots: tuple[int, int],
    queries: tuple[int, int],
    max_support: int = 0,
    sampler: str = "uniform",
) -> EpisodeSpec:
    """The episodes `task.*` asks of a family (ways (0, 0): the family's own)."""
    if ways == (0, 0):
        w = resolve(family).ways
        ways = (w, w)
    return EpisodeSpec(ways, shots, queries, max_support, sampler)


def held_out(
    info: StoreInfo,
    num_tasks: int,
    seed: int,
    split: str,
    shots: int | None = None,
    sources: list[Source] | None = None,
) -> TaskStore:
    """Held-out episodes like an on-the-fly run's (`info`: its training store's) from `split`,
    in memory: the first `num_tasks` ids of the split's own draw (a fixed set, ids 0..n-1), the
    episodes' shapes as trained; `shots` fixes the support (regression: the queries too). A run on
    several `sources` (all families: each its part of the split's classes) draws from them alike."""
    spec = info.spec
    if shots is not None:
        queries = (shots, shots) if info.kind == "regression" else spec.queries
        spec = replace(spec, shots=(shots, shots), queries=queries)
        if spec.meta_dataset:  # K shots a class: the uniform draw (the sampler reads shots as a cap toward its budget)
            spec = replace(spec, sampler="uniform", max_support=0)
    name = f"<held-out {info.family} episodes ({split})>"
    if info.sources:
        if not sources or any(s.store for s in sources):
            raise StoreError(
                f"a run on several sources ({', '.join(info.sources)}) with store sources has no {split} episodes of "
                f"its own: build each source with --split {split}, combine them with `tasks build --on-the-fly "
                "--sources ...`, and pass it (eval: --tasks; validation: task.val_store)"
            )
        return plan_in_memory(plan_from_sources(sources, spec, seed, split, num_tasks), name)
    return plan_in_memory(plan_stream(info.family, spec, seed, split, num_tasks), name)


def _class_range(table: ImageTable, classes: tuple[int, int], where: str) -> ImageTable:
    """Classes lo..hi-1 of `table` (lo:hi with hi past the last class is an error)."""
    lo, hi = classes
    if not 0 <= lo < hi <= table.num_classes:
        raise StoreError(f"--classes {lo}:{hi} is outside {where} (0:{table.num_classes}); pick lo:hi within it")
    keep = (table.labels >= lo) & (table.labels < hi)
    return ImageTable(table.images[keep], table.labels[keep] - lo, table.class_names[lo:hi])


def plan_sources(
    stores: list[TaskStore], names: list[str], weights: list[float], spec: EpisodeSpec | None, seed: int, num_tasks: int
) -> Plan:
    """One on-the-fly store over several (`task.sources`, `tasks build --sources`): their examples
    side by side (source i's classes after source i - 1's), each episode's source drawn by
    weight. The sources hold examples of one shape (a one-line error names the odd one out);
    `spec`: the episodes (None: the first source's)."""
    if len(stores) < 2:
        raise StoreError("several sources need at least two stores; train on one store with --tasks")
    if len(set(names)) != len(names):
        raise StoreError(f"source names must differ, got {', '.join(names)}")
    first = stores[0].info
    for store, name, weight in zip(stores, names, weights, strict=True):
        info = store.info
        if store.drawer is None or store.drawer.examples is None or info.sources:
            raise StoreError(
                f"source {name} ({store.name}) is not an on-the-fly store of examples; build it with "
                "`distributed-maml tasks build --on-the-fly` from an image family, --from-images or --from-table"
            )
        if (info.example_shape, info.kind, bool(info.image_shape)) != (
            first.example_shape,
            first.kind,
            bool(first.image_shape),
        ):
            raise StoreError(
                f"source {name} holds examples of shape {info.example_shape}, source {names[0]} of {first.example_shape}; "
                "build every source at one size (--image-size)"
            )
        if not weight > 0:
            raise StoreError(f"source {name} has weight {weight}; weights must be > 0")
    spec = spec or first.spec
    spec.check(False, "task")
    parts = [s.drawer.examples for s in stores if s.drawer is not None and s.drawer.examples is not None]
    for name, part in zip(names, parts, strict=True):
        part.check(spec, f"source {name}")
    counts = [int(p.labels.max()) + 1 for p in parts]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    examples = Examples(
        np.concatenate([p.x for p in parts]),
        np.concatenate([p.labels + o for p, o in zip(parts, offsets, strict=True)]).astype(np.int32),
    )
    splits = {s.info.split for s in stores}
    if len(splits) > 1:
        raise StoreError(f"the sources mix splits ({', '.join(sorted(splits))}); combine train stores, or test stores")
    families = {s.info.family for s in stores}
    family = families.pop() if len(families) == 1 else ("images" if first.image_shape else "table")
    classes = tuple(f"{n}/{c}" for s, n in zip(stores, names, strict=True) for c in s.info.classes)
    base = replace(first, family=family, seed=seed, split=splits.pop(), classes=classes, source="")
    info = as_stream(base, spec, num_tasks, None)
    info = replace(
        info,
        num_images=len(examples.x),
        output_dim=spec.ways[1],
        sources=tuple(names),
        source_weights=tuple(float(w) for w in weights),
        source_classes=tuple(counts),
    )
    return Plan(info, examples=examples)


def plan_from_sources(
    sources: list[Source], spec: EpisodeSpec | None, seed: int, split: str, num_tasks: int = TASK_IDS
) -> Plan:
    """task.sources as one on-the-fly store of `split`: a family source drawn from that split's
    classes (its part), a store source opened as it is (held out only by a store of its own)."""
    stores = []
    for src in sources:
        if src.store:
            stores.append(TaskStore.open(src.store))
            continue
        first = spec or EpisodeSpec.fixed_shape(resolve(src.family).ways, 1, 1)
        p = plan_stream(src.family, first, seed, split, num_tasks, part=src.part)
        stores.append(plan_in_memory(p, f"<{src.name}: {src.family} {split} classes>"))
    return plan_sources(stores, [s.name for s in sources], [s.weight for s in sources], spec, seed, num_tasks)
