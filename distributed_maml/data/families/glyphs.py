"""Glyphs: procedurally generated handwritten-character-like classes, no download needed.

A class is a random stroke skeleton: 2 to 4 cubic Bezier strokes in the unit square, each new
stroke starting, most of the time, on one drawn before it (so a glyph is mostly connected, as a
character is). An example of a class is its skeleton under a small random affine map (rotation,
scale, shear, shift), with its control points jittered, drawn at 28x28 with a random stroke width
and a little pixel noise. Everything is a pure function of (UNIVERSE, class, example): the same
glyph universe for every store and every training seed, so a test store built anywhere holds the
same held-out classes.

Classes 0..TRAIN_CLASSES-1 are meta-train classes, the next TEST_CLASSES are meta-test classes:
disjoint by construction, like Omniglot's background/evaluation alphabets.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from distributed_maml.data.families.images import ImageTable

UNIVERSE = 1703_03400  # the MAML paper's arXiv number: fixes the glyph universe
TRAIN_CLASSES = 1200
TEST_CLASSES = 300
VAL_CLASSES = 150  # rendered after the test classes: adding them changed neither of the others
EXAMPLES = 20  # per class, as Omniglot has
SIZE = 28
MAX_STROKES = 4
POINTS = 64  # samples along each stroke before splatting
CLASS_CHUNK = 128  # classes rendered per vectorised chunk (bounds memory)


def class_ids(split: str) -> np.ndarray:
    if split == "train":
        return np.arange(TRAIN_CLASSES)
    if split == "val":
        return np.arange(TRAIN_CLASSES + TEST_CLASSES, TRAIN_CLASSES + TEST_CLASSES + VAL_CLASSES)
    return np.arange(TRAIN_CLASSES, TRAIN_CLASSES + TEST_CLASSES)


def _bezier(ctrl: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Points of cubic Bezier curves: ctrl [..., 4, 2], t [P] -> [..., P, 2]."""
    t = t[:, None]
    b = np.stack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3])  # [4, P, 1]
    return np.einsum("kpo,...ko->...po", b, ctrl)


def skeleton(cls: int) -> tuple[np.ndarray, np.ndarray]:
    """A class's strokes: control points [MAX_STROKES, 4, 2] in the unit square and a mask of
    the strokes it has."""
    rng = np.random.default_rng([UNIVERSE, int(cls)])
    n = int(rng.integers(2, MAX_STROKES + 1))
    ctrl = np.zeros((MAX_STROKES, 4, 2))
    for i in range(n):
        if i and rng.random() < 0.75:  # start on a stroke already drawn
            start = _bezier(ctrl[rng.integers(i)], np.array([rng.uniform(0.0, 1.0)]))[0]
        else:
            start = rng.uniform(0.2, 0.8, size=2)
        step = rng.normal(0, 1, size=2)
        end = np.clip(start + step / np.linalg.norm(step) * rng.uniform(0.3, 0.6), 0.1, 0.9)
        mid = start + (end - start) * np.array([[1 / 3], [2 / 3]]) + rng.normal(0, 0.18, size=(2, 2))
        ctrl[i] = np.clip(np.vstack([start, mid, end]), 0.1, 0.9)
    return ctrl, np.arange(MAX_STROKES) < n


def _blur_matrices(sigma: np.ndarray) -> np.ndarray:
    """Row-normalised Gaussian blur matrices [N, SIZE, SIZE], one width per image."""
    d = np.arange(SIZE)[:, None] - np.arange(SIZE)[None, :]
    m = np.exp(-0.5 * (d[None] / sigma[:, None, None]) ** 2)
    return m / m.sum(2, keepdims=True)


def render(classes: np.ndarray, examples: int = EXAMPLES) -> np.ndarray:
    """uint8 images [len(classes) * examples, 1, SIZE, SIZE], class by class."""
    out = np.empty((len(classes) * examples, 1, SIZE, SIZE), dtype=np.uint8)
    for lo in range(0, len(classes), CLASS_CHUNK):
        chunk = classes[lo : lo + CLASS_CHUNK]
        out[lo * examples : (lo + len(chunk)) * examples] = _render_chunk(chunk, examples)
    return out


def _render_chunk(classes: np.ndarray, examples: int) -> np.ndarray:
    ctrls, masks, noise = [], [], []
    for c in classes:
        ctrl, mask = skeleton(int(c))
        rng = np.random.default_rng([UNIVERSE, int(c), 1])  # this class's examples, in order
        angle = rng.normal(0, 0.15, examples)
        scale = rng.uniform(0.85, 1.1, (examples, 2))
        shear = rng.normal(0, 0.12, examples)
        cos, sin = np.cos(angle), np.sin(angle)
        rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # [E, 2, 2]
        sh = np.zeros((examples, 2, 2))
        sh[:, 0, 0] = sh[:, 1, 1] = 1
        sh[:, 0, 1] = shear
        affine = rot @ sh * scale[:, None, :]
        shift = rng.normal(0, 0.05, (examples, 1, 1, 2))
        jitter = rng.normal(0, 0.025, (examples, *ctrl.shape))
        pts = np.einsum("eij,eskj->eski", affine, ctrl[None] - 0.5 + jitter) + 0.5 + shift
        ctrls.append(pts)
        masks.append(np.broadcast_to(mask, (examples, MAX_STROKES)))
        noise.append(
            np.concatenate([rng.uniform(0.5, 0.85, (examples, 1)), rng.normal(0, 0.04, (examples, SIZE * SIZE))], 1)
        )
    ctrl = np.concatenate(ctrls)  # [N, strokes, 4, 2]
    mask = np.concatenate(masks)  # [N, strokes]
    extra = np.concatenate(noise)
    n = len(ctrl)
    xy = _bezier(ctrl, np.linspace(0, 1, POINTS)) * (SIZE - 1)  # [N, strokes, P, 2] in pixels
    xy = np.clip(xy, 0, SIZE - 1.001)
    x0, y0 = np.floor(xy[..., 0]).astype(np.int64), np.floor(xy[..., 1]).astype(np.int64)
    fx, fy = xy[..., 0] - x0, xy[..., 1] - y0
    weight = np.broadcast_to(mask[..., None], fx.shape).astype(np.float64)
    base = np.arange(n)[:, None, None] * SIZE * SIZE
    acc = np.zeros(n * SIZE * SIZE)
    for dy, dx, w in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        idx = base + (y0 + dy) * SIZE + (x0 + dx)
        acc += np.bincount(idx.ravel(), (w * weight).ravel(), minlength=acc.size)
    img = acc.reshape(n, SIZE, SIZE)
    blur = _blur_matrices(extra[:, 0])
    img = blur @ img @ blur.transpose(0, 2, 1)
    img = np.clip(img * 2.2, 0, 1) + extra[:, 1:].reshape(n, SIZE, SIZE)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)[:, None]


@lru_cache(maxsize=3)
def table(split: str) -> ImageTable:
    """The glyph images of one split (train: TRAIN_CLASSES classes, test: TEST_CLASSES, val: VAL_CLASSES)."""
    ids = class_ids(split)
    images = render(ids)
    images.flags.writeable = False
    labels = np.repeat(np.arange(len(ids), dtype=np.int32), EXAMPLES)
    return ImageTable(images, labels, tuple(f"glyph{c}" for c in ids))
