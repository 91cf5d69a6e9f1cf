#!/usr/bin/env bash
# Train a fast-* preset on the whole of CIFAR-10 or CIFAR-100 on the GPU machine, in two
# calls of the device tool (64 MiB of files per call; the dataset is ~160 MiB raw and
# travels as two ~58 MiB parts). Prepare here, once (ignored folders):
#   python benchmarks/cifar_halves.py pack --data-dir /work/data --dataset cifar10
# Call 1, carry [".gpudata-a"]:   bash benchmarks/gpu_accuracy.sh stage
# Call 2 right after (the machine is given back after ~30 s idle), carry [".gpudata-b"]:
#   bash benchmarks/gpu_accuracy.sh train fast-cifar10-gpu [extra vitlab flags]
# Results come back under $OUT: the run folder (metrics.csv, results.md, plots, no
# weights) and RESULTS-gpu.md, a block to append to benchmarks/RESULTS.md.
set -euo pipefail
OUT=${OUT:-/tmp/vitlab-gpu-out}
DATA=${DATA:-/root/data}
mkdir -p "$OUT" "$DATA/parts"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
case "${1:-}" in
  stage)
    cp -r .gpudata-a "$DATA/parts/"
    du -sh "$DATA/parts/.gpudata-a" | tee "$OUT/stage.txt"
    ;;
  train)
    preset=${2:?usage: gpu_accuracy.sh train PRESET [flags]}; shift 2
    [ -d "$DATA/parts/.gpudata-a" ] || { echo "part A is not on this machine: run 'stage' first, in the same warm session"; exit 2; }
    cp -r .gpudata-b "$DATA/parts/"
    python3 benchmarks/cifar_halves.py unpack "$DATA/parts/.gpudata-a" "$DATA/parts/.gpudata-b" --out "$DATA"
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU (nvidia-smi missing)"; } | tee "$OUT/gpu.txt"
    start=$(date +%s)
    python3 -m vitlab.cli train --preset "$preset" --data-dir "$DATA" --no-download --out "$DATA/runs" \
      --name "$preset" --overwrite --quiet "$@" 2>&1 | tee "$OUT/train.log"
    wall=$(( $(date +%s) - start ))
    cp -r "$DATA/runs/$preset" "$OUT/" && find "$OUT/$preset" \( -name '*.safetensors' -o -name '*.pt' \) -delete
    {
      echo "## GPU: vitlab train --preset $preset $* ($(date -u +%F), $(cat "$OUT/gpu.txt"))"
      echo
      echo "command: \`bash benchmarks/gpu_accuracy.sh train $preset $*\` after \`stage\`; wall time ${wall} s including evaluation"
      echo
      cat "$DATA/runs/$preset/results.md"
    } > "$OUT/RESULTS-gpu.md"
    ;;
  *)
    echo "usage: gpu_accuracy.sh stage | train PRESET [flags]"; exit 2 ;;
esac
