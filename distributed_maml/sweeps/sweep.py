"""`distributed-maml tune`: a sweep over config values on Ray Tune, each trial a run of this
project.

The sweep file is a config file plus a `[tune]` table naming the values to search:

    [maml]
    inner_steps = 1
    [tune]
    "maml.inner_lr" = { loguniform = [1e-3, 1.0] }
    "task.meta_batch" = { choice = [8, 16] }
    "maml.inner_steps" = { grid = [1, 2] }

Everything is checked before any trial starts (`parse`): an unknown key, a value the key does
not take (each bound of a range, each choice), an empty choice, an unknown kind are one line.
Each trial is a normal run folder, SWEEP_DIR/trials/<trial>, that reports every validation to
Tune (the early-stopping scheduler reads it); `eval`, `plot` and `train --resume` work on it.
The table at the end and SWEEP_DIR/best.toml (the best trial's config.toml) are read from the
trial folders, the runs' own record.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from distributed_maml import config as config_mod
from distributed_maml.config import Config
from distributed_maml.data.families import FROM_FILES
from distributed_maml.errors import ConfigError, UserError
from distributed_maml.training import checkpoint

KINDS = ("loguniform", "uniform", "choice", "grid")


@dataclass(frozen=True)
class Dimension:
    """One searched config key: `loguniform`/`uniform` (values = (low, high)), `choice` (one
    drawn per trial), `grid` (every value, crossed with the other grids)."""

    key: str
    kind: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Sweep:
    """A parsed, checked sweep file: the base config (as TOML dicts) and the searched keys."""

    base: dict[str, Any]
    space: tuple[Dimension, ...]
    source: Path
    tasks: Path | None = None  # a task store every trial trains on (else each builds its own)

    def config(self, values: dict[str, Any]) -> Config:
        """The config of a trial that drew `values` (key -> value)."""
        drawn = [(*d.key.split(".", 1), values[d.key]) for d in self.space]  # keys are section.key (parse)
        return config_mod.from_dict(config_mod.set_values(self.base, drawn))

    @property
    def grid_size(self) -> int:
        return math.prod(len(d.values) for d in self.space if d.kind == "grid")

    def samples(self, trials: int) -> int:
        """Tune's num_samples: `trials` draws of the random keys, each crossed with the grid; a
        space of grids only is run once (the same trial again would give the same run)."""
        return trials if any(d.kind != "grid" for d in self.space) else 1


def parse(path: Path, overrides: list[str], tasks: Path | None = None) -> Sweep:
    """Reads and checks a sweep file (--set overrides apply to its base config). Every problem
    is one ConfigError, before anything runs."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"sweep file {path} cannot be read as TOML: {e}") from None
    table = data.pop("tune", None)
    if not isinstance(table, dict) or not table:
        raise ConfigError(
            f'sweep file {path} has no [tune] table; add one, e.g. [tune] "maml.inner_lr" = {{ loguniform = [1e-3, 1.0] }}'
        )
    base = config_mod.apply_overrides(data, overrides)
    cfg = config_mod.from_dict(base)  # the base alone must be a valid config
    space = tuple(_dimension(key, spec) for key, spec in table.items())
    sweep = Sweep(base, space, Path(path), tasks.resolve() if tasks else None)
    for d in space:  # every bound and every choice must be a value its key takes, and a draw between
        between = (d.values[0] + 0.37 * (d.values[1] - d.values[0]),) if d.kind in ("loguniform", "uniform") else ()
        for value in (*d.values, *between):
            try:
                sweep.config({**{e.key: e.values[0] for e in space}, d.key: value})
            except ConfigError as e:
                hint = "; a range draws floats: use choice or grid for an integer key" if value in between else ""
                raise ConfigError(
                    f"[tune] {d.key} = {{ {d.kind} = {list(d.values)} }}: {value!r} is refused: {e}{hint}"
                ) from None
    _check_validated(cfg, tasks)
    return sweep


def _dimension(key: str, spec: Any) -> Dimension:
    where = f"[tune] {key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where} must be one of {{ {' | '.join(f'{k} = [...]' for k in KINDS)} }}, got {spec!r}")
    ((kind, values),) = spec.items()
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} needs a non-empty list of values, got {values!r}")
    section, dot, name = key.partition(".")
    if not dot or not section or not name:
        raise ConfigError(f'{where}: keys are section.key (e.g. "maml.inner_lr")')
    if kind in ("loguniform", "uniform"):
        numbers = len(values) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if not numbers or not values[0] < values[1] or (kind == "loguniform" and values[0] <= 0):
            low = "0 < low < high" if kind == "loguniform" else "low < high"
            raise ConfigError(f"{where}: {kind} takes [low, high] with {low}, got {values!r}")
    return Dimension(key, kind, tuple(values))


def _check_validated(cfg: Config, tasks: Path | None) -> None:
    """Tune ranks trials by their validation: a sweep whose runs never validate is refused."""
    t = cfg.training
    if t.eval_every < 1:
        raise ConfigError("a sweep ranks trials by validation: set training.eval_every >= 1 in the sweep file")
    if cfg.task.family in FROM_FILES and not cfg.task.val_store:
        raise ConfigError(
            f"task.family = {cfg.task.family} has no validation tasks of its own: set task.val_store "
            "(a tasks build --classes-split val store) in the sweep file"
        )
    if cfg.scaling.num_workers < 0 or cfg.scaling.min_workers:
        raise ConfigError(
            "a sweep reserves each trial's workers before it starts: set scaling.num_workers to a fixed number "
            "(0: the trial trains in-process)"
        )


@dataclass(frozen=True)
class TrialSummary:
    """A trial as its run folder records it."""

    name: str
    values: dict[str, Any]
    metric: str
    best: float | None  # the best validation of `metric`, over every validated step
    steps: int  # the last logged step
    total: int  # training.steps
    status: str  # done, stopped early (ASHA), interrupted (the sweep was stopped), failed, not started


def summarise(run_dir: Path, values: dict[str, Any], failed: bool, early: bool) -> TrialSummary:
    """A trial's row, from its run folder: config.toml (the values it ran with), metrics.jsonl;
    `early`: ASHA stopped it. A trial neither done, failed nor stopped early was interrupted."""
    name = run_dir.name
    if not (run_dir / "config.toml").exists():
        return TrialSummary(name, values, "", None, 0, 0, "failed" if failed else "not started")
    cfg = config_mod.load(run_dir / "config.toml")
    flat = cfg.to_dict()
    values = {k: flat[k.split(".")[0]][k.split(".")[1]] for k in values}
    lines = []
    if (run_dir / "metrics.jsonl").exists():
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    best = checkpoint.read_best(run_dir)
    metric = best[0].metric if best else ("val_acc" if any("val_acc" in r for r in lines) else "val_loss")
    scores = [r[metric] for r in lines if metric in r and math.isfinite(r[metric])]
    pick = max if metric == "val_acc" else min
    step = lines[-1]["step"] if lines else 0
    total = cfg.training.steps
    status = "failed" if failed else "done" if step >= total else "stopped early" if early else "interrupted"
    return TrialSummary(name, values, metric, pick(scores) if scores else None, step, total, status)


def ranked(trials: list[TrialSummary]) -> list[TrialSummary]:
    """Best first (accuracy up, loss down); trials without a validation last."""

    def key(t: TrialSummary) -> tuple[int, float]:
        if t.best is None:
            return (1, 0.0)
        return (0, -t.best if t.metric == "val_acc" else t.best)

    return sorted(trials, key=key)


def table(trials: list[TrialSummary], space: tuple[Dimension, ...]) -> str:
    keys = [d.key for d in space]
    head = ["trial", *keys, "best validation", "steps", "status"]
    rows = [
        [
            t.name,
            *(_short(t.values.get(k)) for k in keys),
            "-" if t.best is None else f"{t.metric} {t.best:.4f}",
            f"{t.steps}/{t.total}",
            t.status,
        ]
        for t in ranked(trials)
    ]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join(
        " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]
    )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_best(sweep_dir: Path, best: TrialSummary) -> Path:
    """SWEEP_DIR/best.toml: the best trial's config, ready for a long run (`train --config`)."""
    text = (sweep_dir / "trials" / best.name / "config.toml").read_text()
    header = (
        f"# the best trial of the sweep {sweep_dir}: {best.name}, {best.metric} {best.best:.6g} "
        f"after {best.steps} steps\n# {', '.join(f'{k} = {v!r}' for k, v in best.values.items())}\n"
    )
    path = sweep_dir / "best.toml"
    path.write_text(header + text)
    return path


def no_trial_validated(sweep_dir: Path) -> UserError:
    return UserError(f"no trial of {sweep_dir} logged a validation; see the trial folders under {sweep_dir / 'trials'}")
