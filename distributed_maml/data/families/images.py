"""N-way K-shot tasks over an image table: the images are stored once, tasks are indices.

An `ImageTable` holds one split's images (uint8 [N, C, H, W], sorted by class) and each image's
class (0..classes-1 within the split). A task picks `ways` classes, gives them the labels
0..ways-1 in random order, and draws `shots` support and `queries` query images per class
without replacement. A task row is then the indices of its support images (class by class) and
then its query images, plus the task-relative labels: 5-way 1-shot with 15 queries per class is
80 int32 indices (320 bytes) instead of 62 KB of pixels at 28x28.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distributed_maml.errors import StoreError

CHUNK = 2048  # tasks drawn per vectorised chunk: bounds the [tasks, ways, images per class] scratch


@dataclass(frozen=True)
class ImageTable:
    images: np.ndarray  # [N, C, H, W] uint8, grouped by class
    labels: np.ndarray  # [N] int32, the class of each image (0..classes-1), non-decreasing
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {self.images.shape}")
        if len(self.labels) != len(self.images) or (np.diff(self.labels) < 0).any():
            raise ValueError("labels must give one class per image, grouped (non-decreasing)")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]

    def class_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """First image index and image count of every class."""
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64), counts

    def check(self, ways: int, shots: int, queries: int, where: str) -> None:
        if ways < 2:
            raise StoreError(f"--ways must be >= 2, got {ways}")
        if self.num_classes < ways:
            raise StoreError(f"{where} has {self.num_classes} classes: too few for {ways}-way tasks; lower --ways")
        _, counts = self.class_bounds()
        if counts.min() < shots + queries:
            raise StoreError(
                f"{where}: class {self.class_names[int(counts.argmin())]} has {counts.min()} images, fewer than "
                f"shots + queries = {shots + queries}; lower --shots or --queries"
            )

    def sample(self, rng: np.random.Generator, count: int, ways: int, shots: int, queries: int) -> dict:
        """`count` tasks: image_ids [T, ways*(shots+queries)] int32 (support then query, class by
        class), task-relative labels and params (the split's class index of each label)."""
        starts, counts = self.class_bounds()
        k = shots + queries
        ids = np.empty((count, ways, k), dtype=np.int32)
        classes = np.empty((count, ways), dtype=np.int64)
        for lo in range(0, count, CHUNK):
            n = min(CHUNK, count - lo)
            # `ways` distinct classes per task, in random order: the first of a random permutation.
            chosen = rng.random((n, self.num_classes), dtype=np.float32).argsort(1)[:, :ways]
            # `k` distinct images per chosen class: the k smallest of random keys over its images.
            size = counts[chosen]
            keys = rng.random((n, ways, int(size.max())), dtype=np.float32)
            keys[np.arange(keys.shape[2]) >= size[..., None]] = np.inf
            picks = np.argsort(keys, axis=2)[:, :, :k]
            ids[lo : lo + n] = starts[chosen][..., None] + picks
            classes[lo : lo + n] = chosen
        labels = np.arange(ways, dtype=np.int64)
        return {
            "image_ids": np.concatenate(
                [ids[:, :, :shots].reshape(count, -1), ids[:, :, shots:].reshape(count, -1)], axis=1
            ),
            "y_support": np.broadcast_to(np.repeat(labels, shots), (count, ways * shots)).copy(),
            "y_query": np.broadcast_to(np.repeat(labels, queries), (count, ways * queries)).copy(),
            "params": classes.astype(np.float32),
        }


def split_classes(
    n: int, ways: int, test_fraction: float, seed: int, what: str, val_fraction: float = 0.0
) -> dict[str, np.ndarray]:
    """Disjoint meta-train / meta-validation / meta-test class indices (a seeded permutation of
    0..n-1: test first, then val, the rest train, so the test classes do not depend on
    val_fraction; val_fraction = 0: no val classes). `what` names the source in the error
    (tables and image folders share this split)."""
    if not 0 <= val_fraction < 1:
        raise StoreError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_test = max(ways, int(round(test_fraction * n)))
    n_val = max(ways, int(round(val_fraction * n))) if val_fraction else 0
    splits = 3 if val_fraction else 2
    if n - n_test - n_val < ways:
        raise StoreError(
            f"{what} has {n} classes: too few for {ways}-way tasks in all {splits} splits (need {splits * ways}); "
            "lower --ways" + (" or --val-fraction" if val_fraction else "")
        )
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    return {
        "test": np.sort(perm[:n_test]),
        "val": np.sort(perm[n_test : n_test + n_val]),
        "train": np.sort(perm[n_test + n_val :]),
    }


def check_class_split(split: str, val_fraction: float) -> None:
    """--classes-split val needs val classes to exist."""
    if split == "val" and not val_fraction:
        raise StoreError(
            "--classes-split val needs --val-fraction > 0 (e.g. 0.15); build the train store with the same "
            "--val-fraction so it leaves those classes out"
        )
