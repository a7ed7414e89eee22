"""The public surface: train a run, open it, adapt its meta-model to your own tasks, export it,
serve it. Everything here is importable from `distributed_maml` itself:

    import distributed_maml as dm

    result = dm.train("jobs/sinusoid.toml", overrides=["training.steps=2000"], output_dir="runs/sin")
    run = dm.open_run("runs/sin")                   # config, metrics (a pyarrow table), checkpoints
    meta = run.meta_model("best")                   # the meta-learned initialisation
    adapted = meta.adapt(x_support, y_support)      # the run's own inner loop, on your support set
    adapted.predict(x_query)                        # labels (or values); predict_proba for classes
    dm.export("runs/sin", "exports/sin")            # safetensors + card.json
    meta = dm.load("exports/sin")                   # the same meta-model, without the run

The CLI's `train`, `adapt`, `export` and `serve` call these same functions.
"""

from __future__ import annotations

from distributed_maml.use.export import export, load, load_any
from distributed_maml.use.metamodel import Adapted, MetaModel, Prediction
from distributed_maml.use.runs import CheckpointRef, RunResult, open_run, train
from distributed_maml.use.serving import ServeSettings

__all__ = [
    "Adapted",
    "CheckpointRef",
    "MetaModel",
    "Prediction",
    "RunResult",
    "ServeSettings",
    "export",
    "load",
    "load_any",
    "open_run",
    "train",
]
