#!/usr/bin/env bash
# The prepared GPU check: one call on a lent H100 / H200 (see README, "GPU check").
#
# The GPU machine has python3 with torch, triton, pytest, pytest-benchmark, hypothesis and nvcc, but no
# fastprompt install and no internet: the checkout is used in place (PYTHONPATH), wheels carried in .whl/
# (open_clip and its pure-Python needs, once the methods use it) are installed to /tmp/site first.
#   1. build fastprompt._C in place for sm_90 (the log says how long)
#   2. every GPU test: the cuda-device cases of every op test, all backends, fp32/fp16/bf16, fwd and bwd
#   3. the op timings (benches/gpu_check.py --only ops), each result written as soon as it exists
#   4. the text-tower figures and the packed path's attention variants (--only text attention), own limit
#   5. whole training steps at C = 1000, fastprompt against the public codes' way, bf16 autocast
#      (benches/train_step_figures.py), own limit TRAIN_TIMEOUT
#   6. the tables, printed last
# Everything lands in $OUT (the device tool's folder) or benches/results/local. The whole run stays under
# TOTAL_LIMIT seconds (default 470: under 8 minutes, inside the device tool's 10-minute call): each phase gets
# its own limit or what is left, whichever is smaller, and writes what it has as it goes. PHASES picks the
# phases to run (default: "build tests ops text train"), e.g. PHASES=train for the training steps alone, in a
# call of their own (about 2 minutes with the machine's start).
set -uo pipefail
t0=$(date +%s)
left() {  # seconds a phase may take: its own limit, or what is left of the total
  local rest=$(( ${TOTAL_LIMIT:-470} - ($(date +%s) - t0) ))
  (( rest < 10 )) && rest=10
  (( $1 < rest )) && echo "$1" || echo "$rest"
}
want() { [[ " ${PHASES:-build tests ops text train} " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
OUT=${OUT:-benches/results/local}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if want build; then
  echo "== build fastprompt._C (sm_90)"
  start=$(date +%s)
  if FASTPROMPT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    echo "built in $(( $(date +%s) - start )) s"
  else
    echo "extension build FAILED after $(( $(date +%s) - start )) s: tail of build.log"; tail -20 "$OUT/build.log"
  fi
  python3 -m fastprompt info > "$OUT/info.txt" 2>&1; grep -E "extension|CUDA devices" "$OUT/info.txt"
fi

if want tests; then
  echo "== GPU tests"
  # -v: one line per test as it ends, so a run cut short by its limit still says what passed and what failed
  timeout "$(left "${TEST_TIMEOUT:-200}")" python3 -m pytest -v --tb=short -p no:cacheprovider -k "cuda" tests \
    --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
  echo "pytest exit $? (124: cut at its limit)"; grep -E "(FAILED|ERROR)" "$OUT/tests.log" | head -30
  grep -cE " PASSED" "$OUT/tests.log" | sed 's/^/passed: /'; tail -2 "$OUT/tests.log"
fi

if want ops; then
  echo "== op timings"
  timeout "$(left "${BENCH_TIMEOUT:-170}")" python3 benches/gpu_check.py --out "$OUT" --only ops ${GPU_CHECK_ARGS:-} \
    > "$OUT/bench.log" 2>&1
  echo "gpu_check.py --only ops exit $?"; grep -E "FAILED|unavailable" "$OUT/bench.log" | head -20
fi

# text-tower figures, then the attention variants (FlexAttention's compiles last): each table lands in
# results.md as soon as it is measured, so a run cut short by the limit keeps what it finished
if want text; then
  echo "== text tower and packed attention"
  timeout "$(left "${TEXT_TIMEOUT:-90}")" python3 benches/gpu_check.py --out "$OUT" --only text attention \
    > "$OUT/text.log" 2>&1
  echo "gpu_check.py --only text attention exit $?"; grep -E "failed" "$OUT/text.log" | head -20
fi

# whole training steps at ImageNet scale on both paths, bf16 autocast: the loss check and each row's warm-up,
# FLOPs and peak memory are logged (train.log) as they come; the table (train-step.md) once the rounds end
if want train; then
  echo "== training steps, C = 1000, fastprompt against the public codes' way"
  timeout "$(left "${TRAIN_TIMEOUT:-150}")" python3 benches/train_step_figures.py --device cuda --precision bf16 \
    --classes 1000 --batch 4 --bc-batch 1 --rounds 5 --out "$OUT/train-step.md" > "$OUT/train.log" 2>&1
  echo "train_step_figures.py exit $? (124: cut at its limit; 1: a loss check failed)"
  grep -E "MISMATCH|Error|error" "$OUT/train.log" | head -10
fi
cat "$OUT/results.md" "$OUT/train-step.md" 2>/dev/null
echo "gpu_check.sh finished in $(( $(date +%s) - t0 )) s"
