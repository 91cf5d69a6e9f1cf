#!/usr/bin/env bash
# All GPU measurements of the speed issue in one call of the device tool (15 minutes
# of device time per session; 64 MiB of files per call). Prepare here, once:
#   python benchmarks/make_device_data.py --data-dir /work/data --out .devdata   # ~48 MiB, git-ignored
#   pip download --no-deps -d .whl vit-pytorch                                    # pure Python; einops is there
# then call the device tool's run with carry [".devdata", ".whl"] and the command
#   bash benchmarks/gpu.sh
# Results come back under $OUT: RESULTS-gpu.md (append it to benchmarks/RESULTS.md) and the logs.
set -uo pipefail
OUT=${OUT:-/tmp/vitlab-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
cp benchmarks/RESULTS.md /tmp/RESULTS.before.md
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
run() { echo "== $*"; timeout "${STEP_TIMEOUT:-170}" "$@" 2>&1 | grep -v -i warning | tee -a "$OUT/log.txt"; }
# 1. training step: reference + small, bf16 + fp32, compile off/on, four implementations
run python3 benchmarks/train_step.py --configs reference small --precisions bf16 fp32 --compile both --batch 256 --rounds 20
# 2. data pipeline (CIFAR-10 subset)
run python3 benchmarks/pipeline.py --data-dir .devdata --batch 256 --batches 40
# 3. one epoch end to end (on the subset: 10k train / 5k val is what the loader gives; timings scale with images)
run python3 benchmarks/epoch.py --data-dir .devdata --batch 128
# 4. a full reference-cifar10 epoch: 45,000 images tiled from the subset
run python3 benchmarks/reference_epoch.py --data-dir .devdata --epochs 2
# what the runs appended, for benchmarks/RESULTS.md here
diff /tmp/RESULTS.before.md benchmarks/RESULTS.md | sed -n 's/^> //p' > "$OUT/RESULTS-gpu.md"
echo "done; $(wc -l < "$OUT/RESULTS-gpu.md") lines in RESULTS-gpu.md"
