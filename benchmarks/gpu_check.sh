#!/usr/bin/env bash
# One pass over everything that needs a GPU, for a GPU machine with a copy of the checkout:
# the GPU tests (the multi-GPU one runs where there are two GPUs), the JIT service benchmark, and
# the deployment example end to end (warm a preset with the GPU hidden, export, import, verify, a
# first process with zero compiles). Logs go to $OUT (default: ./gpu-check-logs).
#   benchmarks/gpu_check.sh [--bench]     --bench also runs the two kernel benchmarks (minutes)
set -uo pipefail
out=${OUT:-gpu-check-logs}
mkdir -p "$out"
export JITKERN="${JITKERN:-python3 -m jitkern.cli}"
work=$(mktemp -d)
status=0

nvidia-smi -L
python3 -m pip show nvidia-cuda-nvrtc nvidia-cuda-runtime cupy-cuda13x torch 2>/dev/null | grep -E "^(Name|Version)" | paste - -

echo "== GPU tests"
JITKERN_CACHE_DIR=$work/tests python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > "$out/gpu_tests.log" 2>&1 || status=1
tail -n 8 "$out/gpu_tests.log"

echo "== JIT service benchmark"
JITKERN_CACHE_DIR=$work/bench python3 benchmarks/jit_overhead.py > "$out/jit_overhead.log" 2>&1 || status=1
tail -n 24 "$out/jit_overhead.log"

echo "== deployment example"
(cd "$work" && CUDA_VISIBLE_DEVICES= JITKERN_CACHE_DIR=$work/build \
   bash "$OLDPWD/examples/warm_cache_for_deployment.sh" build nemotron-h-8b sm_90a) > "$out/warm_build.log" 2>&1 || status=1
(cd "$work" && JITKERN_CACHE_DIR=$work/serve \
   bash "$OLDPWD/examples/warm_cache_for_deployment.sh" serve nemotron-h-8b.jkb) > "$out/warm_serve.log" 2>&1 || status=1
tail -n 12 "$out/warm_build.log"; tail -n 40 "$out/warm_serve.log"

if [ "${1:-}" = "--bench" ]; then
  echo "== kernel benchmarks"
  python3 benchmarks/mamba2_mtp.py > "$out/mamba2_mtp.log" 2>&1 || status=1
  python3 benchmarks/spec_dec_attention.py > "$out/spec_dec_attention.log" 2>&1 || status=1
fi
echo "gpu_check status: $status"
exit $status
