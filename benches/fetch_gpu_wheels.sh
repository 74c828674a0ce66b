#!/usr/bin/env bash
# Run here (a machine with the package registries) before the GPU check: downloads, into .whl/, the wheels the
# GPU machine lacks (open_clip and its pure-Python needs that the GPU image does not hold), for Python 3.12.
# The device tool carries .whl/ when the call names it in `carry`; benches/gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl open_clip_torch ftfy wcwidth
ls -la .whl
