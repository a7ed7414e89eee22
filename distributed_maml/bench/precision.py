"""`bench --precision`: what scaling.precision costs in accuracy and buys in speed.

For each model, the same meta-gradient (same weights, same tasks, second order) in fp32 (the
reference), tf32 (CUDA only: a CPU has no TF32) and bf16 (autocast), through the project's
ShardComputer: the relative error of the meta-gradient against fp32 (max over entries / max
entry, and the norm of the difference / the norm) and each mode's tasks/s.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from distributed_maml.bench.timing import time_call
from distributed_maml.config import MamlConfig, ModelConfig
from distributed_maml.data.writing import build_in_memory
from distributed_maml.execution.computer import ShardComputer

# (model, family, shots, queries, inner lr, meta-batch on a CPU, on a GPU)
PROBLEMS = (
    ("seed_mlp", "seed", 5, 15, 0.5, 256, 16_384),
    ("sinusoid_mlp", "sinusoid", 10, 10, 0.01, 256, 16_384),
    ("conv4", "glyphs", 1, 15, 0.4, 8, 256),
)


def precision_rows(device: str, min_seconds: float) -> list[dict[str, Any]]:
    modes = ("fp32", "tf32", "bf16") if device.startswith("cuda") else ("fp32", "bf16")
    rows = []
    for model, family, shots, queries, lr, mb_cpu, mb_gpu in tqdm(PROBLEMS, desc="precision", disable=False):
        mb = mb_gpu if device.startswith("cuda") else mb_cpu
        store = build_in_memory(family, mb, seed=0, shots=shots, queries=queries, split="train")
        cfg = MamlConfig(inner_steps=5, inner_lr=lr)
        ids = np.arange(mb)
        ref = None
        for mode in modes:
            c = ShardComputer(store, ModelConfig(name=model), cfg, device=device, task_map="vmap", precision=mode)
            weights = c.spec.flatten(dict(c.model.named_parameters())).detach().cpu().numpy()
            grad = c.compute(weights, ids, before=False).grad_sum
            ref = grad if ref is None else ref
            seconds = time_call(
                lambda c=c, weights=weights, ids=ids: c.compute(weights, ids, before=False), min_seconds, reps=3
            )
            rows.append(
                {
                    "model": model,
                    "meta_batch": mb,
                    "inner_steps": 5,
                    "precision": mode,
                    "max_rel_err": float(np.abs(grad - ref).max() / np.abs(ref).max()),
                    "norm_rel_err": float(np.linalg.norm(grad - ref) / np.linalg.norm(ref)),
                    "tasks_per_s": mb / seconds,
                }
            )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 again
    return rows


def precision_main(min_seconds: float = 1.0, as_json: bool = False) -> dict[str, Any]:
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    result = {
        "benchmark": "meta-gradient error of each scaling.precision against fp32 (5 inner steps, second order)",
        "device": torch.cuda.get_device_name() if device != "cpu" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "rows": precision_rows(device, min_seconds),
    }
    if not as_json:
        print(f"{result['benchmark']}; {result['device']}")
        print("model | meta-batch | precision | max rel err | norm rel err | tasks/s")
        print("----- | ---------- | --------- | ----------- | ------------ | -------")
        for r in result["rows"]:
            print(
                f"{r['model']} | {r['meta_batch']} | {r['precision']} | {r['max_rel_err']:.1e} | "
                f"{r['norm_rel_err']:.1e} | {r['tasks_per_s']:,.0f}"
            )
    print(json.dumps(result))
    return result
