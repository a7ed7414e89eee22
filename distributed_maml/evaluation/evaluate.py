"""Meta-test: adapt on held-out tasks and score the query sets, against two baselines.

The protocol (Finn et al. 2017): held-out tasks (a fixed test store, or fresh tasks from a
stream disjoint from training), the adaptation curve for inner steps 0..n with the run's inner
step size, mean and 95% confidence interval over >= 600 tasks. Every initialisation sees exactly
the same tasks and inner steps:

- maml: the run's meta-learned weights;
- pretrained: the same network trained jointly on the training tasks' data (plain supervised
  learning over all their examples, Adam), then fine-tuned on each test task's support set;
- scratch: the run's own random initialisation (its step-0 weights), fine-tuned the same way.

Few shots and many steps can blow up on some tasks (a learned initialisation may be tuned for
the training inner loop); the result reports the median, the share of **blow-ups** (a
non-finite loss, or one above BLOW_UP x the loss of the best constant guess for the family:
predicting 0 for regression, uniform for classification) and, apart from them, the share of
tasks that **got worse** than unadapted, beside the mean instead of hiding them.

Regression held-out tasks are scored on as many query points as support points (the paper's
K-shot protocol: K to adapt, K to score). The pretrained baseline's fine-tuning step size is
chosen from PRETRAINED_LR_GRID x the run's on separate validation tasks, and named.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from distributed_maml.config import Config
from distributed_maml.core import maml as maml_mod
from distributed_maml.core import models
from distributed_maml.core.learner import Learner
from distributed_maml.core.maml import as_input, loss_fn
from distributed_maml.core.models import ParamSpec
from distributed_maml.core.network import Network, assemble
from distributed_maml.data import padding
from distributed_maml.data.families import FROM_FILES, resolve
from distributed_maml.data.format import COLUMNS, StoreInfo
from distributed_maml.data.onthefly import held_out
from distributed_maml.data.sampler import Sampler, split_shards
from distributed_maml.data.store import TaskStore
from distributed_maml.data.writing import build_in_memory
from distributed_maml.errors import StoreError, UserError
from distributed_maml.evaluation import evaltable
from distributed_maml.evaluation import permutations as permutation_spread
from distributed_maml.execution import devices, factory
from distributed_maml.execution.protocol import Executor
from distributed_maml.training import checkpoint
from distributed_maml.training.checkpoint import RunState

BLOW_UP = 10.0  # a blow-up: a non-finite loss, or one above 10x the best constant guess's loss
PRETRAINED_LR_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)  # x the run's inner_lr, for the pretrained baseline
GRID_EXTENSIONS = 3  # more points (same ratio) on the side where the best one sits on the grid's edge
VALIDATION_TASKS = 100
DEFAULT_STEPS = (0, 1, 5, 10)  # the curve's step counts (cli.py repeats it: it imports no torch to parse)


def held_out_store(state: RunState, tasks: str | Path | None, num_tasks: int, shots: int | None) -> TaskStore:
    cfg, train = state.config, state.store
    if tasks is None:
        if cfg.task.family in FROM_FILES:
            raise UserError(
                f"a run on tasks built with {FROM_FILES[cfg.task.family]} needs --tasks: a store built with "
                "--classes-split test"
            )
        return generated_held_out(state, num_tasks, shots, seed=train.seed)
    store = TaskStore.open(tasks)
    info = store.info
    if info.family != train.family:
        raise StoreError(f"{tasks} holds {info.family!r} tasks but the run was trained on {train.family!r} tasks")
    same_file = Path(tasks).resolve() == Path(train.path).resolve()
    same_stream = info.family not in FROM_FILES and (info.split, info.seed) == ("train", train.seed)
    if same_file or same_stream:
        raise StoreError(
            f"{tasks} is the run's training store; evaluate on held-out tasks "
            "(build them with `distributed-maml tasks build --split test`)"
        )
    if info.family in FROM_FILES and info.split == "train":
        raise StoreError(f"{tasks} holds meta-training classes; build the test store with --classes-split test")
    return store


def generated_held_out(state: RunState, num_tasks: int, shots: int | None, seed: int) -> TaskStore:
    """Fresh tasks of the run's family from the held-out stream (`seed` picks the tasks);
    regression tasks get as many query points as shots."""
    cfg = state.config
    if state.sampler.order == "keyed":  # an on-the-fly run: episodes as it drew them, from the test split
        info = TaskStore.open(state.store.path).info
        return held_out(info, num_tasks, seed, "test", shots, cfg.task.source_list())
    k = shots or cfg.task.shots
    queries = k if resolve(cfg.task.family).kind == "regression" else cfg.task.queries
    ways = state.store.ways or cfg.task.ways
    return build_in_memory(cfg.task.family, num_tasks, seed=seed, shots=k, queries=queries, split="test", ways=ways)


def tune_lr(
    state: RunState,
    cfg: Config,
    spec: ParamSpec,
    params: dict[str, torch.Tensor],
    max_steps: int,
    shots: int | None,
    train_store: Callable[[], TaskStore],
) -> tuple[float, dict[str, Any]]:
    """The fine-tuning step size for a baseline, as the paper tuned its baselines: each of
    PRETRAINED_LR_GRID x the run's inner_lr on VALIDATION_TASKS tasks that are not the
    evaluation's (fresh held-out tasks from another seed; for file-built stores, the run's own
    meta-training tasks), scored by the mean query loss after `max_steps` steps."""
    if cfg.task.family in FROM_FILES or any(s.store for s in cfg.task.source_list()):  # no held-out draw of their own
        val = train_store()
    else:
        val = generated_held_out(state, VALIDATION_TASKS, shots, seed=state.store.seed + 1_000_003)
    computer = factory.local_computer(val, cfg.model, cfg.maml, cfg.scaling, name="step-size tuning")
    ids = np.arange(min(VALIDATION_TASKS, len(val)))

    def score(lr: float) -> float:
        weights = spec.flatten(maml_mod.with_learned_lrs(cfg.maml, params, lr)).detach().to(torch.float32).numpy()
        with np.errstate(invalid="ignore", over="ignore"):
            final = float(np.mean(computer.curve(weights, ids, (max_steps,), lr)[0][:, 0]))
        return final if np.isfinite(final) else float("inf")

    return search_grid(score, [cfg.maml.inner_lr * f for f in PRETRAINED_LR_GRID])


def search_grid(
    score: Callable[[float], float], grid: Sequence[float], extensions: int = GRID_EXTENSIONS
) -> tuple[float, dict[str, Any]]:
    """The value of `grid` (ascending, a constant ratio apart) with the lowest score, and the
    scores by value. While the best lies on the grid's edge, up to `extensions` more values at
    the same ratio are tried beyond it: a best value on the edge may be cutting off a better
    one. The scores note `"grid": "extended"` when that found an interior best, `"edge"` when
    the best is still the last value tried."""
    values = list(grid)
    scores = {v: score(v) for v in values}
    ratio = values[1] / values[0]
    note = "as given"
    for _ in range(extensions):
        best = min(values, key=lambda v: scores[v])
        if best not in (values[0], values[-1]) or not np.isfinite(scores[best]):
            break
        nxt = best / ratio if best == values[0] else best * ratio
        scores[nxt] = score(nxt)
        values = sorted(scores)
        note = "extended"
    best = min(values, key=lambda v: scores[v])
    if best in (values[0], values[-1]):
        note = "edge"
    return best, {"scores": {f"{v:g}": scores[v] for v in values}, "grid": note}


def pretrain(cfg: Config, store: TaskStore, steps: int, seed: int, net: Network) -> dict[str, torch.Tensor]:
    """The 'pretrained' baseline: one network fit to all examples of the training tasks, by
    the training loop's own step (the sampler's tasks, a gradient, the learner's Adam update).

    A store with named classes (tables, image folders, glyphs) is pretrained as a classifier over
    all its classes (task labels mapped back to classes through `params`), the standard transfer
    baseline of the few-shot literature; the parameters whose shape depends on the number of
    outputs (the head) then start from the run's own initialisation (`net`'s). Other stores fit
    the task labels or targets as given, from `net`'s initialisation."""
    info = store.info
    global_labels = info.kind == "classification" and len(info.classes) > info.ways
    if global_labels:  # (an on-the-fly store's params: each label's class, padded with class 0)
        wide = replace(info, output_dim=len(info.classes), ways=len(info.classes))
        model = models.build(cfg.model, wide, seed=seed)
        spec, forward, initial = models.ParamSpec.of(model), models.functional(model), dict(model.named_parameters())
    else:
        spec, forward, initial = net.network_spec, net.forward, net.weights()
    device = devices.resolve(cfg.scaling).device  # scaling.device: the baseline trains where the run computes
    learner = Learner(spec, spec.flatten(initial), cfg.optimizer.lr, device=str(device))
    loss = loss_fn(info.kind)
    sampler = Sampler.of(store, seed, cfg.task.meta_batch)
    for step in tqdm(range(steps), desc="pretrained baseline", unit="step", disable=None, leave=False):
        rows = store.rows(sampler.ids(step), columns=(*COLUMNS[:4], "params"))
        x = np.concatenate([rows["x_support"], rows["x_query"]], 1)
        y, keep = _real(np.concatenate([rows["y_support"], rows["y_query"]], 1), info)  # padded episodes: real examples
        if global_labels:
            y = np.take_along_axis(rows["params"].astype(np.int64), y, axis=1)
        x, y = x[keep], y[keep]
        y = y.reshape(-1) if info.kind == "classification" else y.reshape(-1, info.output_dim)
        x_, y_ = as_input(torch.from_numpy(x).to(device)), torch.from_numpy(y).to(device)
        value = loss(forward(spec.unflatten(learner.flat), x_), y_)
        (g,) = torch.autograd.grad(value, learner.flat)
        learner.apply(g)
    own = net.weights()
    return {k: (v if v.shape == own[k].shape else own[k]).detach().clone() for k, v in learner.state_dict().items()}


def baseline_weights(
    run_dir: Path,
    cfg: Config,
    net: Network,
    pretrain_steps: int,
    train_store: Callable[[], TaskStore],
    pretrained: bool = True,
) -> dict[str, dict]:
    """The two baselines' initial weights: the run's own step-0 weights (`net`'s), and (unless
    not `pretrained`) the pretrained one, cached in the run folder."""
    out = {"scratch": net.weights()}
    if not pretrained:
        return out
    cache = run_dir / "baselines" / f"pretrained_{pretrain_steps}.pt"
    if cache.exists():
        out["pretrained"] = torch.load(cache, weights_only=True)
    else:
        out["pretrained"] = pretrain(cfg, train_store(), pretrain_steps, cfg.training.seed, net)
        cache.parent.mkdir(exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(out["pretrained"], tmp)
        tmp.replace(cache)
    return out


def eval_executor(cfg: Config, store: TaskStore, workers: int | None) -> Executor:
    """The run's executor over the held-out store (`workers`, default the run's
    scaling.num_workers): held-out tasks are as parallel as training tasks. Driver mode: there
    are no meta-steps to run as a collective group."""
    n = cfg.scaling.num_workers if workers is None else workers
    return factory.make(store, cfg.model, cfg.maml, replace(cfg.scaling, num_workers=n, mode="driver"))


def curves(
    executor: Any, spec: ParamSpec, params: dict[str, torch.Tensor], n: int, steps: Sequence[int], lr: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-task loss (and accuracy) after each of `steps` inner steps (ascending): [n, len(steps)]."""
    weights = spec.flatten(params).detach().to(torch.float32).numpy()
    parts = executor.curves(weights, split_shards(np.arange(n), executor.num_shards), steps, lr)
    losses = np.concatenate([p[0] for p in parts])
    return losses, (None if parts[0][1] is None else np.concatenate([p[1] for p in parts]))


def blow_up_bound(store: TaskStore, n: int) -> float:
    """BLOW_UP x the loss of the best constant guess on these tasks: the mean squared query
    target (predicting 0) for regression, ln(ways) (uniform) for classification. Tied to the
    family's scale, not to one task's starting loss (a tiny one may rise tenfold harmlessly)."""
    info = store.info
    if info.kind == "classification":
        return BLOW_UP * float(np.log(info.ways))
    y, keep = _real(store.rows(np.arange(n), columns=("y_query",))["y_query"], info)
    return BLOW_UP * float(np.mean(np.square(y[keep], dtype=np.float64)))


def _real(y: np.ndarray, info: StoreInfo) -> tuple[np.ndarray, np.ndarray]:
    """A batch's plain labels or targets and which examples are real (padded episodes)."""
    if info.kind == "classification":
        return padding.real(y, info.kind)
    return padding.real_targets(y, info.output_dim)


def evaluate(
    run_dir: str | Path,
    tasks: str | Path | None = None,
    steps: Sequence[int] = DEFAULT_STEPS,
    num_tasks: int = 600,
    shots: int | None = None,
    baselines: bool = True,
    pretrain_steps: int | None = None,
    inner_lr: float | None = None,
    workers: int | None = None,
    which: str | None = None,
    permutations: int = 0,
    pretrained: bool = True,
) -> dict[str, Any]:
    """The adaptation curve of the run's weights (and of the baselines) on held-out tasks
    (`pretrained` False: scratch only, without the pretrained one's training and step-size search);
    `which` checkpoint: "best", "latest", "step_N" (None: best when the run keeps one);
    `permutations` K > 1: the meta-model's accuracy under K label assignments of the same tasks."""
    if not steps or min(steps) < 0:
        raise UserError(f"--steps must be a list of numbers >= 0, got {list(steps)}")
    if num_tasks < 2:
        raise UserError(f"--num-tasks must be >= 2 for a confidence interval, got {num_tasks}")
    if shots is not None and shots < 1:
        raise UserError(f"--shots must be >= 1, got {shots}")
    if permutations and not 2 <= permutations <= permutation_spread.MAX_PERMUTATIONS:
        raise UserError(f"--permutations must be in [2, {permutation_spread.MAX_PERMUTATIONS}], got {permutations}")
    run_dir = Path(run_dir)
    ckpt = checkpoint.load(checkpoint.resolve(run_dir, which))
    chosen = which or ("best" if (run_dir / "checkpoints" / "best").is_file() else "latest")
    cfg = ckpt.state.config
    if inner_lr is not None:  # test-time step size (the run's by default)
        cfg = cfg.replace(maml=replace(cfg.maml, inner_lr=inner_lr))
    store = held_out_store(ckpt.state, tasks, num_tasks, shots)
    info, n, idx = store.info, min(num_tasks, len(store)), list(steps)
    if permutations and info.kind != "classification":
        raise UserError("--permutations relabels classes; this run's tasks are regression")
    scored = sorted({0, *idx})  # the curves' columns: the asked-for counts, and 0 for "got worse"
    cols = [scored.index(k) for k in idx]
    # the meta-learned init with its learned inner step sizes (Meta-SGD, LSLR), if it has them
    inits = {"maml": {k: v.to(torch.float32) for k, v in {**ckpt.model, **ckpt.inner_lr}.items()}}
    net = assemble(cfg.model, cfg.maml, info, seed=cfg.training.seed)  # the run's own step-0 network
    spec = net.spec
    train_store = functools.cache(lambda: TaskStore.open(ckpt.state.store.path))  # opened once, if needed
    clock = _Clock()  # seconds per phase, in the result: where an evaluation's time went
    if baselines:
        steps_pre = pretrain_steps if pretrain_steps is not None else min(cfg.training.steps, 10_000)
        # in the run's layout: a unicorn or proto run's baselines start each task's head as it
        # does (unicorn: their head's first row copied; proto: the prototypes of their features)
        own = baseline_weights(run_dir, cfg, net, steps_pre, train_store, pretrained)
        inits.update({name: net.task_head.meta_params(w) for name, w in own.items()})
    clock.lap("baselines")
    lrs: dict[str, Any] = {name: cfg.maml.inner_lr for name in inits}
    tuning: dict[str, Any] = {}
    if "pretrained" in inits:
        lrs["pretrained"], tuning = tune_lr(
            ckpt.state, cfg, spec, inits["pretrained"], max(max(idx), 1), shots, train_store
        )
    clock.lap("tuning")
    bound = blow_up_bound(store, n)
    executor = eval_executor(cfg, store, workers)
    try:
        evaluated_by = executor.describe()  # while its workers are up (Ray asks them)
        results = {}
        groups = {"by_ways": evaltable.ways_buckets(store, n), "by_source": evaltable.source_groups(store, n)}
        for name, p in inits.items():  # an init without learned step sizes adapts at its lr everywhere
            params = maml_mod.with_learned_lrs(cfg.maml, p, lrs[name])
            shown = "learned" if name == "maml" and ckpt.inner_lr else lrs[name]
            losses, accs = curves(executor, spec, params, n, scored, lrs[name])
            results[name] = {"inner_lr": shown, **evaltable.summarize(losses, accs, cols, bound)}
            for key, masks in groups.items():  # variable episodes, several sources: the same numbers by group
                if masks:
                    results[name][key] = evaltable.grouped(losses, accs, masks, cols, bound)
    finally:
        executor.close()
    clock.lap("curves")
    spread = {}
    if permutations:
        own = maml_mod.with_learned_lrs(cfg.maml, inits["maml"], lrs["maml"])
        spread = {
            "permutations": permutation_spread.accuracy_spread(cfg, store, own, n, max(idx), lrs["maml"], permutations)
        }
        clock.lap("permutations")
    if tuning:
        results["pretrained"]["inner_lr_tuning"] = tuning
    out: dict[str, Any] = {
        "run": str(run_dir),
        "checkpoint_step": ckpt.step,
        "checkpoint": chosen,
        "family": info.family,
        "num_tasks": n,
        "shots": info.shots,
        "queries": info.queries,
        **({"episodes": info.spec.describe()} if info.on_the_fly else {}),
        "blow_up_bound": bound,
        "steps": idx,
        "evaluated_by": evaluated_by,
        "seconds": clock.laps,
        **results.pop("maml"),
        **spread,
        "baselines": results,
    }
    lr_tag = "" if inner_lr is None else f"-lr{inner_lr:g}"  # a test-time step size of its own keeps its own file
    ckpt_tag = "" if which is None else f"-{ckpt.path.name}"  # so does a checkpoint asked for by name
    save = run_dir / "eval" / f"eval-{info.shots}shots{lr_tag}{ckpt_tag}.json"
    save.parent.mkdir(exist_ok=True)
    save.write_text(json.dumps(out, indent=1))
    return out


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now
