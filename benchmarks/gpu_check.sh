#!/usr/bin/env bash
# The prepared GPU check (at most 8 minutes on one H200, no network): our ViT-B/16 bf16 train
# step against open_clip_train's with AMP bf16, remat off and on, each at a batch that fills
# the card; MFU, the speed ratio and both loss trajectories land in one folder.
#
#   bash benchmarks/gpu_check.sh               # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu-quick   # the same path on a CPU: ViT-Tiny-8, batch 8, 1 round
#
# Output folder: $OUT when set (the device tool brings it back), else runs/gpu_check.
#   gpu_check.log            everything printed
#   nvidia-smi.txt           the card, driver and memory (GPU only)
#   train_step_remat_*.json  benchmarks/train_step.py's full record per remat setting
#   summary.json, summary.md MFU, ratio to open_clip, losses of both, against the targets
#
# Packages the image lacks come from wheels carried beside the tree (benchmarks/gpu_wheels.sh
# fetches them into build/gpu_wheels). Batches: GPU_CHECK_BATCH_NONE / GPU_CHECK_BATCH_FULL.
# A run that runs out of memory is retried once at half the batch; one whose attention kernel
# (cuDNN, from attention=auto) fails is retried once with attention=xla.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [[ "${1:-}" == "--cpu-quick" ]]; then
  MODE=cpu
elif [[ $# -gt 0 ]]; then
  echo "usage: bash benchmarks/gpu_check.sh [--cpu-quick]" >&2
  exit 2
fi
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-runs/gpu_check}"
WHEELS="${GPU_CHECK_WHEELS:-build/gpu_wheels}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"  # stop starting runs past this: the check must end within 8 minutes
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/train_step_remat_*.json "$OUT_DIR"/summary.json "$OUT_DIR"/summary.md
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }

# Packages: from the wheels when the image lacks them; bioclip_jax from this tree.
if ! "$PYTHON" -c "import ml_collections, open_clip, grain" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    say "ml_collections, open_clip or grain is missing and $WHEELS holds no wheels: run benchmarks/gpu_wheels.sh on a machine with an index and carry $WHEELS"
    exit 2
  fi
  SITE="${TMPDIR:-/tmp}/gpu_check_site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl 2>&1 | tee -a "$LOG"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  "$PYTHON" -c "import ml_collections, open_clip" 2>&1 | tee -a "$LOG" || { say "the benchmark's packages do not import"; exit 2; }
  "$PYTHON" -c "import grain, tensorflow_datasets" >>"$LOG" 2>&1 || say "note: grain or tensorflow_datasets does not import (not needed by this check)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ $MODE == gpu ]]; then
  nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || true
  COMMON=(--device gpu --model ViT-B-16 --dtype bfloat16 --repeats 10 --warmup 2)
  declare -A BATCH=([none]="${GPU_CHECK_BATCH_NONE:-384}" [full]="${GPU_CHECK_BATCH_FULL:-2048}")
  RUN_LIMIT_S=240
else
  COMMON=(--device cpu --quick --repeats 1 --warmup 1 --threads 1)
  declare -A BATCH=([none]=8 [full]=8)
  RUN_LIMIT_S=120
fi

# One train_step.py run; 0 when it wrote its record. Its output goes to the log and to $RUN_OUTPUT.
RUN_OUTPUT="${TMPDIR:-/tmp}/gpu_check_run.$$"
run_step() {  # remat batch attention
  local left=$(( BUDGET_S - SECONDS ))
  if (( left < 60 )); then
    say "skipped remat=$1 batch=$2 attention=$3: ${left} s left of the ${BUDGET_S} s budget"
    return 3
  fi
  local limit=$(( left < RUN_LIMIT_S ? left : RUN_LIMIT_S ))
  say "=== remat=$1 batch=$2 attention=$3 (limit ${limit} s, ${SECONDS} s so far)"
  PYTHONUNBUFFERED=1 timeout "$limit" "$PYTHON" benchmarks/train_step.py "${COMMON[@]}" --batch "$2" --remat "$1" \
    --attention "$3" --out "$OUT_DIR/train_step_remat_$1.json" 2>&1 | tee "$RUN_OUTPUT" | tee -a "$LOG" >/dev/null
  local status=${PIPESTATUS[0]}
  tail -n 25 "$RUN_OUTPUT"
  return "$status"
}

for remat in none full; do
  batch=${BATCH[$remat]}
  run_step "$remat" "$batch" auto && continue
  if grep -qiE "RESOURCE_EXHAUSTED|OutOfMemoryError|out of memory" "$RUN_OUTPUT"; then
    run_step "$remat" $(( batch / 2 )) auto
  elif grep -qiE "cudnn|dot_product_attention" "$RUN_OUTPUT"; then
    run_step "$remat" "$batch" xla
  fi
done
rm -f "$RUN_OUTPUT"

"$PYTHON" benchmarks/gpu_check_summary.py "$OUT_DIR" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
say "gpu_check: ${SECONDS} s in all"
exit "$status"
