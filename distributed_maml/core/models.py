"""The networks, and the flat-vector view of their parameters that the learner and workers share.

Built-ins: the seed's MLP, the paper's sinusoid MLP, an MLP sized from the store, conv4 (the
paper's image backbone) and ResNet-12 (core/resnet.py). Any other network comes by import path, `model.name =
"package.module:factory"`, called as factory(input_shape=..., num_outputs=..., **model.kwargs).
Every network is checked once on the driver (`check`): one dry forward, and the rules that keep
each task's computation its own under vmap (no running statistics, no dropout).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distributed_maml import userimport
from distributed_maml.config import ModelConfig, is_import_path
from distributed_maml.core.resnet import resnet12
from distributed_maml.data.format import StoreInfo
from distributed_maml.errors import ConfigError, StoreError

# name -> (input size, hidden widths, output size); None means "taken from the store".
PRESETS: dict[str, tuple[int | None, tuple[int, ...] | None, int | None]] = {
    "seed_mlp": (10, (64,), 2),  # the seed script's MetaModel
    "sinusoid_mlp": (1, (40, 40), 1),  # the MAML paper's regression network
    "mlp": (None, None, None),
}


def dims(cfg: ModelConfig, info: StoreInfo) -> tuple[int, tuple[int, ...], int]:  # the MLP presets
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


def build(cfg: ModelConfig, info: StoreInfo, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The network for this store, initialised by its own (PyTorch default) init from `seed`."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        if cfg.name == "conv4":
            return per_task_batch_norm_(conv4(info.example_shape, info.output_dim, cfg.channels).to(dtype))
        if cfg.name == "resnet12":
            return per_task_batch_norm_(resnet12(info.example_shape, info.output_dim, cfg.kwargs).to(dtype))
        if is_import_path(cfg.name):
            return per_task_batch_norm_(_user_model(cfg, info))
        return mlp(cfg, info, dtype)


class TaskBatchNorm(nn.Module):
    """BatchNorm without running statistics, written in plain tensor ops.

    Same forward as nn.BatchNorm{1,2,3}d(track_running_stats=False) in training mode, and the same
    parameter names (weight, bias), so state_dicts are interchangeable. Why it exists: under
    torch.func.vmap, the second-order gradient through PyTorch's fused batch_norm kernel is wrong
    (torch 2.13: 3% of the gradient's scale on conv4, against an explicit per-task loop and
    float64 autograd; first order is right), while plain mean/var/rsqrt differentiate correctly.
    """

    def __init__(self, num_features: int, eps: float, weight: nn.Parameter | None, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight, self.bias = weight, bias
        # A padded episode's example weights [N] (1 real, 0 padding), swapped in per call by
        # core/inner.bind: the statistics are then over the real examples only.
        self.example_weight: torch.Tensor | None
        self.register_buffer("example_weight", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]  # every axis but the channels: this batch's statistics
        # The variance as the mean square of the centred batch: x.var over these axes reduces
        # across strides and took 3.6x as long as this whole forward (75 glyphs, 32 channels)
        if self.example_weight is None:
            centred = x - x.mean(dims, keepdim=True)
            scale = torch.rsqrt(centred.square().mean(dims, keepdim=True) + self.eps)
        else:
            w = self.example_weight.to(x.dtype).view(-1, *(1,) * (x.dim() - 1))
            count = w.sum() * (x[0, 0].numel())  # real examples times the positions of one channel
            centred = x - (x * w).sum(dims, keepdim=True) / count
            scale = torch.rsqrt((centred.square() * w).sum(dims, keepdim=True) / count + self.eps)
        shape = (1, -1, *(1,) * (x.dim() - 2))
        if self.weight is not None:
            scale = scale * self.weight.view(shape)  # per channel: folded in before the big multiply
        y = centred * scale
        return y if self.bias is None else y + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, per-task statistics"


def per_task_batch_norm_(model: nn.Module) -> nn.Module:
    """Swaps every BatchNorm that keeps no running statistics for a TaskBatchNorm with the same
    parameters, in place (those that keep them are left for `check` to refuse)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            new = TaskBatchNorm(m.num_features, m.eps, m.weight, m.bias)
            if name:
                setattr(parent, name.rpartition(".")[2], new)
            else:
                model = new
    return model


def mlp(cfg: ModelConfig, info: StoreInfo, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Linear layers with ReLU between them (images are flattened first)."""
    d_in, hidden, d_out = dims(cfg, info)
    sizes = [d_in, *hidden, d_out]
    layers: list[nn.Module] = [nn.Flatten(-len(info.example_shape))] if len(info.example_shape) > 1 else []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b, dtype=dtype))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def conv4(input_shape: tuple[int, ...], num_outputs: int, channels: int = 64) -> nn.Sequential:
    """The MAML paper's backbone: 4 x (3x3 conv, BatchNorm, ReLU, 2x2 max-pool), then a linear
    head. BatchNorm keeps no running statistics: every forward normalises with the batch it is
    given, which under vmap is one task's examples (MAML's transductive convention)."""
    if len(input_shape) != 3:
        raise StoreError(f"conv4 takes images (C, H, W); this store's examples have shape {tuple(input_shape)}")
    c, h, w = input_shape
    if min(h, w) < 16:
        raise StoreError(f"conv4 halves the image 4 times and needs at least 16x16 pixels; the store's are {h}x{w}")
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [
            # No conv bias: the BatchNorm after it cancels any bias exactly, so its meta-gradient is
            # zero up to rounding, and Adam would turn that rounding noise into lr-sized steps.
            nn.Conv2d(c if i == 0 else channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
    layers += [nn.Flatten(-3), nn.Linear(channels * (h // 16) * (w // 16), num_outputs)]
    return nn.Sequential(*layers)


def _user_model(cfg: ModelConfig, info: StoreInfo) -> nn.Module:
    factory = userimport.load(cfg.name, "model.name")
    if not callable(factory):
        raise ConfigError(f"model.name = {cfg.name!r} is a {type(factory).__name__}, not a callable factory")
    try:
        model = factory(input_shape=tuple(info.example_shape), num_outputs=info.output_dim, **cfg.kwargs)
    except Exception as e:
        raise ConfigError(
            f"model.name = {cfg.name!r}: factory(input_shape={tuple(info.example_shape)}, "
            f"num_outputs={info.output_dim}, **model.kwargs) raised {type(e).__name__}: {e}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name = {cfg.name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def check(cfg: ModelConfig, info: StoreInfo, example: torch.Tensor | None = None) -> nn.Module:
    """Builds the network once and checks what vmap-ed MAML needs of it; every problem is one
    ConfigError naming the module and what to set. `example`: one task's support inputs
    (zeros of the store's shape when None)."""
    model = build(cfg, info, seed=0)
    for name, p in model.named_parameters():
        if p.dtype != torch.float32:
            raise ConfigError(f"model {cfg.name}: parameter {name} is {p.dtype}; build the model in float32")
    for name, m in model.named_modules():
        where = f"module {name or '(root)'} ({type(m).__name__})"
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            raise ConfigError(
                f"model {cfg.name}: {where} keeps running statistics, which vmap cannot update per task; "
                "build it with track_running_stats=False (MAML normalises each task with its own batch statistics)"
            )
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise ConfigError(
                f"model {cfg.name}: {where} has p = {m.p}; dropout would need per-task randomness under vmap, "
                "which this engine does not draw: set p=0 or remove it"
            )
    if not any(True for _ in model.parameters()):
        raise ConfigError(f"model {cfg.name} has no parameters to meta-learn")
    x = example if example is not None else torch.zeros(max(2, info.n_support), *info.example_shape)
    params = dict(model.named_parameters())
    try:
        with torch.no_grad():
            out = functional(model)(params, x)
            vout = torch.func.vmap(functional(model), in_dims=(None, 0))(params, torch.stack([x, x]))
    except Exception as e:
        raise ConfigError(
            f"model {cfg.name}: a dry forward on inputs {tuple(x.shape)} (vmapped over tasks) failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    want = (x.shape[0], info.output_dim)
    if tuple(out.shape) != want or tuple(vout.shape) != (2, *want):
        raise ConfigError(
            f"model {cfg.name} gives outputs of shape {tuple(out.shape)} for inputs {tuple(x.shape)}; "
            f"the store needs {want} ({info.output_dim} = {'ways' if info.kind == 'classification' else 'targets'})"
        )
    return model


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

    @functools.cached_property
    def sizes(self) -> list[int]:
        """Each parameter's element count (computed once: unflatten runs every step)."""
        return [int(np.prod(s, dtype=np.int64)) for s in self.shapes]

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into `flat`, one per parameter (no copy)."""
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(flat, self.sizes), self.shapes, strict=True)}


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

    def call(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, params, (x,))

    # the buffers that take a padded episode's example weights (core/inner.bind)
    norms = [n for n, m in model.named_modules() if isinstance(m, TaskBatchNorm)]
    call.mask_keys = tuple(f"{n}.example_weight" if n else "example_weight" for n in norms)  # type: ignore[attr-defined]
    return call
