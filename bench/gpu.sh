#!/usr/bin/env bash
# The GPU measurements of the speed work in one prepared run, under 10 minutes on one H100:
# every method at real size in fp16 (pipeline vs pure compute, MFU, peak memory), DP-IQA and the
# student in bf16 and fp32, the levers (shared context, channels-last, SDPA, torch.compile) in
# fp16, fp16/bf16 scores against fp32, --engine ray against one process, enhance at 512 px.
# Each step has its own time limit, so one slow step cannot eat the others' time.
#
# Usage: bench/gpu.sh [--dry-run]
#   --dry-run  every step on the CPU with the tiny networks (--quick): checks the script and its
#              entry points without a GPU; the numbers mean nothing.
# Output: $OUT (default build/gpu-bench): card.txt, one <step>.txt (key=value lines) and
# <step>.err per step, summary.txt (each step's exit status and seconds).
# Networks: random weights; images: synthetic (scikit-image photos).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-bench}
WORK=${WORK:-/tmp/diqa-gpu-bench}  # written SD-sized networks (about 8 GB), reused between runs
PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=1 DIQA_OFFLINE=1 DIQA_HOME=${DIQA_HOME:-$WORK/home} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT" "$WORK"

if [ "${1:-}" = "--dry-run" ]; then
  # No fp16 kernels on the CPU; inductor's compile of every kernel takes tens of minutes on 2 cores.
  DEV=(--device cpu --quick); HALF=bf16; OTHER=fp32; LEVERS=shared_context,channels_last,no_sdpa
  ENHANCE=(--steps 2 --iterations 2 --device cpu); WORK=$WORK-dry
  SCALE=4; FIRST=(--methods dpiqa,dpiqa-student,genzvqa)  # the limits below are a GPU's
else
  DEV=(--device cuda); HALF=fp16; OTHER=bf16; LEVERS=shared_context,channels_last,no_sdpa,compile
  ENHANCE=(--sd --steps 10 --iterations 3 --device cuda --dtype fp16)
  SCALE=1; FIRST=()
fi

: > "$OUT/summary.txt"
step() {  # step NAME SECONDS SCRIPT ARGS...
  local name=$1 limit=$(($2 * SCALE)) started=$SECONDS rc
  shift 2
  echo "gpu.sh: $name (limit ${limit} s)" >&2
  timeout --signal=INT --kill-after=10 "$limit" "$PYTHON" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.err"
  rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - started))" | tee -a "$OUT/summary.txt" >&2
}

{ date -u +%Y-%m-%dT%H:%M:%SZ; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 \
  || echo "no nvidia-smi"; "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/card.txt"

step real-$HALF 200 bench/bench_real.py "${DEV[@]}" "${FIRST[@]}" --dtype $HALF --work "$WORK" --budget-s 15 --json "$OUT/real-$HALF.jsonl"
step real-$OTHER 110 bench/bench_real.py "${DEV[@]}" --dtype $OTHER --work "$WORK" --budget-s 10 --methods dpiqa,dpiqa-student
if [ "${1:-}" != "--dry-run" ]; then
  step real-fp32 70 bench/bench_real.py "${DEV[@]}" --dtype fp32 --work "$WORK" --budget-s 10 --methods dpiqa
fi
step levers-$HALF 90 bench/bench_levers.py "${DEV[@]}" --dtype $HALF --work "$WORK" --batch-size 8 --repeats 3 \
  --levers $LEVERS
step precision 60 bench/bench_precision.py "${DEV[@]}" --work "$WORK" --methods dpiqa,dpiqa-student --sources 2
step ray 50 bench/bench_ray.py "${DEV[@]}" --dtype $HALF --work "$WORK" --images 64 --batch-size 8
step enhance 45 bench/bench_enhance.py "${ENHANCE[@]}"
echo "gpu.sh: done; results in $OUT" >&2
