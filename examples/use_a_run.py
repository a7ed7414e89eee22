"""Train, open the run, adapt to a new task, predict, export and load again: the public API end
to end (about 10 s on 2 cores).

    python examples/use_a_run.py [OUT_DIR]

The new task here is a held-out task of the run's own family; with your own data, x_support is
your examples (images as uint8 [N, C, H, W], table rows as they are) and y_support any labels.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

import distributed_maml as dm
from distributed_maml.data import TaskStore, build

out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())

# 1. Meta-train (the seed problem, in-process) and open the run
run = dm.train(None, ["training.steps=200", "scaling.num_workers=0"], output_dir=out / "run", progress=False)
print(run, "| validated:", run.metrics.column("val_acc").drop_null().to_pylist())

# 2. A task the run never saw: 5 support examples per class, 15 queries per class
build(out / "new.arrow", "seed", 1, seed=123, split="test", progress=False)
task = TaskStore.open(out / "new.arrow").rows(np.arange(1))
x_support, x_query, y_query = task["x_support"][0], task["x_query"][0], task["y_query"][0]
y_support = np.where(task["y_support"][0] == 1, "yes", "no")  # labels of your own

# 3. Adapt the meta-learned initialisation with the run's own inner loop, and predict
meta = run.meta_model("best")
adapted = meta.adapt(x_support, y_support)
predicted = adapted.predict(x_query)
accuracy = float(np.mean(predicted == np.where(y_query == 1, "yes", "no")))
print(f"{meta.describe()}: accuracy {accuracy:.3f} on the new task's {len(x_query)} queries")

# 4. Export (safetensors + card.json), load without the run: the same predictions, bit for bit
dm.export(run.path, out / "export")
again = dm.load(out / "export").adapt(x_support, y_support)
assert np.array_equal(again.predict_proba(x_query), adapted.predict_proba(x_query))
print(f"exported to {out / 'export'}; the export adapts and predicts the same, bit for bit")
