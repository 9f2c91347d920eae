#!/usr/bin/env bash
# The prepared GPU check, no network: our train step against open_clip's, each framework in its own
# process at its own largest batch; ViT-L/14's MFU; the loader's scaling with workers; the whole
# training loop fed by the real loader against the bare step; XLA flags A/B; on request, predict over
# an archive against the bare image tower. summary.md sets every figure against its target.
#
#   bash benchmarks/gpu_check.sh                          # every part but archive (about 12 minutes on one H200)
#   bash benchmarks/gpu_check.sh --parts steps,reference,large   # at most 9 minutes ...
#   bash benchmarks/gpu_check.sh --parts loader,loop,flags       # ... and the rest in a second command
#   bash benchmarks/gpu_check.sh --parts archive          # predict's GPU figure (issue 21), at most 7 minutes
#   bash benchmarks/gpu_check.sh --cpu-quick              # the same path on a CPU: ViT-Tiny-8, small batches
#
# Parts: steps (ViT-B/16 ours: {cudnn, xla} x {none, minimal, full}), reference (open_clip with and
# without grad checkpointing), large (ViT-L/14 ours), loader (1, 4, 15 workers), loop (loop vs bare
# step, 15 workers), flags (the best ViT-B/16 setting, or GPU_CHECK_BEST=ATTENTION:REMAT:BATCH, under
# other XLA flags), archive (only when named: `predict` over 4,000 224-px JPEGs with ViT-L/14 against
# its bare image tower, with 1 and 15 decoder threads; benchmarks/predict.py). One part failing or running out of time never costs the others: each runs under
# its own time limit, and the summary reads whatever records exist.
#
# Output folder: the environment variable OUT when set, else runs/gpu_check. Four files:
# gpu_check.log (everything printed), environment.txt (versions, nvidia-smi), summary.md and
# summary.json (every record in full).
#
# Packages the GPU machine's Python lacks are installed, without a package index, from wheels
# copied there with the checkout (benchmarks/gpu_wheels.sh fetches them into build/gpu_wheels). GPU_CHECK_OURS and GPU_CHECK_REFERENCE replace the settings
# of the steps and reference parts (benchmarks/gpu_step.py's syntax).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
PARTS="steps,reference,large,loader,loop,flags"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-quick) MODE=cpu; shift ;;
    --parts) PARTS="$2"; shift 2 ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--cpu-quick] [--parts steps,reference,large,loader,loop,flags,archive]" >&2
       exit 2 ;;
  esac
done
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-runs/gpu_check}"
RECORDS="${TMPDIR:-/tmp}/gpu_check_records"
WHEELS="${GPU_CHECK_WHEELS:-build/gpu_wheels}"
WORK="${TMPDIR:-/tmp}/gpu_check_work"
rm -rf "$RECORDS"
mkdir -p "$OUT_DIR" "$RECORDS" "$WORK"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }
wants() { [[ ",$PARTS," == *",$1,"* ]]; }

# Packages: from the wheels when the image lacks them; bioclip_jax from this tree.
if ! "$PYTHON" -c "import ml_collections, open_clip, grain" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    say "ml_collections, open_clip or grain is missing and $WHEELS holds no wheels: run benchmarks/gpu_wheels.sh on a machine with an index and copy $WHEELS here with the checkout"
    exit 2
  fi
  SITE="${TMPDIR:-/tmp}/gpu_check_site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl >>"$LOG" 2>&1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  "$PYTHON" -c "import ml_collections, open_clip, grain" >>"$LOG" 2>&1 || { say "the benchmark's packages do not import"; exit 2; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  "$PYTHON" - <<'EOF'
import importlib.metadata as m, platform
print("python", platform.python_version())
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "grain",
             "torch", "open_clip_torch", "nvidia-cudnn-cu13", "nvidia-cudnn-cu12"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        pass
EOF
  lscpu 2>/dev/null | grep -E "^Model name|^CPU\(s\)" || true
  nvidia-smi 2>&1 || true
} >"$OUT_DIR/environment.txt" 2>&1

if [[ $MODE == gpu ]]; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"  # alone on the card
  B16=ViT-B-16; L14=ViT-L-14
  STEPS=(--warmup 2 --steps 5)
  OURS_SETTINGS="${GPU_CHECK_OURS:-cudnn:none,cudnn:minimal,xla:none,cudnn:full,xla:minimal,xla:full}"
  REFERENCE_SETTINGS="${GPU_CHECK_REFERENCE:-plain:512,checkpointing:1024}"
  LARGE_SETTINGS="auto:none,auto:minimal"
  LIMIT=(steps 200 reference 70 large 100 loader 70 loop 90 flags 160 archive 420)
  SWEEP=(--scaling 1,4,15 --batch 256 --batches 48 --point-limit-s 25)
  LOOP=(--model ViT-B-16 --image-size 224 --batch 512 --window 5 --windows 3 --rounds 1
        --set dtype=bfloat16 --set data.workers=15)
  MAX_BATCH=2048
  ARCHIVE=(--archive 4000 --archive-size 224x224 --arch ViT-L-14 --batch 128 --workers 1,15)
else
  B16=ViT-Tiny-8; L14=ViT-Tiny-8
  STEPS=(--warmup 1 --steps 1)
  OURS_SETTINGS="xla:none:8,xla:minimal:8,head_major:full:8"
  REFERENCE_SETTINGS="plain:8,checkpointing:8"
  LARGE_SETTINGS="auto:none:8"
  LIMIT=(steps 600 reference 300 large 300 loader 300 loop 600 flags 600 archive 300)
  SWEEP=(--scaling 1,2 --quick)
  LOOP=(--model ViT-Tiny-8 --batch 16 --window 2 --windows 1 --rounds 1)
  MAX_BATCH=8
  ARCHIVE=(--quick --archive --archive-size 224x224 --workers 1,2)
fi
declare -A LIMIT_OF
for (( i = 0; i < ${#LIMIT[@]}; i += 2 )); do LIMIT_OF[${LIMIT[i]}]=${LIMIT[i + 1]}; done

part() {  # name command...: runs the command under the part's time limit, output to the log
  local name=$1; shift
  say "=== $name (limit ${LIMIT_OF[$name]} s, ${SECONDS} s so far)"
  PYTHONUNBUFFERED=1 timeout "${LIMIT_OF[$name]}" "$@" >>"$LOG" 2>&1
  local status=$?
  say "=== $name: exit $status after ${SECONDS} s"
  return 0
}

wants steps && part steps "$PYTHON" benchmarks/gpu_step.py ours --model "$B16" --settings "$OURS_SETTINGS" \
  --weights "$WORK/weights_$B16" --max-batch "$MAX_BATCH" --budget-s $(( ${LIMIT_OF[steps]} - 70 )) "${STEPS[@]}" \
  --out "$RECORDS/steps.json"
if wants reference; then
  [[ -d "$WORK/weights_$B16" ]] || JAX_PLATFORMS=cpu "$PYTHON" -c "import bioclip_jax, sys; bioclip_jax.export_open_clip(bioclip_jax.create_model(sys.argv[1], None, seed=0), sys.argv[2])" "$B16" "$WORK/weights_$B16" >>"$LOG" 2>&1
  part reference "$PYTHON" benchmarks/gpu_step.py open_clip --model "$B16" --settings "$REFERENCE_SETTINGS" \
    --weights "$WORK/weights_$B16" --budget-s $(( ${LIMIT_OF[reference]} - 40 )) "${STEPS[@]}" --out "$RECORDS/reference.json"
fi
wants large && part large "$PYTHON" benchmarks/gpu_step.py ours --model "$L14" --settings "$LARGE_SETTINGS" \
  --max-batch "$MAX_BATCH" --budget-s $(( ${LIMIT_OF[large]} - 90 )) "${STEPS[@]}" --out "$RECORDS/large.json"
wants loader && part loader "$PYTHON" benchmarks/data.py "${SWEEP[@]}" --out "$RECORDS/loader.json"
wants loop && part loop "$PYTHON" benchmarks/loop_figure.py "${LOOP[@]}" --out "$RECORDS/loop.json"
wants archive && part archive "$PYTHON" benchmarks/predict.py "${ARCHIVE[@]}" --without-pybioclip --repeats 1 \
  --out "$RECORDS/archive.json"
if wants flags; then
  best=${GPU_CHECK_BEST:-$("$PYTHON" benchmarks/gpu_check_summary.py --best-setting "$RECORDS" 2>>"$LOG")}
  if [[ -n "$best" ]]; then
    # The same setting in a fresh process: as it is (the baseline of this call), unrolled, and under each flag.
    LIMIT_OF[flags_baseline]=$(( ${LIMIT_OF[flags]} / 4 ))
    part flags_baseline "$PYTHON" benchmarks/gpu_step.py ours --model "$B16" --settings "$best,${best%@*}@unrolled" \
      --budget-s 30 "${STEPS[@]}" --out "$RECORDS/flags_baseline.json"
    for flags in "--xla_gpu_enable_triton_gemm=false" "--xla_gpu_enable_command_buffer="; do
      name=$(echo "$flags" | tr -cd 'a-z_' | sed 's/^xla_gpu_//')
      LIMIT_OF[flags_$name]=$(( ${LIMIT_OF[flags]} / 4 ))
      XLA_FLAGS="$flags" part "flags_$name" "$PYTHON" benchmarks/gpu_step.py ours --model "$B16" --settings "${best%@*}" \
        --budget-s 10 "${STEPS[@]}" --out "$RECORDS/flags_$name.json"
    done
  else
    say "=== flags: skipped, no ViT-B/16 setting of ours has run yet"
  fi
fi

"$PYTHON" benchmarks/gpu_check_summary.py "$RECORDS" --out "$OUT_DIR" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
say "gpu_check: ${SECONDS} s in all"
exit "$status"
