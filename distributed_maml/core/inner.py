"""One task's inner loop and what it runs on: a batch of tasks as tensors, the two ways to map a
function over tasks (vmap or a loop), the losses, `adapt` (SGD steps on a support set, ANIL's
head, learned step sizes) and the layout of the learned step sizes (Meta-SGD, MAML++'s LSLR).
The meta-gradient through it: core/maml.py (and core/checkpointed.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from distributed_maml.config import MamlConfig
from distributed_maml.core.models import Forward, ParamSpec
from distributed_maml.errors import ConfigError

Params = dict[str, Tensor]


@dataclass(frozen=True)
class TaskBatch:
    """Tensors with a leading task axis: x [T, N, D]; y [T, N] labels or [T, N, O] targets."""

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor

    @classmethod
    def from_numpy(cls, rows: dict, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> TaskBatch:
        def conv(a: object) -> Tensor:
            t = as_input(torch.from_numpy(a).to(device))  # type: ignore[arg-type]  # uint8 crosses to the device
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        return cls(*(conv(rows[k]) for k in ("x_support", "y_support", "x_query", "y_query")))

    def __len__(self) -> int:
        return self.x_support.shape[0]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.x_support, self.y_support, self.x_query, self.y_query


def as_input(t: Tensor) -> Tensor:
    """Stored images (uint8) as model inputs: float32 in [0, 1], made where the model runs."""
    return t.to(torch.float32).div_(255.0) if t.dtype == torch.uint8 else t


TaskMap = Callable[..., tuple[Tensor, ...]]
# (a task's parameters, the names that move or None for all) -> (its parameters at the first
# inner step, the support loss's gradient there for those names): see `adapt`
Opening = Callable[[Params, frozenset[str] | None], tuple[Params, Params]]


def map_tasks(fn: Callable[..., tuple[Tensor, ...]], task_map: str) -> TaskMap:
    """fn(p, *task_tensors) over the leading task axis of the tensors (p shared): vmap, or a
    Python loop with the outputs stacked. Both give every task only its own examples."""
    if task_map == "vmap":

        def vmapped(p: Params, *tensors: Tensor) -> tuple[Tensor, ...]:
            return vmap(fn, in_dims=(None, *(0,) * len(tensors)))(p, *tensors)

        return vmapped

    def looped(p: Params, *tensors: Tensor) -> tuple[Tensor, ...]:
        outs = [fn(p, *task_of(tensors, i)) for i in range(tensors[0].shape[0])]
        return tuple(torch.stack(o) for o in zip(*outs, strict=True))

    return looped


def task_of(tensors: Sequence[Tensor], i: int) -> list[Tensor]:
    """Task i's tensors, alone and cut to its real examples: what every per-task loop computes
    on (map_tasks' loop and meta_gradient's loop of one graph at a time), so no loop runs the
    padding of a mixed batch (conv4 on a CPU, where the loop is the default, computed 288
    support rows for 218 real ones in a mixed glyph batch)."""
    return trimmed([t[i] for t in tensors])


def trimmed(task: list[Tensor]) -> list[Tensor]:
    """One task's tensors with a padded classification set (labels [N, 2], see `padded`) cut to
    its real examples (a prefix): a task mapped alone computes no padding. Same result: the
    masks of what is left are all ones."""
    out = list(task)
    for i in range(1, len(out)):
        x, y = out[i - 1], out[i]
        if not y.is_floating_point() and y.dim() == 2 and y.shape[-1] == 2 and x.shape[0] == y.shape[0]:
            n = int((y[:, 1] > 0).sum())
            out[i - 1], out[i] = x[:n], y[:n]
    return out


def loss_fn(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """One task's mean loss: cross-entropy (labels) or squared error (targets). Padded labels
    (see `padded`) are understood: the mean is over the task's real examples only."""
    return cross_entropy if kind == "classification" else squared_error


# A padded episode (variable ways and shots, data/episodes.py) carries its masks in its labels,
# so every loss, accuracy and BatchNorm of every algorithm sees them without a new argument:
# classification labels int [N, 2] = (label, the task's ways; 0 on a padded example), regression
# targets float [N, O + 1] = (targets, 1 for a real example, 0 for a padded one). A fixed-shape
# batch keeps plain labels and runs exactly today's ops (the choice is made on shapes, when traced).


def padded(out: Tensor, y: Tensor) -> bool:
    """Whether `y` carries a padded episode's masks (labels [N, 2] or targets [N, O + 1])."""
    return y.dim() == out.dim() and (not y.is_floating_point() or y.shape[-1] == out.shape[-1] + 1)


def example_weight(y: Tensor) -> Tensor:
    """1 for a real example, 0 for a padded one, from padded labels or targets: [N]."""
    return (y[..., 1] > 0).to(torch.float32) if not y.is_floating_point() else y[..., -1]


def class_masked(out: Tensor, y: Tensor) -> Tensor:
    """Padded labels: the outputs of classes past the task's ways set to -inf, so a padded class
    takes no probability and is never predicted; plain labels: the outputs unchanged."""
    if not padded(out, y) or y.is_floating_point():
        return out
    ways = y[..., 1].amax()
    return out.masked_fill(torch.arange(out.shape[-1], device=out.device) >= ways, float("-inf"))


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """F.cross_entropy's value, as log_softmax and a gather: under vmap and grad F's version
    decomposes into masked ops for ignore_index, which we never use (~15% of a 5-way loss's
    meta-gradient, and what kept the seed MLP's step at the minimal script's speed)."""
    if padded(out, y):
        w = (y[..., 1] > 0).to(out.dtype)
        logp = class_masked(out, y).log_softmax(-1).gather(-1, y[..., :1]).squeeze(-1)
        return -(logp * w).sum() / w.sum()
    return -out.log_softmax(-1).gather(-1, y.unsqueeze(-1)).mean()


def squared_error(out: Tensor, y: Tensor) -> Tensor:
    """F.mse_loss's value; under vmap and grad its backward decomposes in Python, this one
    does not (~6% of the loss's meta-gradient)."""
    if padded(out, y):
        w = y[..., -1]
        return ((out - y[..., :-1]).square().mean(-1) * w).sum() / w.sum()
    return (out - y).square().mean()


def accuracy(out: Tensor, y: Tensor) -> Tensor:
    """One task's accuracy (over its real examples, never predicting a padded class)."""
    if padded(out, y):
        w = (y[..., 1] > 0).to(out.dtype)
        return ((class_masked(out, y).argmax(-1) == y[..., 0]).to(out.dtype) * w).sum() / w.sum()
    return (out.argmax(-1) == y).to(out.dtype).mean()


MASK_KEYS = "mask_keys"  # a Forward's attribute: the buffers that take a padded set's example weights


def bind(forward: Forward, y: Tensor) -> Forward:
    """`forward` for the examples labelled `y`: for a padded set and a model with per-task
    BatchNorm, its statistics over the set's real examples only (the weights go in as the
    BatchNorm buffers named by the forward's MASK_KEYS); otherwise `forward` itself."""
    keys = getattr(forward, MASK_KEYS, ())
    # padded labels are int [N, 2]; targets are not told apart here, so a regression model with
    # per-task BatchNorm is refused variable shapes (data/episodes.py)
    if not keys or y.is_floating_point() or y.dim() != 2:
        return forward
    w = example_weight(y)
    return lambda p, x: forward({**p, **dict.fromkeys(keys, w.to(x.dtype))}, x)


def task_losses(kind: str, out: Tensor, y: Tensor) -> Tensor:
    """Per-task mean loss of outputs [T, N, C] against y, without vmap: [T]."""
    if kind == "classification":
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
    return F.mse_loss(out, y, reduction="none").flatten(1).mean(1)


def adapt(
    forward: Forward,
    kind: str,
    params: Params,
    xs: Tensor,
    ys: Tensor,
    steps: int,
    lr: float,
    first_order: bool = False,
    head: frozenset[str] | None = None,
    first_step: int = 0,
    opening: Opening | None = None,
) -> Params:
    """`steps` SGD steps on one task's support set, differentiable (unless first_order). With
    `head` (ANIL) only those parameters move; the rest still carry the meta-gradient. Learned
    step sizes in `params` (LR_PREFIX entries: Meta-SGD's per element, MAML++'s per parameter
    and step, indexed from `first_step`) replace `lr`; they stay in the returned dict. With
    `opening` the first step's parameters and gradient come from it (core/heads.py: Proto-MAML
    starts its head and takes that gradient from one pass of the network over the support set)."""
    loss = loss_fn(kind)
    params, lrs = split_lrs(params)
    for i in range(first_step, first_step + steps):
        if opening is not None and i == first_step:
            params, g = opening(params, head)
        else:
            moving = params if head is None else {k: params[k] for k in head}

            def support_loss(q: Params, params: Params = params) -> Tensor:
                return loss(forward({**params, **q}, xs), ys)

            g = grad(support_loss)(moving)
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
        params = {k: _sgd(params[k], g[k], _step_size(lrs, k, i, lr)) if k in g else params[k] for k in params}
    return {**params, **lrs}


def _sgd(p: Tensor, g: Tensor, lr: Tensor | float) -> Tensor:
    """p - lr * g. A fixed step size goes in as add's alpha: one kernel where p - lr * g takes
    two (and its backward one op fewer), ~5% of a sinusoid meta-step at meta-batch 1,000."""
    return p - lr * g if isinstance(lr, Tensor) else torch.add(p, g, alpha=-lr)


LR_PREFIX = "inner_lr"  # learned inner step sizes ride in the meta-parameters under these names:
PER_ELEMENT = "inner_lr:"  # + a parameter's name: Meta-SGD, one step size per element
PER_STEP = "inner_lr_step:"  # + a parameter's name: MAML++'s LSLR, one per tensor and inner step


def split_lrs(params: Params) -> tuple[Params, Params]:
    """(the model's parameters, the learned step sizes) of a meta-parameter dict."""
    model = {k: v for k, v in params.items() if not k.startswith(LR_PREFIX)}
    return model, {k: v for k, v in params.items() if k.startswith(LR_PREFIX)}


def _step_size(lrs: Params, name: str, step: int, default: float) -> Tensor | float:
    """Parameter `name`'s step size at inner step `step`: Meta-SGD's tensor (its shape), or
    MAML++'s per-step scalar (steps past the trained ones take the last), or `default`."""
    if PER_ELEMENT + name in lrs:
        return lrs[PER_ELEMENT + name]
    if PER_STEP + name in lrs:
        per_step = lrs[PER_STEP + name]
        return per_step[min(step, per_step.shape[0] - 1)]
    return default


def learned_lr_shapes(cfg: MamlConfig, spec: ParamSpec) -> dict[str, tuple[int, ...]]:
    """The learned step sizes `cfg` asks for, by name: Meta-SGD one per weight element (the
    parameter's shape), MAML++'s LSLR one per parameter tensor and inner step ([inner_steps])."""
    if cfg.algorithm == "meta-sgd":
        return {PER_ELEMENT + n: s for n, s in zip(spec.names, spec.shapes, strict=True)}
    if cfg.learn_inner_lr == "per-layer-per-step":
        return {PER_STEP + n: (cfg.inner_steps,) for n in spec.names}
    return {}


def meta_spec(cfg: MamlConfig, spec: ParamSpec) -> ParamSpec:
    """The meta-parameters' layout: the model's, then the learned step sizes (if any)."""
    extra = learned_lr_shapes(cfg, spec)
    return ParamSpec(spec.names + tuple(extra), spec.shapes + tuple(extra.values()))


def with_learned_lrs(cfg: MamlConfig, params: Params, value: float) -> Params:
    """`params` with every learned step size `cfg` asks for that it lacks, set to `value` (a
    run's start, or a baseline evaluated at a fixed step size)."""
    model, _ = split_lrs(params)
    spec = ParamSpec(tuple(model), tuple(tuple(v.shape) for v in model.values()))
    like = next(iter(model.values()))
    extra = {
        k: torch.full(shape, value, dtype=like.dtype, device=like.device)
        for k, shape in learned_lr_shapes(cfg, spec).items()
        if k not in params
    }
    return {**params, **extra}


def head_of(cfg: MamlConfig, names: Sequence[str]) -> frozenset[str] | None:
    """The parameters ANIL's inner loop adapts (None: all, for every other algorithm): those
    named with the prefix `anil_head`, by default the last layer's."""
    if cfg.algorithm != "anil":
        return None
    prefix = cfg.anil_head or (names[-1].rsplit(".", 1)[0] + "." if "." in names[-1] else names[-1])
    head = frozenset(n for n in names if n.startswith(prefix) or n == prefix)
    if not head or len(head) == len(names):
        raise ConfigError(
            f"maml.anil_head {prefix!r} names {'no' if not head else 'every'} parameter of this model "
            f"({', '.join(names)}); name the head's prefix, e.g. {names[-1].rsplit('.', 1)[0] + '.'!r}"
        )
    return head
