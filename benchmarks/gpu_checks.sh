#!/usr/bin/env bash
# Every GPU check of the workbench in one run on a CUDA machine, under ten minutes:
#   DEADLINE=500 bash benchmarks/gpu_checks.sh
# For a machine without network access (tested on an H100 with Python 3.12, torch 2.11, Triton
# 3.6), put the wheels it lacks (torch-pruning, captum, plotly; Python 3.12 manylinux x86_64) in
# .whl/, which the script installs first; give the whole run a 600 s timeout.
#
# Results land in benchmarks/gpu-<date>-<card>/ (one folder per step: JSON + markdown, plus the log
# of the run, gpu-checks.log) and, when $OUT is set, are packed as $OUT/gpu-results.tgz; unpack it
# into a checkout with `tar xzf gpu-results.tgz -C benchmarks`. Each step has its own time limit and
# none runs past DEADLINE seconds from the start, so one slow step cannot starve the rest; the most
# important run first (the fused IEBN kernels' speed and correctness, then the training step,
# compiled layers, pruning with CUDA graphs, probes).
set -u
DEADLINE=${DEADLINE:-500}
cd "$(dirname "$0")/.."
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr '[:upper:]' '[:lower:]' \
  | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')
NAME="gpu-$(date -u +%Y-%m-%d)-${CARD:-unknown-card}"
RES="$PWD/benchmarks/$NAME"
mkdir -p "$RES"
exec > >(tee "$RES/gpu-checks.log") 2>&1
export PYTHONUNBUFFERED=1
WHEELS=$(ls .whl/*.whl 2>/dev/null)
if [ -n "$WHEELS" ]; then
  # shellcheck disable=SC2086  # one argument per wheel
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
echo "results: benchmarks/$NAME, $(date -u '+%Y-%m-%d %H:%M UTC')"

step() {  # step NAME SECONDS CMD...: at most SECONDS, never past DEADLINE
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then echo "=== $name: skipped, ${left}s left"; return; fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@"; local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"
}
W="python3 -m workbench.cli"
step layers-eager 50 $W bench layers --device cuda --modes eager --sections norm --output "$RES/layers-eager"
step gpu-tests 110 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_nn_fused_cuda.py tests/test_nn_iebn.py \
  tests/test_device.py tests/test_attention_recorders.py tests/test_train.py tests/test_pruning_cost.py \
  tests/test_acceleration.py
step training 70 $W bench training --device cuda --model resnet164 --steps 15 --variants bn/none,iebn/none \
  --output "$RES/training"
step layers-compile 75 $W bench layers --device cuda --modes compile --shapes stages --sections norm \
  --output "$RES/layers-compile"
step pruning 110 $W bench pruning --device cuda --models segnet pspnet_resnet50 icnet --size 256 512 --batch-size 8 \
  --ratios 0.5 0.7 --modes eager fold-bn cuda-graph --runs 20 --output "$RES/pruning"
step probes 150 $W bench probes --device cuda --output "$RES/probes"
echo "all steps done in ${SECONDS}s"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  tar czf "$OUT/gpu-results.tgz" -C benchmarks "$NAME"
fi
