#!/usr/bin/env bash
# Warm a jitkern kernel cache for a model preset on a machine without a GPU, ship it as a bundle,
# and serve from it on the GPU machine: the first call there compiles nothing.
#
#   build side (no GPU needed):  examples/warm_cache_for_deployment.sh build nemotron-h-8b sm_90a
#   GPU side:                    examples/warm_cache_for_deployment.sh serve nemotron-h-8b.jkb
#
# Both sides need the same jitkern and NVRTC (the `nvidia-cuda-nvrtc` wheel): the NVRTC version
# and the CUDA headers are part of every cache key, and `cache import` refuses a bundle built with
# another NVRTC. The cache directory is $JITKERN_CACHE_DIR (default ~/.cache/jitkern).
# JITKERN="python -m jitkern.cli" runs the CLI from a checkout without `pip install .`.
# examples/warm_cache_for_deployment.md shows each step with its output.
set -euo pipefail

JITKERN=${JITKERN:-jitkern}
PYTHON=${PYTHON:-python3}
HERE=$(realpath --relative-to=. "$(dirname "$0")")

run() {   # print the command, then run it
  echo "\$ $*"
  "$@"
  echo
}

case "${1:-}" in
  build)
    preset=${2:?usage: $0 build PRESET [ARCH]}
    arch=${3:-sm_90a}
    run $JITKERN info
    run $JITKERN warmup --preset "$preset" --arch "$arch"
    run $JITKERN cache stats
    run $JITKERN cache export "$preset.jkb"
    ;;
  serve)
    bundle=${2:?usage: $0 serve BUNDLE}
    run $JITKERN info
    run $JITKERN cache import "$bundle"
    run $JITKERN cache verify
    # a process whose first calls find every kernel in the cache (it exits 1 if its check fails)
    run $PYTHON "$HERE/tree_spec_decode.py" --no-rerun
    ;;
  *)
    echo "usage: $0 build PRESET [ARCH] | serve BUNDLE" >&2
    exit 2
    ;;
esac
