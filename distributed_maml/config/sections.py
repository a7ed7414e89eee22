"""Configuration: one frozen dataclass per component, loaded from TOML.

Each section of a TOML file maps to one dataclass below; a component receives only its own
section. Values are checked in ``__post_init__`` with messages a user can act on, and unknown
sections or keys are errors (a typo must never silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from distributed_maml.config.scaling import ScalingConfig
from distributed_maml.config.task import TaskConfig
from distributed_maml.config.values import (
    ALGORITHMS,
    HEAD_KINDS,
    INNER_SOLVERS,
    LEARN_INNER_LR,
    MODELS,
    NONFINITE_POLICIES,
    SELECT_BY,
    Algorithm,
    HeadKind,
    InnerSolver,
    LearnInnerLr,
    NonfinitePolicy,
    SelectBy,
    _require,
    is_import_path,
)


@dataclass(frozen=True)
class ModelConfig:
    """[model]: the network that is meta-learned."""

    name: str = "seed_mlp"
    """"seed_mlp" (10 -> 64 -> 2, ReLU), "sinusoid_mlp" (1 -> 40 -> 40 -> 1, ReLU, the paper's),
    "mlp" (input and output sizes taken from the task store, hidden sizes from `hidden`), "conv4"
    (the paper's 4-block conv net with per-task BatchNorm, sized from the store) or
    "resnet12" (MetaOptNet's backbone, widths 64-160-320-640 or [model.kwargs] widths = [...]) or
    "package.module:factory": your own, called as factory(input_shape=..., num_outputs=..., **kwargs)."""
    hidden: tuple[int, ...] = (64,)
    """Hidden layer widths, used by name = "mlp" only."""
    channels: int = 64
    """Filters per conv block, used by name = "conv4" only (the paper: 64 Omniglot, 32 mini-ImageNet)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """[model.kwargs]: keyword arguments passed through to a user factory; for resnet12, `widths`."""

    def __post_init__(self) -> None:
        _require(
            self.name in MODELS or is_import_path(self.name),
            f"model.name must be one of {', '.join(MODELS)} or package.module:factory, got {self.name!r}",
        )
        _require(self.channels >= 1, f"model.channels must be >= 1, got {self.channels}")
        _require(
            not self.kwargs or is_import_path(self.name) or self.name == "resnet12",
            f"model.kwargs are passed to a user factory only (and resnet12's widths); model.name = {self.name!r} takes none",
        )
        _require(len(self.hidden) >= 1, "model.hidden must list at least one layer width")
        _require(all(h >= 1 for h in self.hidden), f"model.hidden widths must be >= 1, got {list(self.hidden)}")


@dataclass(frozen=True)
class MamlConfig:
    """[maml]: the algorithm, its inner loop and the order of the meta-gradient."""

    inner_steps: int = 5
    """SGD steps on the support set per task."""
    inner_lr: float = 0.5
    """Step size of the inner SGD (alpha in the paper)."""
    first_order: bool = False
    """Drop the second-order terms (FOMAML): cheaper, usually a little worse. With algorithm =
    "maml" this is "fomaml"; with "anil", first-order ANIL."""
    algorithm: Algorithm = "maml"
    """"maml" (Finn et al. 2017), "fomaml" (its first-order form), "meta-sgd" (Li et al. 2017:
    a learned step size per weight element, initialised to inner_lr), "anil" (Raghu et al. 2020:
    the inner loop adapts only the head, `anil_head`), "reptile" (Nichol et al. 2018: the
    meta-update moves the weights toward the mean of the adapted weights, by `reptile_step`), or
    "imaml" (Rajeswaran et al. 2019: a proximal inner loop, `imaml_lambda`, and the implicit
    meta-gradient by `imaml_cg_steps` of conjugate gradient; memory independent of inner_steps)."""
    multi_step_loss: bool = False
    """MAML++ (Antoniou et al. 2019), with maml/fomaml: the meta-objective is the query loss
    after every inner step, weighted; the weights anneal toward the last step over
    `msl_anneal_steps` meta-updates (MAML++'s schedule, with meta-updates for its epochs)."""
    msl_anneal_steps: int = 1000
    """Meta-updates over which the multi-step loss's weights move to the last step."""
    first_order_until: int = 0
    """MAML++'s derivative-order annealing, with maml: first-order meta-gradients for the first
    this many meta-updates, second order after (0 = off)."""
    learn_inner_lr: LearnInnerLr = "none"
    """MAML++'s LSLR, with maml/fomaml: "per-layer-per-step" learns one inner step size per
    parameter tensor and inner step (initialised to inner_lr), meta-trained with the weights."""
    anil_head: str = ""
    """With "anil": the parameter-name prefix of the head the inner loop adapts (e.g. "2." or
    "head."); empty = the model's last layer."""
    head: HeadKind = "fixed"
    """Where a classification task's head rows start (core/heads.py, docs/algorithms.md): "fixed",
    one meta-learned row per class index (class k starts from row k; a task may have at most the
    store's ways); "unicorn" (UNICORN-MAML, Ye & Chao 2022), one meta-learned row copied to every
    class; "proto" (Proto-MAML, Triantafillou et al. 2020), each class's row from its support
    prototype in the network's features. With unicorn or proto the answer does not depend on how
    the classes are named, and a task may have any number of classes (up to 1,000)."""
    reptile_step: float = 1.0
    """With "reptile": the outer step size epsilon, theta += epsilon * mean(phi - theta), applied
    by plain SGD (Adam's optimizer.lr is unused). 1.0 is Nichol et al.'s starting value; on the
    sinusoid family 0.1 learned 3x slower (held-out loss 1.34 vs 0.49 after 3,000 steps)."""
    imaml_lambda: float = 1.0
    """With "imaml": the proximal term's strength, the inner loop minimises the support loss plus
    (lambda / 2) ||phi - theta||^2; larger keeps phi closer to theta. Each inner step takes back
    inner_lr x lambda of phi's distance from theta, so that product must be < 1 and is best well
    below it: on glyphs with inner_lr 0.4, lambda 2 (0.8) left 5 inner steps at 0.35 query
    accuracy where plain SGD reached 0.82, lambda 0.5 (0.2) reached 0.74."""
    imaml_cg_steps: int = 5
    """With "imaml": conjugate-gradient steps for (I + H / lambda) g = grad L_query (each one
    Hessian-vector product of the support loss)."""
    imaml_damping: float = 0.0
    """With "imaml": conjugate gradient solves (I + H / (lambda + damping)) g = grad L_query; 0 is
    the exact implicit gradient, which assumes a converged inner loop. iMAML's authors' code uses
    10 (measured on glyphs: docs/algorithms.md)."""
    imaml_solver: InnerSolver = "backtracking"
    """With "imaml": how the inner loop takes its inner_steps steps. "backtracking": each task's
    step size adapts from inner_lr (a step that lowers the proximal objective is kept and the next
    is 1.25x longer; one that does not is dropped and the next is halved), at the cost of a plain
    step; it reaches the stationary point the implicit gradient assumes where plain steps
    oscillate (glyphs, 10 steps: residual 0.9 against 2.9, docs/algorithms.md). "sgd": plain
    steps of inner_lr."""
    checkpoint_inner: bool = False
    """Second-order meta-gradients with memory that does not grow with inner_steps: only each
    step's weights are kept and one step's graph is rebuilt at a time on the way back (the same
    meta-gradient; one extra support forward and backward per step). For maml, meta-sgd, anil
    and the MAML++ options; a first-order step has no inner graph to save."""
    checkpoint_recompute: bool = False
    """With checkpoint_inner: keep no step's weights either, recompute each from the initial
    weights on the way back. Memory flat in inner_steps even where one copy of the weights is
    large beside one step's activations (ResNet-12: 50 MB a copy, a task at 10 steps kept 11);
    cost: K(K-1)/2 more inner steps for K inner steps. The same meta-gradient, bit for bit."""

    def __post_init__(self) -> None:
        _require(1 <= self.inner_steps <= 100, f"maml.inner_steps must be in [1, 100], got {self.inner_steps}")
        _require(
            math.isfinite(self.inner_lr) and self.inner_lr > 0,
            f"maml.inner_lr must be a finite number > 0, got {self.inner_lr}",
        )
        _require(
            self.algorithm in ALGORITHMS,
            f"maml.algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}",
        )
        _require(
            self.learn_inner_lr in LEARN_INNER_LR,
            f"maml.learn_inner_lr must be one of {', '.join(LEARN_INNER_LR)}, got {self.learn_inner_lr!r}",
        )
        plus = [
            n
            for n, on in [
                ("multi_step_loss", self.multi_step_loss),
                ("first_order_until", self.first_order_until),
                ("learn_inner_lr", self.learn_inner_lr != "none"),
            ]
            if on
        ]
        _require(
            not plus or self.algorithm in ("maml", "fomaml"),
            f"maml.{plus[0] if plus else ''} (MAML++) combines with algorithm maml or fomaml, not {self.algorithm!r}",
        )
        _require(
            not (self.first_order and self.algorithm == "reptile"),
            "maml.first_order has no meaning for reptile (it takes no meta-gradient); drop it",
        )
        _require(
            not (self.first_order and self.algorithm == "imaml"),
            "maml.first_order has no meaning for imaml (its meta-gradient is implicit); drop it",
        )
        _require(
            math.isfinite(self.imaml_lambda) and self.imaml_lambda > 0,
            f"maml.imaml_lambda must be a finite number > 0, got {self.imaml_lambda}",
        )
        _require(
            self.algorithm != "imaml" or self.inner_lr * self.imaml_lambda < 1,
            f"maml.inner_lr x maml.imaml_lambda = {self.inner_lr * self.imaml_lambda:g}: each proximal inner step "
            "would pull phi back past theta (it must be < 1; well below 1 for the inner loop to adapt, e.g. 0.2); "
            "lower maml.imaml_lambda or maml.inner_lr",
        )
        _require(
            math.isfinite(self.imaml_damping) and self.imaml_damping >= 0,
            f"maml.imaml_damping must be a finite number >= 0, got {self.imaml_damping}",
        )
        _require(
            self.imaml_solver in INNER_SOLVERS,
            f"maml.imaml_solver must be one of {', '.join(INNER_SOLVERS)}, got {self.imaml_solver!r}",
        )
        _require(1 <= self.imaml_cg_steps <= 100, f"maml.imaml_cg_steps must be in [1, 100], got {self.imaml_cg_steps}")
        _require(
            self.first_order_until == 0 or not self.always_first_order(),
            "maml.first_order_until anneals second-order MAML; with first_order or fomaml every step is first order",
        )
        _require(self.first_order_until >= 0, f"maml.first_order_until must be >= 0, got {self.first_order_until}")
        _require(self.msl_anneal_steps >= 1, f"maml.msl_anneal_steps must be >= 1, got {self.msl_anneal_steps}")
        _require(
            not self.anil_head or self.algorithm == "anil",
            f"maml.anil_head is for algorithm anil, not {self.algorithm!r}",
        )
        _require(
            not self.checkpoint_inner or (self.algorithm not in ("reptile", "imaml") and not self.always_first_order()),
            "maml.checkpoint_inner saves memory of second-order inner loops; "
            f"{self.algorithm if self.algorithm in ('reptile', 'imaml') else 'a first-order run'} keeps none: drop it",
        )
        _require(
            not self.checkpoint_recompute or self.checkpoint_inner,
            "maml.checkpoint_recompute is a way of maml.checkpoint_inner: set checkpoint_inner = true too",
        )
        _require(self.head in HEAD_KINDS, f"maml.head must be one of {', '.join(HEAD_KINDS)}, got {self.head!r}")
        _require(
            self.head == "fixed" or self.algorithm != "reptile",
            f"maml.head = {self.head} needs a meta-gradient through the head's start; reptile moves the weights "
            "toward adapted ones, whose head has a row per class and none to move: use maml.head = fixed with reptile",
        )
        _require(
            math.isfinite(self.reptile_step) and 0 < self.reptile_step <= 1,
            f"maml.reptile_step must be in (0, 1], got {self.reptile_step}",
        )

    def learns_inner_lr(self) -> bool:
        """Whether the inner step sizes are meta-parameters (Meta-SGD, MAML++'s LSLR)."""
        return self.algorithm == "meta-sgd" or self.learn_inner_lr != "none"

    def always_first_order(self) -> bool:
        """Whether every meta-gradient is first order (fomaml, or first_order)."""
        return self.first_order or self.algorithm == "fomaml"


@dataclass(frozen=True)
class OptimizerConfig:
    """[optimizer]: the Adam meta-optimizer."""

    lr: float = 1e-3
    """Adam step size (beta in the paper)."""

    def __post_init__(self) -> None:
        _require(math.isfinite(self.lr) and self.lr > 0, f"optimizer.lr must be a finite number > 0, got {self.lr}")


@dataclass(frozen=True)
class TrainingConfig:
    """[training]: length, seed, logging and checkpoints."""

    steps: int = 500
    """Meta-steps to run."""
    seed: int = 0
    """Seeds the initial weights, the task store `train` builds and the task order."""
    log_every: int = 25
    """Print a log line and write metrics.jsonl every this many steps."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps (0 = only at the end)."""
    keep_checkpoints: int = 3
    """Checkpoint folders kept, the newest ones (0 = keep all); older ones are deleted only after
    a newer one is complete, and never the one `latest` names."""
    eval_every: int = 100
    """Every this many steps (and at the last), score the weights on eval_tasks validation tasks
    after the run's inner loop: val_loss and val_acc with their 95% intervals in the log line,
    metrics.jsonl and TensorBoard (0 = never; table- and image-built runs need task.val_store)."""
    eval_tasks: int = 200
    """Validation tasks scored every eval_every steps (the first this many of task.val_store, or
    drawn from the family's validation stream / classes, disjoint from training and test)."""
    keep_best: int = 1
    """Checkpoints kept for their validation score: the keep_best best by select_by, never
    pruned by keep_checkpoints; checkpoints/best names the best (0 = none kept for it)."""
    select_by: SelectBy = "auto"
    """The validation metric keep_best ranks by: "val_acc" (higher is better), "val_loss"
    (lower), or "auto" (val_acc for classification, val_loss for regression)."""
    on_nonfinite: NonfinitePolicy = "stop"
    """What a non-finite loss or meta-gradient does: "stop" (default, weights untouched) or
    "skip" (drop that step, count it in the metrics)."""

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"training.steps must be >= 1, got {self.steps}")
        _require(0 <= self.seed < 2**63, f"training.seed must be in [0, 2**63), got {self.seed}")
        _require(self.log_every >= 1, f"training.log_every must be >= 1, got {self.log_every}")
        _require(
            self.checkpoint_every >= 0,
            f"training.checkpoint_every must be >= 0 (0 = only at the end), got {self.checkpoint_every}",
        )
        _require(
            self.keep_checkpoints >= 0,
            f"training.keep_checkpoints must be >= 0 (0 = keep all), got {self.keep_checkpoints}",
        )
        _require(self.eval_every >= 0, f"training.eval_every must be >= 0 (0 = never), got {self.eval_every}")
        _require(self.eval_tasks >= 2, f"training.eval_tasks must be >= 2 (a 95% interval), got {self.eval_tasks}")
        _require(self.keep_best >= 0, f"training.keep_best must be >= 0 (0 = none), got {self.keep_best}")
        _require(
            self.select_by in SELECT_BY,
            f"training.select_by must be one of {', '.join(SELECT_BY)}, got {self.select_by!r}",
        )
        _require(
            self.on_nonfinite in NONFINITE_POLICIES,
            f"training.on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {self.on_nonfinite!r}",
        )


@dataclass(frozen=True)
class Config:
    """A whole run: one section per component."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    maml: MamlConfig = field(default_factory=MamlConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            section = dataclasses.asdict(getattr(self, f.name))
            out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
        return out

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]
