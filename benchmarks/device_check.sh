#!/usr/bin/env bash
# The GPU-machine checks in one run (see README "GPU"): the gpu-marked tests, then the scaling
# benchmark with 1, 2, 4, 8 CPU workers and GPU workers at meta-batch 65,536. Results go to $OUT.
# Usage on the device (after installing Ray's wheels): bash benchmarks/device_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/dmaml-out}"; mkdir -p "$OUT"
MB="${MB:-65536}"; WORKERS="${WORKERS:-1,2,4,8}"; STEPS="${STEPS:-8}"
export PYTHONUNBUFFERED=1
{ nvidia-smi -L; nproc; python3 -c "import torch, ray, pyarrow; print('torch', torch.__version__, 'ray', ray.__version__, 'pyarrow', pyarrow.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/machine.txt"
python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tail -20 | tee "$OUT/gpu_tests.txt"
gpu_args=(); python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && gpu_args=(--gpu-workers 1 --shared-gpu)
python3 benchmarks/scaling.py --meta-batch "$MB" --workers "$WORKERS" "${gpu_args[@]}" --steps "$STEPS" --warmup 2 \
  --overhead-meta-batch 0 --json "$OUT/scaling.json" 2>&1 | grep -v "^20[0-9][0-9]-" | tail -20 | tee "$OUT/scaling.txt"
# conv4 on glyph tasks (issue 8): vmap vs the per-task loop at meta-batch 32 and 1,024, and the
# peak GPU memory per task of a second-order step at 1, 5, 10 inner steps.
CONV4_MB="${CONV4_MB:-32,1024}"
timeout "${CONV4_TIMEOUT:-240}" python3 -m distributed_maml bench --conv4 --meta-batches "$CONV4_MB" --channels 64 \
  --queries 15 --seconds 1 2>&1 | tail -25 | tee "$OUT/conv4.txt"
# The whole CLI path on the GPU: conv4 on glyphs through one Ray GPU worker (store built, images
# resident on the device, vmap), its throughput from metrics.jsonl, then a held-out evaluation.
GLYPH_STEPS="${GLYPH_STEPS:-200}"
timeout "${GLYPH_TIMEOUT:-200}" python3 -m distributed_maml train --config jobs/glyphs-small.toml --no-progress \
  --output-dir /tmp/dmaml-glyphs --set training.steps="$GLYPH_STEPS" --set training.log_every=50 \
  --set scaling.num_workers=1 --set scaling.gpus_per_worker=1 2>&1 | grep -v "^20[0-9][0-9]-" | tail -8 | tee "$OUT/glyphs.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/glyphs.txt"
import json, statistics
rows = [json.loads(x) for x in open("/tmp/dmaml-glyphs/metrics.jsonl")]
print("glyph conv4 tasks/s (logged steps after the first):", statistics.median(r["tasks_per_s"] for r in rows[1:]))
PY
timeout 120 python3 -m distributed_maml eval --run /tmp/dmaml-glyphs --steps 0,1,3 --num-tasks 600 --no-baselines \
  2>&1 | grep -v "^20[0-9][0-9]-" | tail -6 | tee -a "$OUT/glyphs.txt"
# Issue 10: the bench's GPU rows (the project's in-process path on cuda:0, eager vs CUDA-graph
# step; both MLPs, meta-batch 25 / 1,000 / 16,384, 1 and 5 inner steps, both orders), then one
# GPU worker in a collective NCCL group through the CLI.
timeout "${BENCH_TIMEOUT:-240}" python3 -m distributed_maml bench --methods gpu_eager,gpu_graph --seconds 0.5 \
  2>&1 | grep -v "^20[0-9][0-9]-" | tee "$OUT/bench-gpu.txt" | tail -40
timeout 120 python3 -m distributed_maml train --no-progress --output-dir /tmp/dmaml-collective \
  --set training.steps=100 --set task.meta_batch=1024 --set scaling.num_workers=1 --set scaling.gpus_per_worker=1 \
  --set scaling.mode=collective 2>&1 | grep -v "^20[0-9][0-9]-" | tail -5 | tee "$OUT/collective-gpu.txt"
