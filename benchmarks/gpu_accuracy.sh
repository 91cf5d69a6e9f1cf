#!/usr/bin/env bash
# Train a fast-* preset on the whole of CIFAR-10 or CIFAR-100 on the GPU machine, in two
# calls of the device tool (64 MiB of files per call; the dataset is ~160 MiB raw and
# travels as two ~58 MiB parts). Prepare here, once (ignored folders):
#   python benchmarks/cifar_halves.py pack --data-dir /work/data --dataset cifar10
# Call 1, carry [".gpudata-a"]:   bash benchmarks/gpu_accuracy.sh stage
# Call 2 right after (the machine is given back after ~30 s idle), carry [".gpudata-b"]:
#   bash benchmarks/gpu_accuracy.sh train fast-cifar10-gpu [extra vitlab flags]
# The run trains to a time budget ($BUDGET, default 7m: the whole command, evaluation and
# report included), so that it ends inside one 10-minute call with its results written.
# Results come back under $OUT, 7 files (the device tool sends back at most 8): gpu.txt,
# train.log, HISTORY-gpu.md (here: python benchmarks/common.py merge <files_at>/HISTORY-gpu.md)
# and the run's results.md, results.json, metrics.csv and loss_curve.png.
set -euo pipefail
OUT=${OUT:-/tmp/vitlab-gpu-out}
DATA=${DATA:-/root/data}
mkdir -p "$OUT" "$DATA/parts"
HERE=$(cd "$(dirname "$0")" && pwd)  # the parts are read from the working folder (the repository root on the GPU machine)
export PYTHONUNBUFFERED=1 PYTHONPATH="$HERE/../src${PYTHONPATH:+:$PYTHONPATH}"
case "${1:-}" in
  stage)
    cp -r .gpudata-a "$DATA/parts/"
    du -sh "$DATA/parts/.gpudata-a" | tee "$OUT/stage.txt"
    ;;
  train)
    preset=${2:?usage: gpu_accuracy.sh train PRESET [flags]}; shift 2
    [ -d "$DATA/parts/.gpudata-a" ] || { echo "part A is not on this machine: run 'stage' first, in the same warm session"; exit 2; }
    cp -r .gpudata-b "$DATA/parts/"
    python3 "$HERE/cifar_halves.py" unpack "$DATA/parts/.gpudata-a" "$DATA/parts/.gpudata-b" --out "$DATA"
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU (nvidia-smi missing)"; } | tee "$OUT/gpu.txt"
    start=$(date +%s)
    budget=${BUDGET:-7m}
    python3 -m vitlab.cli train --preset "$preset" --data-dir "$DATA" --no-download --out "$DATA/runs" \
      --name "$preset" --overwrite --quiet --time-budget "$budget" "$@" 2>&1 | tee "$OUT/train.log"
    wall=$(( $(date +%s) - start ))
    for f in results.md results.json metrics.csv loss_curve.png; do cp "$DATA/runs/$preset/$f" "$OUT/"; done
    BENCH_HISTORY="$OUT/HISTORY-gpu.md" python3 - "$HERE" "$DATA/runs/$preset/results.md" \
        "BUDGET=$budget bash benchmarks/gpu_accuracy.sh train $preset $*" "$wall" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
from common import append_results
results, command, wall = open(sys.argv[2]).read(), sys.argv[3], sys.argv[4]
append_results(f"GPU accuracy: {command.split(' train ', 1)[1]}", command,
               f"after the `stage` call; wall time of the whole command: {wall} s, evaluation and report included"
               f"\n\n{results}")
PY
    ;;
  *)
    echo "usage: gpu_accuracy.sh stage | train PRESET [flags]"; exit 2 ;;
esac
