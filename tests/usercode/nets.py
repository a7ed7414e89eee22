"""User networks and a user task family for the tests (imported as tests.usercode.nets:...)."""

from __future__ import annotations

import numpy as np
from torch import nn


def small_cnn(input_shape, num_outputs, width=4):
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1, bias=False),  # BatchNorm follows: a bias would be redundant
        nn.BatchNorm2d(width, track_running_stats=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(-3),
        nn.Linear(4 * width, num_outputs),
    )


def running_stats(input_shape, num_outputs):
    return nn.Sequential(
        nn.Flatten(-3), nn.Linear(int(np.prod(input_shape)), 8), nn.BatchNorm1d(8), nn.Linear(8, num_outputs)
    )


def dropout(input_shape, num_outputs):
    return nn.Sequential(nn.Flatten(-3), nn.Dropout(0.2), nn.Linear(int(np.prod(input_shape)), num_outputs))


def wrong_outputs(input_shape, num_outputs):
    return nn.Sequential(nn.Flatten(-3), nn.Linear(int(np.prod(input_shape)), num_outputs + 1))


def double(input_shape, num_outputs):
    return nn.Sequential(nn.Flatten(-3), nn.Linear(int(np.prod(input_shape)), num_outputs)).double()


def not_a_module(input_shape, num_outputs):
    return "a string"


NOT_CALLABLE = 3


class Quadratic:
    """y = a x^2 + b: a regression family of our own."""

    kind = "regression"
    input_dim = 1
    output_dim = 1
    ways = 1

    def generate(self, rng, count, shots, queries):
        a, b = rng.uniform(-1, 1, (2, count, 1, 1))
        x = rng.uniform(-2, 2, (count, shots + queries, 1))
        y = (a * x**2 + b).astype(np.float32)
        x = x.astype(np.float32)
        return {
            "x_support": x[:, :shots],
            "y_support": y[:, :shots],
            "x_query": x[:, shots:],
            "y_query": y[:, shots:],
            "params": np.concatenate([a[:, 0], b[:, 0]], 1).astype(np.float32),
        }


class BadShapes(Quadratic):
    def generate(self, rng, count, shots, queries):
        out = super().generate(rng, count, shots, queries)
        out["x_query"] = out["x_query"][:, :1]
        return out
