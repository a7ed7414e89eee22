"""[task]: which tasks, their shapes (fixed, or ranges drawn per episode), how many per
meta-step, and the sources of a run on several (`Source`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distributed_maml.config.values import FAMILIES, _require, is_import_path


@dataclass(frozen=True)
class Source:
    """One of task.sources: an on-the-fly store (`store`), or an image family's classes (`family`,
    with `part` = (i, n): the i-th of n equal parts of each split's classes, an "alphabet", so
    held-out and validation episodes come from the same part of the test and val classes)."""

    name: str
    weight: float
    store: str = ""
    family: str = ""
    part: tuple[int, int] | None = None


@dataclass(frozen=True)
class TaskConfig:
    """[task]: which tasks, and how many per meta-step."""

    family: str = "seed"
    """Task family: "seed" (2-way classification, 10 features), "sinusoid" (the MAML paper's
    regression), "glyphs" (procedural handwritten-character images, N-way K-shot), "table" or
    "images" (stores built with `tasks build --from-table` / `--from-images`, passed with --tasks),
    or "package.module:Family" (your own generator, see README)."""
    ways: int | tuple[int, int] = 0
    """Classes per task for families that choose (glyphs); 0 = the family's or store's own;
    [lo, hi]: each episode draws its ways (tasks drawn on the fly, data/episodes.py)."""
    shots: int | tuple[int, int] = 5
    """Support examples per class (classification) or support points (regression); [lo, hi]:
    each class of each episode draws its own (an imbalanced support set)."""
    queries: int | tuple[int, int] = 15
    """Query examples per class (classification) or query points (regression); [lo, hi]: each
    episode draws its own."""
    max_support: int = 0
    """Variable episodes: the most support examples an episode has (over it, each class keeps one
    shot and shares the rest of the cap in proportion to its drawn shots); 0 = no cap beyond
    ways x shots."""
    sampler: str = "uniform"
    """How variable episodes are drawn: "uniform" (each bound above drawn uniformly) or
    "meta-dataset" (Triantafillou et al. 2020: ways up to the classes there are, queries and an
    imbalanced support set from the picked classes' sizes; task.shots is then the most a class
    adds to the support budget (the paper's 100), task.queries the most queries per class (10),
    task.max_support the budget (500); docs/episodes.md)."""
    sources: tuple[dict[str, Any], ...] = ()
    """[[task.sources]]: several sources of examples, each {family = "glyphs", part = [0, 2]} (an
    image family's classes, optionally the i-th of n equal parts of each split's) or {store =
    "a.arrow"} (an on-the-fly store), with weight (1) and name: `train` combines them into its
    store, each episode drawn from one source picked by weight; metrics.jsonl, TensorBoard and
    `eval` report each source. Family sources give validation and held-out episodes of their own."""
    on_the_fly: bool = False
    """`train` builds an on-the-fly store: the family's examples once (or nothing), each task drawn
    from (training.seed, its id), 2**63 - 1 ids, no cap and no epochs. Implied by any range above."""
    meta_batch: int = 32
    """Tasks per meta-step."""
    num_tasks: int = 0
    """Size of the store `train` builds when no --tasks is given; 0 means steps x meta_batch,
    so that a run sees each task about once (the paper draws fresh tasks every step), but at
    most 10^6 tasks or 1 GiB (store.DEFAULT_MAX_TASKS/BYTES): a long run cycles through it."""
    val_store: str = ""
    """A task store of validation tasks (`tasks build --classes-split val`; `train --val-tasks`)
    for training.eval_every; empty: generated families draw their own, stores from files have none."""

    def __post_init__(self) -> None:
        _require(
            self.family in FAMILIES or is_import_path(self.family),
            f"task.family must be one of {', '.join(FAMILIES)} or package.module:Family, got {self.family!r}",
        )
        for name in ("ways", "shots", "queries"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                _require(
                    len(value) == 2 and 1 <= value[0] <= value[1],
                    f"task.{name} must be n or [lo, hi] with 1 <= lo <= hi, got {list(value)}",
                )
        ways = self.bounds("ways")
        _require(ways[0] >= 0, f"task.ways must be >= 0 (0 = the family's own), got {self.ways}")
        _require(ways[0] != 1, f"task.ways must be >= 2 for classification (0 = the family's own), got {self.ways}")
        _require(self.bounds("shots")[0] >= 1, f"task.shots must be >= 1, got {self.shots}")
        _require(self.bounds("queries")[0] >= 1, f"task.queries must be >= 1, got {self.queries}")
        for i, src in enumerate(self.sources):
            bad = sorted(set(src) - {"store", "family", "part", "weight", "name"})
            _require(
                not bad,
                f"task.sources[{i}] has unknown key {bad[0] if bad else ''}; a source takes store or family "
                "(and part), weight, name",
            )
            _require(
                (isinstance(src.get("store"), str) and bool(src["store"]))
                != (isinstance(src.get("family"), str) and bool(src["family"])),
                f'task.sources[{i}] needs one of store = "path.arrow" or family = "glyphs"',
            )
            part = src.get("part", [0, 1])
            _require(
                "store" not in src or "part" not in src,
                f"task.sources[{i}].part splits a family's classes; a store is taken whole",
            )
            _require(
                isinstance(part, list | tuple)
                and len(part) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in part)
                and 0 <= part[0] < part[1],
                f"task.sources[{i}].part must be [i, n] with 0 <= i < n (the i-th of n equal parts), got {part!r}",
            )
            w = src.get("weight", 1.0)
            _require(
                isinstance(w, int | float) and not isinstance(w, bool) and w > 0,
                f"task.sources[{i}].weight must be a number > 0, got {w!r}",
            )
            _require(isinstance(src.get("name", ""), str), f"task.sources[{i}].name must be a string")
        _require(
            self.sampler in ("uniform", "meta-dataset"),
            f'task.sampler must be "uniform" or "meta-dataset", got {self.sampler!r}',
        )
        _require(
            self.sampler == "uniform" or not any(isinstance(getattr(self, n), tuple) for n in ("shots", "queries")),
            "task.sampler = meta-dataset draws the shots and queries itself: give task.shots (the most a class adds "
            "to the support budget, the paper's 100) and task.queries (the most per class, the paper's 10) as single "
            "numbers",
        )
        _require(len(self.sources) != 1, "task.sources needs two or more stores; train on one with --tasks")
        _require(
            self.max_support == 0 or self.max_support >= max(2, ways[1]),
            f"task.max_support must be 0 (no cap) or at least the most ways, got {self.max_support}",
        )
        _require(self.meta_batch >= 1, f"task.meta_batch must be >= 1, got {self.meta_batch}")
        _require(self.num_tasks >= 0, f"task.num_tasks must be >= 0 (0 = steps x meta_batch), got {self.num_tasks}")

    def source_list(self) -> list[Source]:
        """task.sources, typed (names default to the store's file stem, or family-part)."""
        out = []
        for src in self.sources:
            store, family = src.get("store", ""), src.get("family", "")
            part = tuple(src["part"]) if "part" in src else None
            default = store.rsplit("/", 1)[-1].rsplit(".", 1)[0] if store else family + (f"-{part[0]}" if part else "")
            out.append(Source(src.get("name") or default, float(src.get("weight", 1.0)), store, family, part))  # type: ignore[arg-type]
        return out

    def bounds(self, name: str) -> tuple[int, int]:
        """task.ways / shots / queries as (lo, hi) (a single value n: (n, n))."""
        value = getattr(self, name)
        return (value, value) if isinstance(value, int) else value

    @property
    def varies(self) -> bool:
        """Episodes of different shapes: a range with lo < hi, or a support cap."""
        return (
            self.max_support > 0
            or self.sampler != "uniform"
            or any(lo < hi for lo, hi in map(self.bounds, ("ways", "shots", "queries")))
        )

    @property
    def drawn(self) -> bool:
        """`train` builds an on-the-fly store (tasks from (seed, id))."""
        return (
            self.on_the_fly
            or self.varies
            or bool(self.sources)
            or any(isinstance(getattr(self, n), tuple) for n in ("ways", "shots", "queries"))
        )
