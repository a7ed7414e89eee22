"""Where a task's classifier rows start: the head setting (`maml.head`).

- "fixed": the network's last linear layer as it is, one meta-learned row per class index
  (class k of a task starts from row k). The default; its bits are today's.
- "unicorn" (UNICORN-MAML, Ye & Chao, ICLR 2022): one meta-learned row w (and bias b) copied into
  every class's row when a task starts. The outer gradient of w is the sum over its copies
  (autograd of the copy), the start is the same for every class, so the adapted model does not
  depend on how the classes are numbered, and there is a row for any number of classes.
- "proto" (Proto-MAML, Triantafillou et al., ICLR 2020): row k starts at 2 c_k and its bias at
  -||c_k||^2, c_k the mean feature of class k's support examples (the features: the network with
  its last layer the identity), so the unadapted head is the prototypical-network classifier.
  The meta-gradient flows through the prototypes into the feature part; a first-order run drops
  only the inner loop's second-order terms (fo-Proto-MAML). No head parameter is meta-learned.

A head is computed per task at the start of its inner loop (`Head.start`), with `width` rows: the
store's outputs in training (a padded class of a mixed batch keeps its -inf mask and takes no
gradient), a task's own ways at adaptation. The head is the network's last nn.Linear; `check`
proves the network ends in it (its outputs are the linear map of the features it gets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distributed_maml.config import MamlConfig
from distributed_maml.core.inner import Opening, bind, example_weight, head_of, loss_fn
from distributed_maml.core.models import Forward, ParamSpec, functional
from distributed_maml.errors import ConfigError

HEADS = ("fixed", "unicorn", "proto")
MAX_WAYS = 1000  # the most classes a task may have at adaptation with "unicorn" or "proto"

Params = dict[str, Tensor]


@dataclass(frozen=True)
class Head:
    """A network's head setting: its kind, the last linear layer's parameter names, the number of
    rows a training task starts with (the store's outputs) and the features' width."""

    kind: str
    weight: str
    bias: str | None
    width: int
    features: int

    @property
    def any_ways(self) -> bool:
        """Whether a task of any number of classes has rows (unicorn, proto)."""
        return self.kind != "fixed"

    def meta_spec(self, spec: ParamSpec) -> ParamSpec:
        """The network's parameter layout as meta-learned: unicorn's head one row, proto's none."""
        if self.kind == "fixed":
            return spec
        shapes = {self.weight: (1, self.features), **({self.bias: (1,)} if self.bias else {})}
        keep = [
            (n, s) for n, s in zip(spec.names, spec.shapes, strict=True) if self.kind == "unicorn" or n not in shapes
        ]
        return ParamSpec(
            tuple(n for n, _ in keep), tuple(shapes.get(n, s) if self.kind == "unicorn" else s for n, s in keep)
        )

    def meta_params(self, params: Params) -> Params:
        """The meta-parameters of a built network's parameters: unicorn takes its head's first row
        (the layer's own initialisation), proto drops the head."""
        if self.kind == "fixed":
            return params
        head = {self.weight, self.bias} - {None}
        if self.kind == "proto":
            return {k: v for k, v in params.items() if k not in head}
        return {k: v[:1] if k in head else v for k, v in params.items()}

    def start(self, forward: Forward, p: Params, xs: Tensor, ys: Tensor, width: int | None = None) -> Params:
        """One task's parameters at the start of its inner loop: `p` with its head's `width` rows
        (default: the store's outputs) made from the shared row or from the support set (xs, ys:
        labels [N], or a padded episode's [N, 2])."""
        if self.kind == "fixed" or self.own_rows(p):
            return p
        rows = self.width if width is None else width
        if self.kind == "unicorn":
            out = {**p, self.weight: p[self.weight].expand(rows, self.features)}
            if self.bias:
                out[self.bias] = p[self.bias].expand(rows)
            return out
        return {**p, **self.prototypes(forward, p, xs, ys, rows)}

    def own_rows(self, p: Params) -> bool:
        """Whether `p` carries a head of its own rows (a baseline's weights, evaluated beside the
        meta-model: they start from their rows, as a fixed head does)."""
        w = p.get(self.weight)
        return w is not None and (self.kind == "proto" or w.shape[-2] != 1)

    def names(self, names: list[str]) -> list[str]:
        """The network's parameter names once a task has started: `names` and the head's."""
        extra = [n for n in (self.weight, self.bias) if n and n not in names and self.kind != "fixed"]
        return [*names, *extra]

    def prototypes(self, forward: Forward, p: Params, xs: Tensor, ys: Tensor, rows: int) -> Params:
        """Proto-MAML's head: each class's mean support feature c_k, as rows 2 c_k and biases
        -||c_k||^2 (a class with no support example, a padded one, gets a zero row)."""
        return self.rows_of(self.features_of(forward, ys, xs)(p), ys, rows)

    def features_of(self, forward: Forward, ys: Tensor, xs: Tensor) -> Callable[[Params], Tensor]:
        """The support set's features [N, F] at given parameters: the network up to its head
        (its body, where `attach` could cut one off; else the network with its head the identity).
        `check_ends_in_head` proves the head is applied to exactly these."""
        body = getattr(forward, BODY_ATTR, None)
        if body is not None:  # a Sequential ending in the head: no F x F identity, forward and back
            own = {self.weight, self.bias}
            fwd = bind(body, ys)
            return lambda p: fwd({k: v for k, v in p.items() if k not in own}, xs)
        identity = {self.weight: torch.eye(self.features, dtype=xs.dtype, device=xs.device)}
        if self.bias:
            identity[self.bias] = torch.zeros(self.features, dtype=xs.dtype, device=xs.device)
        fwd = bind(forward, ys)
        return lambda p: fwd({**p, **identity}, xs)

    def rows_of(self, features: Tensor, ys: Tensor, rows: int) -> Params:
        """The prototype rows (2 c_k, bias -||c_k||^2) of support features [N, F] labelled ys."""
        padded = ys.dim() == 2
        labels = ys[..., 0] if padded else ys
        # [N, rows] by comparison: F.one_hot checks the labels' range, a data-dependent branch vmap refuses
        onehot = (labels.unsqueeze(-1) == torch.arange(rows, device=labels.device)).to(features.dtype)
        if padded:
            onehot = onehot * example_weight(ys).to(features.dtype).unsqueeze(-1)
        counts = onehot.sum(0).clamp(min=1.0)
        centres = (onehot.transpose(0, 1) @ features) / counts.unsqueeze(-1)  # [rows, F]
        out = {self.weight: 2.0 * centres}
        if self.bias:
            out[self.bias] = -centres.square().sum(-1)
        return out

    def open(
        self, forward: Forward, kind: str, p: Params, xs: Tensor, ys: Tensor, moving: frozenset[str] | None
    ) -> tuple[Params, Params]:
        """Proto-MAML's start and its first inner gradient from ONE pass of the network over the
        support set: `start` then a gradient of the loss at the started parameters runs the
        network over it twice (the prototypes' features, then the outputs), and back twice in
        the meta-gradient (1.34x a fixed head's conv4 step). The outputs are the head applied to
        the prototypes' own features; the gradient is the partial one, the rows held as they are
        (the loss is taken as a function of (features, rows) apart), pulled back through the
        network by the features' vector-Jacobian product. Same numbers as `start` and then
        `grad`; the meta-gradient still flows through the prototypes (fo-Proto-MAML keeps that
        path and drops only this gradient's own)."""
        loss = loss_fn(kind)
        body = [k for k in p if moving is None or k in moving]
        features_at = self.features_of(forward, ys, xs)
        if body:
            features, pull = torch.func.vjp(lambda q: features_at({**p, **q}), {k: p[k] for k in body})
        else:  # ANIL: only the rows move
            features = features_at(p)
        rows = self.rows_of(features, ys, self.width)

        def head_loss(f: Tensor, r: Params) -> Tensor:
            return loss(F.linear(f, r[self.weight], r[self.bias] if self.bias else None), ys)

        g_features, g_rows = torch.func.grad(head_loss, argnums=(0, 1))(features, rows)
        g = {k: v for k, v in g_rows.items() if moving is None or k in moving}
        if body:
            g.update(pull(g_features)[0])
        return {**p, **rows}, g


HEAD_ATTR = "task_head"  # a Forward's attribute: the head its tasks start with (absent: fixed)
BODY_ATTR = "task_body"  # a proto head's Forward's attribute: the network without its head


def attach(forward: Forward, head: Head, model: nn.Module | None = None) -> Forward:
    """`forward` carrying `head` (a fixed head: `forward` as it is). Every algorithm's per-task
    inner loop, the test-time loop and the unadapted metrics start a task through `start`, so the
    head travels with the forward function to every worker and path, as the BatchNorm masks do.
    A proto head of a `model` that is an nn.Sequential ending in its head also carries the
    forward of the rest (the prototypes' features: the built-in MLPs, conv4, ResNet-12)."""
    if head.kind != "fixed":
        setattr(forward, HEAD_ATTR, head)
    last = list(model.named_children())[-1] if isinstance(model, nn.Sequential) and len(model) > 1 else None
    if head.kind == "proto" and last is not None and head.weight == f"{last[0]}.weight":
        setattr(forward, BODY_ATTR, functional(model[:-1]))
    return forward


def head_on(forward: Forward) -> Head | None:
    """The head a forward carries (None: fixed)."""
    return getattr(forward, HEAD_ATTR, None)


def opening(forward: Forward, kind: str, p: Params, xs: Tensor, ys: Tensor) -> Opening | None:
    """A task's first inner step in one pass (`Head.open`) where it starts a proto head, else
    None: `start`, then the step's own gradient (a unicorn or fixed head costs nothing more)."""
    head = head_on(forward)
    if head is None or head.kind != "proto" or head.own_rows(p):
        return None
    return lambda q, moving: head.open(forward, kind, q, xs, ys, moving)


def start(forward: Forward, p: Params, xs: Tensor, ys: Tensor, width: int | None = None) -> Params:
    """One task's parameters at the start of its inner loop (a fixed head: `p` itself)."""
    head = head_on(forward)
    return p if head is None else head.start(forward, p, xs, ys, width)


def started_names(forward: Forward, names: list[str]) -> list[str]:
    """The parameter names a started task has (proto adds its head's)."""
    head = head_on(forward)
    return names if head is None else head.names(names)


def anil_head(cfg: MamlConfig, forward: Forward, names: Sequence[str]) -> frozenset[str] | None:
    """What ANIL's inner loop adapts: the task head's rows when the forward carries one (a proto
    head is no meta-parameter, so the last name is not its layer), else `head_of`'s choice."""
    task_head = head_on(forward)
    if task_head is not None and cfg.algorithm == "anil" and not cfg.anil_head:
        return frozenset(n for n in (task_head.weight, task_head.bias) if n)
    return head_of(cfg, names)


def started(forward: Forward, p: Params, xs: Tensor, ys: Tensor) -> tuple[Params, Callable[[Params], Params] | None]:
    """A task's started parameters for an algorithm that takes its gradient itself (iMAML, the
    checkpointed loop): (theta, the pull-back of a gradient at theta to `p`), or (p, None) for a
    fixed head. The pull-back is the vector-Jacobian product of the start: the sum over a shared
    row's copies, the path through Proto-MAML's prototypes."""
    if head_on(forward) is None:
        return p, None
    theta, pull = torch.func.vjp(lambda q: start(forward, q, xs, ys), p)
    return theta, lambda g: pull(g)[0]


def check_ends_in_head(head: Head, forward: Forward, params: Params, example_shape: tuple[int, ...]) -> None:
    """The network's outputs must be its last nn.Linear applied to the features a prototype is
    made of (`Head.features_of`; unicorn: what that layer gets, the rows a shared row is copied
    to): a one-line ConfigError otherwise (a network that transforms its outputs after that layer)."""
    if head.kind == "fixed":
        return
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *example_shape, generator=g).to(next(iter(params.values())))
    with torch.no_grad():
        out = forward(params, x)
        features = head.features_of(forward, torch.zeros(4, dtype=torch.long), x)(params)
        want = features @ params[head.weight].T + (params[head.bias] if head.bias else 0)
    if features.shape != (4, head.features) or not torch.allclose(out, want, rtol=1e-4, atol=1e-5):
        raise ConfigError(
            f"maml.head = {head.kind} needs the network's outputs to be its last nn.Linear ({head.weight}) applied "
            "to that layer's input; this network changes them after it: end the network in that layer, or use "
            "maml.head = fixed"
        )


def head_layer(model: nn.Module) -> tuple[str, str | None, int, int]:
    """The network's last nn.Linear: (weight name, bias name or None, outputs, features)."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = (name, m)
    if last is None:
        raise ConfigError(
            "maml.head = unicorn or proto needs a network whose last layer is an nn.Linear (its head); "
            "this one has none: use maml.head = fixed, or end the network in nn.Linear"
        )
    name, layer = last
    prefix = f"{name}." if name else ""
    return f"{prefix}weight", f"{prefix}bias" if layer.bias is not None else None, layer.out_features, layer.in_features


def of(kind: str, model: nn.Module, problem: str) -> Head:
    """The head setting `kind` for `model` on a store of this kind ("classification" or not): a
    one-line ConfigError where the combination has no meaning."""
    if kind not in HEADS:
        raise ConfigError(f"maml.head must be one of {', '.join(HEADS)}, got {kind!r}")
    if kind == "fixed":
        return Head("fixed", "", None, 0, 0)
    if problem != "classification":
        raise ConfigError(
            f"maml.head = {kind} starts one row per class; this store's tasks are regression: use maml.head = fixed"
        )
    weight, bias, width, features = head_layer(model)
    if kind == "proto" and bias is None:
        raise ConfigError(
            "maml.head = proto sets each class's bias to -||c_k||^2; the network's last nn.Linear has no bias: "
            "give it one (bias=True), or use maml.head = unicorn"
        )
    return Head(kind, weight, bias, width, features)
