#!/usr/bin/env bash
# Builds the two wheels of fastprompt into ${1:-dist}:
#   fastprompt-<v>-py3-none-any.whl                       pure: any torch>=2.4; the cuda backend reports itself
#                                                          missing (reference and triton backends only)
#   fastprompt-<v>+cu<cuda>torch<mm>-<python>-<platform>  with fastprompt._C for TORCH_CUDA_ARCH_LIST
#                                                          (default 8.0;9.0+PTX), pinned to torch==<mm>.*
# The second is built against the torch of $PYTHON (its CUDA version names the wheel), so run this in the
# environment the wheel is for. Needs nvcc; MAX_JOBS is capped by memory in setup.py.
# Usage: PYTHON=.venv/bin/python tools/build_wheels.sh [dist]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${1:-dist}
mkdir -p "$OUT"
# build/ is cleared before each wheel: a pure build must not pick up the other's compiled extension
rm -rf build
FASTPROMPT_BUILD_CUDA=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" .
rm -rf build
start=$(date +%s)
FASTPROMPT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}" \
  "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" .
rm -rf build
echo "wheels in $OUT (the CUDA one took $(( $(date +%s) - start )) s):"
ls -1 "$OUT"/fastprompt-*.whl
