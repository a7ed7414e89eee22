"""ResNet-12, the few-shot backbone of MetaOptNet and UNICORN-MAML: four residual blocks of
three 3x3 convolutions (BatchNorm, LeakyReLU 0.1) with a 1x1 convolution on the shortcut, each
followed by a 2x2 max-pool; global average pooling; a linear head. Widths 64-160-320-640 by
default (`[model.kwargs] widths = [...]` for others).

As in conv4, BatchNorm keeps no running statistics (each task is normalised with its own
examples; `models.build` swaps it for the plain-ops TaskBatchNorm) and the convolutions before
it have no bias. DropBlock, which MetaOptNet adds, is left out: dropout needs per-task
randomness under vmap, which this engine does not draw.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distributed_maml.errors import ConfigError, StoreError

WIDTHS = (64, 160, 320, 640)


def _conv_bn(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out, track_running_stats=False),
    ]


class Block(nn.Module):
    """conv-BN-LeakyReLU x 2, conv-BN; plus the 1x1 conv-BN shortcut; LeakyReLU; 2x2 max-pool."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(c_in, c_out, 3),
            nn.LeakyReLU(0.1),
            *_conv_bn(c_out, c_out, 3),
            nn.LeakyReLU(0.1),
            *_conv_bn(c_out, c_out, 3),
        )
        self.shortcut = nn.Sequential(*_conv_bn(c_in, c_out, 1))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


def resnet12(input_shape: tuple[int, ...], num_outputs: int, kwargs: dict[str, Any]) -> nn.Sequential:
    """ResNet-12 for images of `input_shape` (C, H, W) and `num_outputs` classes."""
    if set(kwargs) - {"widths"}:
        raise ConfigError(f"model.kwargs for resnet12 take widths only, got {sorted(kwargs)}")
    widths = tuple(kwargs.get("widths", WIDTHS))
    if len(widths) != 4 or not all(isinstance(w, int) and w >= 1 for w in widths):
        raise ConfigError(f"model.kwargs.widths for resnet12 must be 4 whole numbers >= 1, got {list(widths)}")
    if len(input_shape) != 3:
        raise StoreError(f"resnet12 takes images (C, H, W); this store's examples have shape {tuple(input_shape)}")
    c, h, w = input_shape
    if min(h, w) < 16:
        raise StoreError(f"resnet12 halves the image 4 times and needs at least 16x16 pixels; the store's are {h}x{w}")
    blocks = [Block(a, b) for a, b in zip((c, *widths[:-1]), widths, strict=True)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(-3), nn.Linear(widths[-1], num_outputs))
