"""Episodes of different shapes as one batch and back: `pad` fills every episode out to the
batch's largest support and query sets with its masks in the labels, `unpad` is the oracle's
view (real examples only), `real` and `real_targets` split a batch's labels from its masks."""

from __future__ import annotations

import numpy as np

Episode = dict[str, np.ndarray]  # x_support [S, ...], y_support [S] or [S, O], x_query, y_query, params


def pad(episodes: list[Episode], kind: str) -> dict[str, np.ndarray]:
    """Episodes of different shapes as one batch, padded with zeros to the largest support and
    query sets; labels [T, N, 2] = (label, the task's ways; 0 on padding) for classification,
    targets [T, N, O + 1] = (targets, 1 real / 0 padding) for regression; params (each label's
    class) padded with zeros to the most ways."""
    width = max(len(e["params"]) for e in episodes)
    out = {"params": np.zeros((len(episodes), width), dtype=np.float32)}
    for t, e in enumerate(episodes):
        out["params"][t, : len(e["params"])] = e["params"]
    for part in ("support", "query"):
        xs, ys = [e[f"x_{part}"] for e in episodes], [e[f"y_{part}"] for e in episodes]
        n = max(len(x) for x in xs)
        x = np.zeros((len(xs), n, *xs[0].shape[1:]), dtype=xs[0].dtype)
        if kind == "classification":
            y = np.zeros((len(ys), n, 2), dtype=np.int64)
        else:
            y = np.zeros((len(ys), n, ys[0].shape[-1] + 1), dtype=np.float32)
        for t, (xt, yt) in enumerate(zip(xs, ys, strict=True)):
            x[t, : len(xt)] = xt
            if kind == "classification":
                ways = int(episodes[t]["y_support"].max()) + 1
                y[t, : len(yt)] = np.stack([yt, np.full_like(yt, ways)], axis=-1)
            else:
                y[t, : len(yt), :-1] = yt
                y[t, : len(yt), -1] = 1.0
        out[f"x_{part}"], out[f"y_{part}"] = x, y
    return out


def unpad(rows: dict[str, np.ndarray], t: int, kind: str) -> Episode:
    """Task `t` of a padded batch as it was drawn (the oracle's view: real examples only)."""
    out = {}
    for part in ("support", "query"):
        y = rows[f"y_{part}"][t]
        if kind == "classification":
            keep = y[:, 1] > 0
            out[f"x_{part}"], out[f"y_{part}"] = rows[f"x_{part}"][t][keep], y[keep, 0]
        else:
            keep = y[:, -1] > 0
            out[f"x_{part}"], out[f"y_{part}"] = rows[f"x_{part}"][t][keep], y[keep, :-1]
    return out


def real(y: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Plain labels or targets of a (possibly padded) batch [T, N, ...], and which are real:
    (y without its mask column, bool [T, N])."""
    padded = y.ndim == 3 if kind == "classification" else False
    if kind == "classification":
        return (y[..., 0], y[..., 1] > 0) if padded else (y, np.ones(y.shape, dtype=bool))
    return y, np.ones(y.shape[:2], dtype=bool)


def real_targets(y: np.ndarray, output_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Regression targets [T, N, O] of a batch, padded ([T, N, O + 1]) or not, and which are real."""
    if y.shape[-1] == output_dim + 1:
        return y[..., :-1], y[..., -1] > 0
    return y, np.ones(y.shape[:2], dtype=bool)
