"""What a sweep ranks and what Tune is told, without starting Ray (issue 30's first two bugs:
a sweep ranked by accuracy the wrong way round; Tune told the wrong sign, so that ASHA stops
the best trials). The sweep tests in test_tune.py run Tune itself on sinusoids (val_loss);
these pin the rules for both metrics."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from distributed_maml import config
from distributed_maml.execution import tuning
from distributed_maml.sweeps import sweep
from distributed_maml.sweeps.sweep import TrialSummary, ranked, summarise

ACCS = {"t_worst": 0.55, "t_best": 0.91, "t_mid": 0.74, "t_low": 0.62}
LOSSES = {"t_worst": 0.95, "t_best": 0.12, "t_mid": 0.40, "t_low": 0.70}


@pytest.mark.parametrize("metric, scores", [("val_acc", ACCS), ("val_loss", LOSSES)])
def test_ranked_puts_the_best_trial_first(metric, scores):
    trials = [TrialSummary(n, {}, metric, v, 10, 10, "done") for n, v in scores.items()]
    trials.append(TrialSummary("t_none", {}, metric, None, 0, 10, "failed"))
    order = [t.name for t in ranked(trials)]
    pick = max if metric == "val_acc" else min
    assert order[0] == pick(scores, key=scores.get) == "t_best"
    assert order[1:4] == ["t_mid", "t_low", "t_worst"]
    assert order[-1] == "t_none"  # no validation: last


def test_a_trials_best_is_its_best_validation(tmp_path):
    """summarise reads a classification trial's metrics.jsonl: its best is the highest val_acc
    it reached (not the last, not the lowest)."""
    run = tmp_path / "trial"
    run.mkdir()
    (run / "config.toml").write_text(config.dumps(config.load(None, ["training.steps=30", "training.eval_every=10"])))
    lines = [{"step": s, "val_acc": a, "val_loss": 1 - a} for s, a in ((10, 0.6), (20, 0.8), (30, 0.7))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    t = summarise(run, {}, failed=False, early=False)
    assert (t.metric, t.best, t.status) == ("val_acc", 0.8, "done")


class _Tuner:
    """Stands in for ray.tune.Tuner: keeps the TuneConfig the sweep builds, runs nothing."""

    seen: dict[str, Any] = {}

    def __init__(self, trainable: Any, param_space: Any, tune_config: Any, run_config: Any) -> None:
        _Tuner.seen["tune_config"] = tune_config

    def fit(self) -> list:
        return []


def told(monkeypatch, metric: str, value: float) -> dict[str, Any]:
    """What a trial's report hands to Tune for a validated step with `metric` = value."""
    import ray.tune

    got: dict[str, Any] = {}
    monkeypatch.setattr(ray.tune, "report", lambda metrics: got.update(metrics))
    tuning.report(10, {metric: value, "step": 10}, metric)
    return got


def test_tune_is_told_higher_is_better(monkeypatch):
    assert told(monkeypatch, "val_acc", 0.8)[tuning.OBJECTIVE] == 0.8
    assert told(monkeypatch, "val_loss", 0.3)[tuning.OBJECTIVE] == -0.3


@pytest.mark.parametrize("metric, scores", [("val_acc", ACCS), ("val_loss", LOSSES)])
def test_asha_stops_the_worst_trials(tmp_path, monkeypatch, metric, scores):
    """The sweep's own TuneConfig (metric, mode) and scheduler, fed what the trials report at
    their first validation, best first: ASHA stops the worst, never the best."""
    import ray.tune

    monkeypatch.setattr(tuning, "connect", lambda: None)
    monkeypatch.setattr(ray.tune, "Tuner", _Tuner)
    dims = [sweep.Dimension("optimizer.lr", "choice", (0.1, 0.01))]
    tuning.run(lambda c: None, lambda v: ([{"CPU": 1.0}], "pack"), dims, tmp_path, 4, 4, True, max_reports=3)
    tc = _Tuner.seen["tune_config"]
    assert tc.scheduler is not None and tc.mode in ("max", "min")
    asha = tc.scheduler  # the one the sweep built, given the metric and mode as Tune gives them
    assert asha.set_search_properties(tc.metric, tc.mode)
    decisions = {}
    for name in sorted(scores, key=scores.get, reverse=metric == "val_acc"):  # best first
        trial = SimpleNamespace(trial_id=name)
        asha.on_trial_add(None, trial)
        result = {**told(monkeypatch, metric, scores[name]), "training_iteration": 1}
        decisions[name] = asha.on_trial_result(None, trial, result)
    assert decisions["t_best"] == "CONTINUE"
    assert decisions["t_worst"] == "STOP", decisions
