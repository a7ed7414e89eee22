"""The networks, and the flat-vector view of their parameters that the learner and workers share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import StoreError
from .store import StoreInfo

# name -> (input size, hidden widths, output size); None means "taken from the store".
PRESETS: dict[str, tuple[int | None, tuple[int, ...] | None, int | None]] = {
    "seed_mlp": (10, (64,), 2),  # the seed script's MetaModel
    "sinusoid_mlp": (1, (40, 40), 1),  # the MAML paper's regression network
    "mlp": (None, None, None),
}


def dims(cfg: ModelConfig, info: StoreInfo) -> tuple[int, tuple[int, ...], int]:
    """Input size, hidden widths and output size for this model on this store; a mismatch is
    the user's to fix, so it is a StoreError naming both sides."""
    want_in, hidden, want_out = PRESETS[cfg.name]
    have_out = info.output_dim
    if want_in is not None and (want_in, want_out) != (info.input_dim, have_out):
        raise StoreError(
            f"store {info.family!r} tasks have {info.input_dim} input feature(s) and {have_out} output(s), "
            f"but model {cfg.name} takes {want_in} and gives {want_out}; use a store of the right family "
            'or set model.name = "mlp" to size the model from the store'
        )
    return info.input_dim, hidden or cfg.hidden, have_out


def build(cfg: ModelConfig, info: StoreInfo, seed: int, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """An MLP with ReLU between layers, initialised by PyTorch's default from `seed`."""
    d_in, hidden, d_out = dims(cfg, info)
    sizes = [d_in, *hidden, d_out]
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
            layers.append(nn.Linear(a, b, dtype=dtype))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of a model's parameters, in the order of the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamSpec:
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numel(self) -> int:
        return int(sum(np.prod(s, dtype=np.int64) for s in self.shapes))

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into `flat`, one per parameter (no copy)."""
        sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(flat, sizes), self.shapes, strict=False)}


Forward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def functional(model: nn.Module) -> Forward:
    """The model as a pure function forward(params, x).

    For our Linear/ReLU stacks this is a direct chain of F.linear and relu: torch.func's
    functional_call swaps module attributes on every call, which costs more than the math at
    small meta-batches (about 20% of a sinusoid meta-step). Any other module goes through
    functional_call, so MAML here stays model-agnostic.
    """
    layers = list(model.children()) if isinstance(model, nn.Sequential) else []
    if layers and all(isinstance(m, nn.ReLU) or (isinstance(m, nn.Linear) and m.bias is not None) for m in layers):
        plan = [(f"{i}.weight", f"{i}.bias") if isinstance(m, nn.Linear) else None for i, m in enumerate(layers)]

        def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            for step in plan:
                x = F.linear(x, params[step[0]], params[step[1]]) if step else torch.relu(x)
            return x

        return forward
    return lambda params, x: torch.func.functional_call(model, params, (x,))
