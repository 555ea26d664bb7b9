#!/usr/bin/env bash
# The GPU checks in one script, for a CUDA machine without network (tested with Python 3.12, torch 2.11):
#   bash benchmarks/gpu_checks.sh     (from the repository root)
# .whl/ holds the wheels such a machine lacks (torch-pruning, captum, plotly), installed into /tmp/site.
# Each step has its own time limit so one slow step cannot starve the rest; everything lands in
# $OUT/gpu-results.tgz (JSON + markdown per benchmark) and $OUT/gpu-checks.log.
set -u
OUT=${OUT:-/tmp/out}
RES=/tmp/gpu-results
mkdir -p "$OUT" "$RES"
LOG="$OUT/gpu-checks.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
DEADLINE=${DEADLINE:-520}  # seconds for the whole script; a step never runs past it
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then echo "=== $name: skipped, ${left}s left"; return; fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@"; local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"
}
W="python3 -m workbench.cli"
# order: what has not been measured on a GPU yet first (compiled vmap vs loop; pruned latency without
# Python's launch overhead, icnet), then fit(compile=True)'s step time
step gpu-tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_nn_iebn.py tests/test_device.py tests/test_attention_recorders.py \
  tests/test_train.py tests/test_pruning_cost.py
step probes 200 $W bench probes --device cuda --output "$RES/probes"
step pruning-graph 150 $W bench pruning --device cuda --models icnet segnet pspnet_resnet50 --size 256 512 \
  --ratios 0.5 0.7 --modes eager fold-bn cuda-graph --runs 20 --output "$RES/pruning-graph"
step training-compile 150 $W bench training --device cuda --model resnet56 --steps 20 --compile \
  --output "$RES/training-compile"
step pruning-compile 120 $W bench pruning --device cuda --models pspnet_resnet50 segnet --size 256 512 \
  --ratios 0.3 0.5 --modes fold-bn compile --runs 20 --output "$RES/pruning-compile"
step layers-compile 90 $W bench layers --device cuda --modes compile --output "$RES/layers-compile"
tar czf "$OUT/gpu-results.tgz" -C "$RES" .
echo "gpu checks done in ${SECONDS}s"
