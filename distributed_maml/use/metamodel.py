"""The meta-model: a run's meta-learned initialisation, adapted to your own tasks.

A `MetaModel` is the network of a run (or of an export) with its meta-parameters: the weights,
and the learned inner step sizes where the algorithm learns them. `adapt` takes a support set
(your examples and labels) and returns an `Adapted` model that predicts; `adapt_many` adapts
many tasks in one vmapped call on the model's device. Adaptation is the run's own inner loop
(core/adaptation.py, the one `eval` uses): the meta-parameters never change and no gradient is
kept.

Examples are given as they are in your data: raw feature rows for a run trained on a table
(standardised here with the table's statistics, as the store was), images as uint8 [C, H, W]
(or floats in [0, 1]), vectors as they are. Labels may be any values (numbers, strings): the
support set's distinct labels, sorted, are the task's classes, and predictions come back in
them. A task with fewer classes than the network has outputs never predicts the missing ones.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distributed_maml.config import Config, ScalingConfig
from distributed_maml.core import heads, implicit
from distributed_maml.core import precision as precision_mod
from distributed_maml.core.adaptation import adapt_tasks, task_outputs
from distributed_maml.core.inner import as_input, split_lrs
from distributed_maml.core.network import assemble
from distributed_maml.data.format import StoreInfo
from distributed_maml.errors import InputError
from distributed_maml.execution import devices
from distributed_maml.execution.computer import choose_task_map

ArrayLike = Any  # numpy arrays, torch tensors, nested lists


@dataclass(frozen=True)
class Prediction:
    """A task's predictions on its queries: `labels` (the support set's labels; regression: the
    predicted values [Q, O]), `probabilities` [Q, classes] (classification), `classes` (the
    order of the probabilities' columns)."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    classes: tuple[Any, ...] | None

    def finite(self) -> bool:
        """Whether every output is a finite number (an adaptation can diverge on wild inputs)."""
        values = self.labels if self.probabilities is None else self.probabilities
        return bool(np.isfinite(values).all())

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"predictions": self.labels.tolist()}
        if self.probabilities is not None:
            out.update(probabilities=self.probabilities.tolist(), classes=list(self.classes or ()))
        return out


@dataclass(frozen=True)
class Adapted:
    """A meta-model adapted to one task: predicts on new examples of that task."""

    meta: MetaModel
    params: dict[str, Tensor]  # the adapted network's parameters
    classes: tuple[Any, ...] | None  # the task's classes in output order (None: regression)
    steps: int

    def predict(self, x: ArrayLike) -> np.ndarray:
        """Predicted labels (in the support set's labels) or values for examples `x` [Q, ...],
        scored as one batch (per-task BatchNorm: their own statistics, as eval scores queries)."""
        return self.meta.predict_many([self], [x])[0].labels

    def predict_proba(self, x: ArrayLike) -> np.ndarray:
        """Class probabilities [Q, classes], columns in `classes` order (classification)."""
        p = self.meta.predict_many([self], [x])[0].probabilities
        if p is None:
            raise InputError("predict_proba is for classification; this model regresses (use predict)")
        return p

    def module(self) -> nn.Module:
        """The adapted network as a plain nn.Module (a copy; for a task with fewer classes than
        outputs of a fixed head, its missing classes' outputs are not masked here: take the first
        len(classes); a unicorn or proto head has one output per class)."""
        return self.meta._module_with(self.params)


class MetaModel:
    """A run's meta-learned initialisation on a device, ready to adapt (see the module doc)."""

    def __init__(
        self,
        config: Config,
        info: StoreInfo,
        meta_params: dict[str, Tensor],
        device: str = "auto",
        source: str = "",
    ) -> None:
        # where this process adapts: the run's precision, on `device` (not the run's workers, pools or mode)
        compute = devices.resolve(ScalingConfig(device=device, precision=config.scaling.precision, num_workers=0))
        self.config, self.info, self.device, self.source = config, info, compute.device, source
        self.precision = compute.precision
        self.network = assemble(config.model, config.maml, info, seed=config.training.seed, device=self.device)
        missing = sorted(set(self.network.spec.names) - set(meta_params))
        if missing:
            raise InputError(f"{source or 'the weights'} lack parameter(s) {', '.join(missing)} of this network")
        self.meta = {n: meta_params[n].detach().to(self.device, torch.float32) for n in self.network.spec.names}
        self.task_map = choose_task_map(self.network.model, self.device, config.scaling.task_map)
        self.proximal = implicit.Proximal.of(config.maml)
        self.kind = info.kind
        self.outputs = info.output_dim
        self.example_shape = tuple(info.example_shape)

    # -- the plain network --------------------------------------------------------------------

    def module(self) -> nn.Module:
        """The network with the meta-learned weights, as a plain nn.Module (a copy). A unicorn
        head's shared row fills each of the network's outputs; a proto head is made from a
        support set, so only an adapted task has one (`adapt(...).module()`)."""
        head = self.network.task_head
        if head.kind == "proto":
            raise InputError("a proto head's rows are made from a task's support set: adapt first, then .module()")
        params = split_lrs(self.meta)[0]
        if head.kind == "unicorn":
            params = head.start(self.network.forward, params, torch.empty(0), torch.empty(0), self.outputs)
        return self._module_with(params)

    def _module_with(self, params: dict[str, Tensor]) -> nn.Module:
        model = copy.deepcopy(self.network.model)
        head = self.network.task_head
        rows = params[head.weight].shape[0] if head.any_ways else self.outputs
        if rows != self.outputs:  # a task's own number of classes: its head layer that wide
            parent, _, leaf = head.weight.rpartition(".")[0].rpartition(".")
            layer = model.get_submodule(head.weight.rpartition(".")[0])
            wide = nn.Linear(layer.in_features, rows, bias=layer.bias is not None).to(layer.weight)
            setattr(model.get_submodule(parent) if parent else model, leaf, wide)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        return model

    def describe(self) -> str:
        m = self.config.maml
        return (
            f"{self.config.model.name} meta-model ({m.algorithm}, {m.inner_steps} inner steps of {m.inner_lr:g}"
            f"{', learned step sizes' if split_lrs(self.meta)[1] else ''}) for {self.kind} on {self.device}"
        )

    # -- adaptation -----------------------------------------------------------------------

    def adapt(self, x_support: ArrayLike, y_support: ArrayLike, steps: int | None = None) -> Adapted:
        """This model adapted to one task's support set (`steps`: the run's inner_steps)."""
        return self.adapt_many([(x_support, y_support)], steps)[0]

    def adapt_many(self, tasks: Sequence[tuple[ArrayLike, ArrayLike]], steps: int | None = None) -> list[Adapted]:
        """Each (x_support, y_support) task adapted, tasks of one shape in one vmapped call."""
        k = self.config.maml.inner_steps if steps is None else int(steps)
        if not 0 <= k <= 1000:
            raise InputError(f"steps must be in [0, 1000], got {k}")
        prepared = [self.support_set(xs, ys, f"task {i}") for i, (xs, ys) in enumerate(tasks)]
        out: list[Adapted | None] = [None] * len(prepared)
        for key, idx in _groups(prepared, lambda t: (t[0].shape, len(t[2] or ()))).items():
            xs = self._stack([prepared[i][0] for i in idx])
            ys = self._stack([prepared[i][1] for i in idx])
            with self._autocast():
                adapted = adapt_tasks(
                    self.network.forward, self.kind, self.meta, xs, ys, k, self.config.maml.inner_lr,
                    self.task_map, self.network.head, self.proximal, self._mask(key[1]), self._width(key[1]),
                )  # fmt: skip
            for j, i in enumerate(idx):
                out[i] = Adapted(self, {n: v[j] for n, v in adapted.items()}, prepared[i][2], k)
        return out  # type: ignore[return-value]

    def predict_many(self, adapted: Sequence[Adapted], queries: Sequence[ArrayLike]) -> list[Prediction]:
        """Each adapted task's predictions on its queries, tasks of one shape in one call."""
        if len(adapted) != len(queries):
            raise InputError(f"{len(adapted)} adapted task(s) but {len(queries)} query set(s)")
        xq = [self.inputs(q, f"task {i}'s queries") for i, q in enumerate(queries)]
        out: list[Prediction | None] = [None] * len(xq)
        for (_, ways), idx in _groups(list(zip(xq, adapted)), lambda t: (t[0].shape, len(t[1].classes or ()))).items():
            params = {n: self._stack([adapted[i].params[n] for i in idx]) for n in adapted[idx[0]].params}
            with self._autocast():
                outputs = task_outputs(
                    self.network.forward, params, self._stack([xq[i] for i in idx]), self.task_map, self._mask(ways)
                ).float()
            for j, i in enumerate(idx):
                out[i] = self._prediction(outputs[j], adapted[i].classes)
        return out  # type: ignore[return-value]

    def predict(
        self, x_support: ArrayLike, y_support: ArrayLike, x_query: ArrayLike, steps: int | None = None
    ) -> Prediction:
        """Adapt to the support set, then predict the queries (one task)."""
        return self.predict_many([self.adapt(x_support, y_support, steps)], [x_query])[0]

    # -- inputs and outputs -----------------------------------------------------------------

    def standardize(self, x: np.ndarray) -> np.ndarray:
        """Raw table features as the model's inputs: the training table's standardisation
        (float64 arithmetic, then float32: the store's own rows bit for bit)."""
        mean = np.asarray(self.info.feature_mean, dtype=np.float64)
        std = np.asarray(self.info.feature_std, dtype=np.float64)
        return ((np.asarray(x, dtype=np.float64) - mean) / std).astype(np.float32)

    def inputs(self, x: ArrayLike, what: str) -> Tensor:
        """Examples [N, *example_shape] as model inputs on the device; one line if they do not fit."""
        a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
        if a.dtype.kind not in "uif":
            raise InputError(f"{what}: examples must be numbers, got {a.dtype}")
        if a.ndim != 1 + len(self.example_shape) or tuple(a.shape[1:]) != self.example_shape or len(a) == 0:
            raise InputError(
                f"{what}: examples of shape {tuple(a.shape)}; this model takes [N >= 1, "
                f"{', '.join(map(str, self.example_shape))}]"
            )
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise InputError(f"{what}: examples hold NaN or infinite values")
        if self.info.features:
            a = self.standardize(a)
        elif len(self.example_shape) == 3 and a.dtype.kind in "ui":  # pixel values, as images are stored
            if a.min() < 0 or a.max() > 255:
                raise InputError(f"{what}: integer pixels must be in 0..255 (or give floats in [0, 1])")
            a = a.astype(np.uint8)
        elif a.dtype != np.uint8:
            a = a.astype(np.float32)
        return as_input(torch.from_numpy(np.ascontiguousarray(a)).to(self.device))

    def support_set(self, x: ArrayLike, y: ArrayLike, what: str) -> tuple[Tensor, Tensor, tuple[Any, ...] | None]:
        xs = self.inputs(x, f"{what}'s support set")
        labels = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
        if len(labels) != len(xs):
            raise InputError(f"{what}: {len(xs)} support example(s) but {len(labels)} label(s)")
        if self.kind != "classification":
            values = labels.astype(np.float32).reshape(len(xs), -1)
            if values.shape[1] != self.outputs or not np.isfinite(values).all():
                raise InputError(f"{what}: targets must be {self.outputs} finite number(s) per example")
            return xs, torch.from_numpy(values).to(self.device), None
        try:
            classes, index = np.unique(labels, return_inverse=True)
        except TypeError:
            raise InputError(f"{what}: labels must be all numbers or all strings") from None
        if len(classes) > self.most_ways:
            raise InputError(
                f"{what}: the support set has {len(classes)} classes; this model tells at most {self.most_ways} apart"
                + (
                    f" (maml.head = {self.config.maml.head})"
                    if self.any_ways
                    else f" (it was trained {self.info.ways}-way with maml.head = fixed; a run trained with "
                    "maml.head = unicorn or proto takes any number of classes)"
                )
            )
        return (
            xs,
            torch.from_numpy(index.astype(np.int64)).to(self.device),
            tuple(c.item() if isinstance(c, np.generic) else c for c in classes),
        )

    @property
    def any_ways(self) -> bool:
        """Whether a task's head has a row per class of any number (maml.head unicorn or proto)."""
        return self.network.task_head.any_ways

    @property
    def most_ways(self) -> int:
        """The most classes a task may have: the outputs of a fixed head, else heads.MAX_WAYS."""
        return heads.MAX_WAYS if self.any_ways else self.outputs

    def _width(self, ways: int) -> int | None:
        """The rows a task of `ways` classes starts with (None: the network's outputs)."""
        return ways if self.any_ways and self.kind == "classification" else None

    def _mask(self, ways: int) -> Tensor | None:
        """0 for a task's classes, -inf for outputs it lacks (None: it has them all, or its head
        has a row per class)."""
        if self.kind != "classification" or ways >= self.outputs or self.any_ways:
            return None
        mask = torch.zeros(self.outputs, device=self.device)
        mask[ways:] = float("-inf")
        return mask

    def _prediction(self, outputs: Tensor, classes: tuple[Any, ...] | None) -> Prediction:
        if classes is None:
            return Prediction(outputs.cpu().numpy(), None, None)
        probs = outputs[:, : len(classes)].softmax(-1).cpu().numpy()
        chosen = outputs[:, : len(classes)].argmax(-1).cpu().numpy()
        return Prediction(np.asarray(classes)[chosen], probs, classes)

    def _stack(self, tensors: list[Tensor]) -> Tensor:
        """The tasks' tensors stacked on a new task axis. A lone task under vmap is stacked twice
        (its copy's results dropped): vmap over one task runs other kernels than over several
        (mm, not bmm) and its last bits differ, while any count from two on gives every task
        the same bits. So a task's predictions do not depend on what it was batched with: the
        API, the CLI and a served request batched with others agree bit for bit."""
        if len(tensors) == 1 and self.task_map == "vmap":
            tensors = tensors * 2
        return torch.stack(tensors)

    def _autocast(self) -> Any:
        return precision_mod.autocast(self.precision, self.device)


def _groups(items: Sequence[Any], key: Any) -> dict[Any, list[int]]:
    """Indices of `items` grouped by key(item), in first-seen order (one batched call each)."""
    out: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        out.setdefault(key(item), []).append(i)
    return out
