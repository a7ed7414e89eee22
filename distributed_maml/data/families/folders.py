"""Image classes from folders: one sub-folder per class (or `class_depth` levels of folders, as
Omniglot ships alphabet/character/), decoded and resized with Pillow.

A file that cannot be decoded is skipped and counted (or, with strict, named in an error); a class
with too few images for shots + queries is dropped and counted; each rotation makes a new class
(as the MAML paper does for Omniglot). Classes are split into meta-train / meta-test before
rotation, so the rotations of a test character never train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm.auto import tqdm

from distributed_maml.data.families.images import ImageTable, check_class_split, split_classes
from distributed_maml.errors import StoreError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLITS = ("train", "val", "test", "all")


@dataclass(frozen=True)
class FolderSummary:
    classes_found: int
    classes_used: int
    classes_dropped: int  # too few images
    images: int
    unreadable: int


def find_classes(root: Path, class_depth: int) -> list[tuple[str, list[Path]]]:
    """(class name, image files) for every folder `class_depth` levels below root, sorted."""
    if not root.is_dir():
        raise StoreError(f"--from-images {root} is not a folder")
    if class_depth < 1:
        raise StoreError(f"--class-depth must be >= 1, got {class_depth}")
    folders = [root]
    for _ in range(class_depth):
        folders = sorted(d for f in folders for d in f.iterdir() if d.is_dir() and not d.name.startswith("."))
    out = []
    for d in folders:
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        out.append(("/".join(d.relative_to(root).parts), files))
    if not any(files for _, files in out):
        raise StoreError(
            f"--from-images {root} holds no images {class_depth} folder level(s) down (one sub-folder per class"
            + (", or set --class-depth 2 for alphabet/character/ layouts" if class_depth == 1 else "")
            + f"; image suffixes: {', '.join(SUFFIXES)})"
        )
    return out


def decode(path: Path | BinaryIO, size: int, grayscale: bool) -> np.ndarray | None:
    """One image (a file, or its bytes) as uint8 [C, S, S], converted and resized as stores are built; None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if grayscale else "RGB").resize((size, size), Image.Resampling.LANCZOS)
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    return a[None] if grayscale else a.transpose(2, 0, 1)


def load(
    root: str | Path,
    ways: int,
    shots: int,
    queries: int,
    image_size: int,
    split: str,
    test_fraction: float,
    seed: int,
    grayscale: bool = False,
    rotations: tuple[int, ...] = (0,),
    class_depth: int = 1,
    strict: bool = False,
    val_fraction: float = 0.0,
) -> tuple[ImageTable, FolderSummary]:
    root = Path(root)
    if not 4 <= image_size <= 1024:
        raise StoreError(f"--image-size must be in [4, 1024], got {image_size}")
    bad_rot = [r for r in rotations if r % 90]
    if bad_rot or not rotations:
        raise StoreError(f"--rotations takes multiples of 90 degrees, got {', '.join(map(str, rotations)) or 'none'}")
    if split not in SPLITS:
        raise StoreError(f"--classes-split must be one of {', '.join(SPLITS)}, got {split!r}")
    check_class_split(split, val_fraction)
    classes = find_classes(root, class_depth)
    if split != "all":
        if not 0 < test_fraction < 1:
            raise StoreError(f"--test-fraction must be in (0, 1), got {test_fraction}")
        keep = split_classes(len(classes), ways, test_fraction, seed, f"--from-images {root}", val_fraction)[split]
        classes = [classes[i] for i in keep]
    need = shots + queries
    images: list[np.ndarray] = []
    labels: list[int] = []
    names: list[str] = []
    unreadable = dropped = 0
    for name, files in tqdm(classes, desc="reading classes", unit="class", disable=None):
        decoded = []
        for f in files:
            a = decode(f, image_size, grayscale)
            if a is None:
                if strict:
                    raise StoreError(f"{f} is not a readable image (drop --strict to skip such files)")
                unreadable += 1
            else:
                decoded.append(a)
        if len(decoded) < need:
            dropped += 1
            continue
        stack = np.stack(decoded)
        for r in rotations:
            images.append(np.ascontiguousarray(np.rot90(stack, k=(r // 90) % 4, axes=(2, 3))))
            labels += [len(names)] * len(stack)
            names.append(name if rotations == (0,) else f"{name}@{r % 360}")
    used = len(names) // len(rotations)
    if len(names) < ways:
        raise StoreError(
            f"--from-images {root}: {len(names)} usable class(es) in the {split} split ({dropped} dropped for fewer "
            f"than shots + queries = {need} images, {unreadable} unreadable file(s)): too few for {ways}-way tasks"
        )
    table = ImageTable(np.concatenate(images), np.asarray(labels, dtype=np.int32), tuple(names))
    return table, FolderSummary(len(classes), used, dropped, len(table.images), unreadable)
