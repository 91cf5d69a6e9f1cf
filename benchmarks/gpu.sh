#!/usr/bin/env bash
# The GPU measurements, as steps that each fit one call of the device tool (10 minutes a call,
# 15 minutes of device time a session, 64 MiB of files a call). Each step runs under its own
# timeout and appends its results to $OUT/HISTORY-gpu.md the moment it finishes, so a call
# cut short still brings back what it measured.
#
#   bash benchmarks/gpu.sh [--rehearse] [STEP ...]     (no STEP: every step, in this order)
#
#   step       training-step throughput, eager: reference + small, bf16 + fp32, four implementations  (~2 min)
#   pipeline   the data pipeline on the CIFAR-10 subset                                              (~1 min)
#   epoch      one CIFAR-10 epoch end to end, vitlab against the conventional loop                   (~2 min)
#   reference  a reference-cifar10 epoch, projected to the full 45,000 images                        (~2 min)
#   compile    the step again under torch.compile, vitlab and timm only (cold compiles: the long one) (~4 min)
#
# Prepare here, once (both folders are git-ignored):
#   python benchmarks/make_device_data.py --data-dir /work/data --out .devdata   # ~48 MiB
#   pip download --no-deps -d .whl vit-pytorch                                    # pure Python; einops is there
# then two calls of the device tool's run, carry [".devdata", ".whl"]:
#   bash benchmarks/gpu.sh step pipeline epoch reference       (timeout_s 480)
#   bash benchmarks/gpu.sh compile                             (timeout_s 300)
# and here: python benchmarks/common.py merge <files_at>/HISTORY-gpu.md
#
# --rehearse runs every step on the CPU at tiny sizes (a 1-block model, a few batches, data from
# $REHEARSE_DATA, default .devdata), so the script itself is tested before GPU time is spent
# (tests/test_benchmarks.py runs it, in about a minute).
set -uo pipefail
REHEARSE=0
if [ "${1:-}" = "--rehearse" ]; then REHEARSE=1; shift; fi
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(step pipeline epoch reference compile)
for s in "${STEPS[@]}"; do
  case "$s" in step|pipeline|epoch|reference|compile) ;; *) echo "unknown step: $s (step pipeline epoch reference compile)"; exit 2 ;; esac
done

OUT=${OUT:-/tmp/vitlab-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" BENCH_HISTORY="$OUT/HISTORY-gpu.md"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if [ $REHEARSE = 1 ]; then
  DATA=${REHEARSE_DATA:-.devdata}
  DEV=(--device cpu)
  STEP_ARGS=(--configs tiny --precisions fp32 --batch 16 --rounds 2 --warmup 1 --impls vitlab timm)
  COMPILE_ARGS=(--configs tiny --precisions fp32 --batch 16 --rounds 1 --warmup 1 --impls vitlab)
  PIPE_ARGS=(--batch 32 --batches 3)
  EPOCH_ARGS=(--batch 32 --workers 0 --val-size 64 --config tiny)
  REF_ARGS=(--train-images 64 --epochs 1 --precision fp32)
  LIMIT=${STEP_TIMEOUT:-240}
  echo "rehearsal on the CPU: $(nproc) cores" | tee "$OUT/gpu.txt"
else
  DATA=.devdata
  DEV=()
  STEP_ARGS=(--configs reference small --precisions bf16 fp32 --compile off --batch 256 --rounds 20)
  COMPILE_ARGS=(--configs reference small --precisions bf16 --batch 256 --rounds 20 --impls vitlab timm)
  PIPE_ARGS=(--batch 256 --batches 40)
  EPOCH_ARGS=(--batch 128)
  REF_ARGS=(--epochs 2)
  LIMIT=${STEP_TIMEOUT:-280}
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$OUT/gpu.txt"
fi

failed=0
run() {  # one step: its own time limit, its log kept, its result already appended by the script itself
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/log.txt"
  local start=$SECONDS
  timeout "$LIMIT" "$@" >>"$OUT/log.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
  [ $rc -eq 0 ] || failed=1
}

for s in "${STEPS[@]}"; do
  case "$s" in
    step) run step python3 benchmarks/train_step.py "${STEP_ARGS[@]}" "${DEV[@]}" ;;
    compile) run compile python3 benchmarks/train_step.py "${COMPILE_ARGS[@]}" --compile on "${DEV[@]}" ;;
    pipeline) run pipeline python3 benchmarks/pipeline.py --data-dir "$DATA" "${PIPE_ARGS[@]}" "${DEV[@]}" ;;
    epoch) run epoch python3 benchmarks/epoch.py --data-dir "$DATA" "${EPOCH_ARGS[@]}" "${DEV[@]}" ;;
    reference) run reference python3 benchmarks/reference_epoch.py --data-dir "$DATA" "${REF_ARGS[@]}" "${DEV[@]}" ;;
  esac
done
runs=$(cat "$BENCH_HISTORY" 2>/dev/null | grep -c '^## ')
echo "done: $runs result(s) in $BENCH_HISTORY$([ $failed = 1 ] && echo '; a step failed: see log.txt')"
exit $failed
