"""Shard computation without Ray: a task store, a model template and a device.

`ShardComputer.compute` is what the in-process loop calls directly and what every Ray actor
wraps; keeping it Ray-free keeps it testable and identical at every scale.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from distributed_maml.config import MamlConfig, ModelConfig
from distributed_maml.core import implicit
from distributed_maml.core import precision as precision_mod
from distributed_maml.core.maml import (
    TaskBatch,
    adaptation_curve,
    as_input,
    batch_sums,
    meta_gradient,
    step_plan,
    varies,
)
from distributed_maml.core.network import assemble
from distributed_maml.core.shards import ShardResult
from distributed_maml.data.episodes import Shapes
from distributed_maml.data.sampler import split_shards
from distributed_maml.data.store import TaskStore
from distributed_maml.execution.graphstep import GraphSteps

CURVE_CHUNK = 1000  # tasks per vmap call when evaluating: bounds memory, not results


class ShardComputer:
    def __init__(
        self,
        store: TaskStore,
        model_cfg: ModelConfig,
        maml_cfg: MamlConfig,
        device: str = "cpu",
        name: str = "in-process",
        task_map: str = "auto",
        gpu_step: str = "graph",
        precision: str = "fp32",
    ) -> None:
        self.store = store
        self.maml_cfg = maml_cfg
        self.proximal = implicit.Proximal.of(maml_cfg)  # how held-out tasks adapt: as the run trained
        self.device = torch.device(device)
        self.precision = precision
        precision_mod.configure(precision, self.device)  # fp32: TF32 off, a GPU's answer is the CPU's
        # The module is only a template for functional_call: its own parameters are never used.
        net = assemble(model_cfg, maml_cfg, store.info, seed=0, device=self.device)
        self.model, self.spec, self.forward, self.head = net.model, net.spec, net.forward, net.head
        self.name = name
        self.task_map = choose_task_map(self.model, self.device, task_map)
        self.resident = _resident_columns(store, self.device)
        self.graphs: GraphSteps | None = None
        if why_eager(gpu_step, self.device, self.task_map, maml_cfg, self.shapes_vary) is None:
            self.graphs = GraphSteps(self.forward, store.info.kind, self.spec, maml_cfg, name, self.autocast)
        self.gpu_step = gpu_step

    @property
    def shapes_vary(self) -> bool:
        """The store's episodes differ in shape: each batch is padded to its own largest."""
        return not self.store.info.spec.fixed

    @property
    def step_kind(self) -> str:
        """How this worker runs a step, for the run's first line."""
        if self.graphs is not None:
            return "eager steps (graph failed)" if self.graphs.failed else "CUDA-graph steps"
        why = why_eager(self.gpu_step, self.device, self.task_map, self.maml_cfg, self.shapes_vary)
        return "eager steps" if self.gpu_step != "graph" else f"eager steps ({why})"

    @property
    def where(self) -> str:
        """The device (and a precision other than fp32), for first lines and tables."""
        where = str(self.device)
        if self.device.type == "cuda":
            where += f" ({torch.cuda.get_device_name(self.device)})"
        return where if self.precision == "fp32" else f"{where}, {self.precision}"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every meta-gradient and curve of this computer runs in (scaling.precision)."""
        return precision_mod.autocast(self.precision, self.device)

    def flat_weights(self, weights: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The weights as a float32 tensor on the device: a tensor already there is used as it
        is (a learner on the device hands its own, no host round trip); an array is copied (arrays
        from Ray's object store are read-only, and the copy is tiny)."""
        if isinstance(weights, torch.Tensor) and weights.device == self.device:
            return weights.detach().to(torch.float32)
        return torch.tensor(np.asarray(weights), dtype=torch.float32, device=self.device)

    def batch(self, ids: np.ndarray) -> TaskBatch:
        """The shard's rows as tensors on the device. On a GPU that holds the whole store, a
        gather there; otherwise a gather from the memory-mapped store and one host-to-device copy
        (images cross as uint8 and become floats on the device)."""
        if self.resident is None:
            return TaskBatch.from_numpy(self.store.rows(ids), self.device)
        return self.gather(torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.device))

    def gather(self, index: torch.Tensor) -> TaskBatch:
        """Tasks `index` (a device tensor) of a store resident on the device: device ops only,
        so a CUDA graph can capture the gather with the step."""
        assert self.resident is not None, "gather needs the store on the device"
        cols = {c: t.index_select(0, index) for c, t in self.resident.items() if c != "images"}
        if "images" in self.resident:  # the image table lives on the device: gather there
            ns = self.store.info.n_support
            ids_s, ids_q = cols.pop("image_ids").split([ns, cols["y_query"].shape[1]], dim=1)
            cols["x_support"] = as_input(self.resident["images"][ids_s])
            cols["x_query"] = as_input(self.resident["images"][ids_q])
        return TaskBatch(cols["x_support"], cols["y_support"], cols["x_query"], cols["y_query"])

    def compute(
        self, weights: np.ndarray | torch.Tensor, ids: np.ndarray, before: bool = True, version: int = 0
    ) -> ShardResult:
        """The summed meta-gradient of tasks `ids` at `weights` (flat float32) after `version`
        meta-updates; `before`: also the unadapted query metrics (maml.meta_gradient)."""
        start = time.perf_counter()
        flat = self.flat_weights(weights)
        params = self.spec.unflatten(flat)
        kind = self.store.info.kind
        if self.shapes_vary:  # padded episodes: each bucket of similar shapes is its own batch
            flat_grad, metrics = self._bucketed(params, ids, before, version)
            grad_sum = flat_grad.detach().to("cpu", torch.float32).numpy()
            return ShardResult(grad_sum, len(ids), metrics, time.perf_counter() - start, self.name)
        batch = self.batch(ids)
        graphed = None if before or self.graphs is None else self.graphs.run(flat, batch)
        if graphed is not None:  # an unlogged step: replayed from the shard size's graph
            flat_grad, loss_sum, _ = graphed
            metrics = {"loss_after": loss_sum.item()}
        else:
            with self.autocast():
                grads, metrics = meta_gradient(
                    self.forward, kind, params, batch, self.maml_cfg, self.task_map, before, version
                )
            flat_grad = self.spec.flatten(grads)
        grad_sum = flat_grad.detach().to("cpu", torch.float32).numpy()
        return ShardResult(grad_sum, len(ids), metrics, time.perf_counter() - start, self.name)

    def _bucketed(
        self, params: dict[str, torch.Tensor], ids: np.ndarray, before: bool, version: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Variable episodes: the shard's ids (sorted by shape by the sampler) cut into `buckets`,
        each padded to its own largest episode, their sums added in order (a function of the
        shard alone, so the weights still depend on the shard count only). Logged steps of a
        store of several sources also report each source."""
        kind = self.store.info.kind
        total: torch.Tensor | None = None
        metrics: dict[str, float] = {}
        if (
            before and self.store.info.sources
        ):  # every source's keys on every shard (the collective loop packs them by name)
            names = ("tasks", "loss_after") + (("acc_after",) if kind == "classification" else ())
            metrics = {f"{m}@{n}": 0.0 for n in self.store.info.sources for m in names}
        assert self.store.drawer is not None
        for part in buckets(ids, self.store.drawer.shapes):
            groups = self.sources_of(part) if before else None
            with self.autocast():
                grads, m = meta_gradient(
                    self.forward, kind, params, self.batch(part), self.maml_cfg, self.task_map, before, version, groups
                )
            flat = self.spec.flatten(grads)
            total = flat if total is None else total + flat
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v
        assert total is not None
        return total, metrics

    def sources_of(self, ids: np.ndarray) -> list[str] | None:
        """Each task's source name (a store of several sources), else None."""
        drawer, names = self.store.drawer, self.store.info.sources
        if drawer is None or not names:
            return None
        return [names[i] for i in drawer.sources_of(np.asarray(ids))]

    def sums(self, flat: torch.Tensor, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """An unlogged step's shard with nothing read back: the flat summed meta-gradient and the
        query-loss sum, on the device (a CUDA graph's outputs where this computer has graphs:
        valid until its next call). For tasks mapped by vmap (collectivesteps.eligible) the very
        sums `compute(before=False)` returns, before the host copy."""
        graphed = None if self.graphs is None else self.graphs.run(flat, batch)
        if graphed is not None:
            return graphed[0], graphed[1]
        with self.autocast():
            grads, loss_sum, _ = batch_sums(
                self.forward, self.store.info.kind, self.spec.unflatten(flat), batch, self.maml_cfg,
                step_plan(self.maml_cfg, 0), None, self.task_map, False,
            )  # fmt: skip
        return self.spec.flatten(grads).float(), loss_sum

    def curve(
        self, weights: np.ndarray | torch.Tensor, ids: np.ndarray, steps: Sequence[int], lr: float
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-task query loss (and accuracy) after each of `steps` inner steps of size lr, for
        tasks `ids` from `weights`: [len(ids), len(steps)] (in chunks of CURVE_CHUNK tasks)."""
        params = self.spec.unflatten(self.flat_weights(weights))
        losses, accs = [], []
        for lo in range(0, len(ids), CURVE_CHUNK):
            batch = self.batch(ids[lo : lo + CURVE_CHUNK])
            with self.autocast():
                loss, acc = adaptation_curve(
                    self.forward,
                    self.store.info.kind,
                    params,
                    batch,
                    steps,
                    lr,
                    self.task_map,
                    self.head,
                    self.proximal,
                )
            losses.append(loss.float().cpu().numpy())
            accs.append(None if acc is None else acc.float().cpu().numpy())
        return np.concatenate(losses), (None if accs[0] is None else np.concatenate(accs))


BUCKETS = 4  # variable episodes: at most this many buckets a shard,
BUCKET_TASKS = 8  # each of at least this many tasks
BUCKET_EXAMPLES = 4096  # and only when the shard pads to this many examples a bucket: a call costs
# ~2 ms on the 2-core CPU, a small MLP's work on ~4096 examples; below it one batch is faster
# (benchmarks/episodes.py: the seed MLP's 32 mixed tasks took 3.2 ms as one batch, 9.4 ms as
# four), above it the padding saved wins (Meta-Dataset-like glyphs: 50% padding -> 31%)


def buckets(ids: np.ndarray, shapes: Shapes) -> list[np.ndarray]:
    """A shard of shape-sorted episodes cut into contiguous buckets of similar shape (or whole)."""
    ids = np.asarray(ids)
    s = shapes.of(ids)
    padded = len(ids) * int(s[:, 1].max() + s[:, 2].max())
    return split_shards(ids, max(1, min(BUCKETS, len(ids) // BUCKET_TASKS, padded // BUCKET_EXAMPLES)))


def why_eager(
    gpu_step: str, device: torch.device, task_map: str, maml_cfg: MamlConfig, shapes_vary: bool = False
) -> str | None:
    """Why a computer's unlogged steps run eagerly; None: each is a captured CUDA graph (the one
    place this is decided: the computer's graphs and the run's first line both ask here)."""
    if gpu_step != "graph":
        return "scaling.gpu_step = 'eager'"
    if device.type != "cuda":
        return "graphs need CUDA"
    if task_map != "vmap":
        return "tasks by loop"  # a per-task loop's shapes change from task to task
    if varies(maml_cfg):
        return "MAML++ schedules change the step"
    if shapes_vary:
        return "episodes of variable shape"  # a padded batch's shape changes from step to step
    return None


def choose_task_map(model: nn.Module, device: torch.device, setting: str) -> str:
    """scaling.task_map = "auto": a per-task loop for conv nets on a CPU, vmap everywhere else.

    Under vmap each adapted conv becomes a grouped convolution and every task's graph is held at
    once: on the 2-core CPU, conv4-32 needed 48-230 MiB per task (1-10 inner steps) and was
    between 1.8x slower and 1.6x faster than the loop (`bench --conv4`), while the loop's memory
    is one task's whatever the shard. On a GPU vmap won 59x (conv4, H200: an earlier measurement, not re-run since; docs/benchmarks.md)."""
    if setting != "auto":
        return setting
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return "loop" if has_conv and device.type == "cpu" else "vmap"


def _resident_columns(store: TaskStore, device: torch.device) -> dict[str, torch.Tensor] | None:
    """A GPU worker copies the store to the device once when it takes under a quarter of the
    free memory: per step it then moves only task ids, not rows (at meta-batch 65,536 of the
    seed family that is 118 MB a step otherwise, which would dominate the step). An image store
    puts its image table there too (uint8: Omniglot ~25 MB, mini-ImageNet ~1.3 GB)."""
    if device.type != "cuda" or store.info.on_the_fly:  # an on-the-fly store has no rows to hold
        return None
    columns = store.model_columns()
    nbytes = sum(a.nbytes for c in columns for a in store.column_chunks(c))
    nbytes += store.images.nbytes if store.images is not None else 0
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > free // 4:
        return None
    out = {c: torch.cat([torch.tensor(a, device=device) for a in store.column_chunks(c)]) for c in columns}
    if store.images is not None:
        out["images"] = torch.tensor(store.images, device=device)
        out["image_ids"] = out["image_ids"].long()
    return out
