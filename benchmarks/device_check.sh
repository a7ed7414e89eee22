#!/usr/bin/env bash
# Every GPU figure in one call (issue 29 item 6): the in-process part needs no Ray (PyTorch,
# pyarrow, numpy and tqdm only), the Ray part runs only where Ray imports. Budget: <= 8 minutes on
# an H200; each step has its own timeout, so a slow one cannot eat the rest. Everything lands in
# $OUT; $OUT/device_check.json holds every figure (one key per step, each the step's JSON line).
#
# Usage on the device, Ray-free:   bash benchmarks/device_check.sh
# With Ray (after ../shared/device/prepare-ray-wheels.sh here and its install line there):
#                                  RAY_PART=1 bash benchmarks/device_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/dmaml-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
PY="${PYTHON:-python3}"
step() {  # step NAME TIMEOUT_S ARGS...: runs `python -m distributed_maml ARGS`, keeps its output and last JSON line
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (<= ${limit}s)" | tee -a "$OUT/log.txt"
  timeout "$limit" "$PY" -m distributed_maml "$@" > "$OUT/$name.txt" 2> "$OUT/$name.err"
  echo "   exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/log.txt"
  grep -v '^{' "$OUT/$name.txt" | tail -40
}
{ nvidia-smi -L; nproc; "$PY" -c "import torch, pyarrow; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'pyarrow', pyarrow.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
# The gpu-marked tests that need no Ray: graph step = eager step, the learner on the device = the
# host learner, conv4 and ResNet-12 graphs, the fused step's stop/skip (the CPU tests run here too).
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m "gpu and not ray" tests/test_gpu.py tests/test_devicesteps.py \
  2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
# Item 3: bare_graph / gpu_eager / gpu_graph, both MLPs, meta-batch 25, 1,000, 16,384, 1 and 5 inner steps, both orders.
step bench_gpu "${BENCH_TIMEOUT:-170}" bench --methods bare_graph,gpu_eager,gpu_graph --seconds "${BENCH_SECONDS:-0.35}" --json
# Item 4: conv4 at speed (default grid), precision errors, ResNet-12's checkpointed memory at width 64.
step conv4 "${CONV4_TIMEOUT:-120}" bench --conv4 --channels 64 --queries 15 --meta-batches 4,32,256 --seconds 0.5
step precision 60 bench --precision --seconds 0.3 --json
step resnet12_memory 60 bench --memory --backbone resnet12 --channels 64 --modes second,checkpointed,recompute --inner-steps 1,5,10 --meta-batch 2
# Item 5: the paper's mini-ImageNet setting, projected to 60,000 meta-steps.
step paper 60 bench --paper --steps 50 --json
if [ -n "${RAY_PART:-}" ] && "$PY" -c "import ray" 2>/dev/null; then
  # One GPU worker through the CLI, driver and collective (NCCL) modes.
  timeout 120 "$PY" -m distributed_maml train --no-progress --output-dir /tmp/dmaml-collective \
    --set training.steps=100 --set task.meta_batch=1024 --set scaling.num_workers=1 --set scaling.gpus_per_worker=1 \
    --set scaling.mode=collective 2>&1 | grep -v "^20[0-9][0-9]-" | tail -5 | tee "$OUT/collective-gpu.txt"
fi
"$PY" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
figures = {}
for f in sorted(out.glob("*.txt")):
    lines = [l for l in f.read_text().splitlines() if l.startswith("{")]
    if lines:
        try:
            figures[f.stem] = json.loads(lines[-1])
        except ValueError:
            figures[f.stem] = {"error": "unparsable JSON line"}
(out / "device_check.json").write_text(json.dumps(figures, indent=1))
print("figures:", ", ".join(figures) or "none")
PY
