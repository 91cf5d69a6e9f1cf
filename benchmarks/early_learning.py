"""How fast a preset starts to learn: validation accuracy after the first N optimizer steps,
for variants of its schedule and init, each a fresh run stopped at step N (the learning
rate still near its peak, no annealing to flatter it), scored on the first 2,000
validation images. Issue 17 used it to find why `reference-mnist` ended short of 0.98:
its 12-block ViT spent the first epoch learning where its patches are.

    python benchmarks/early_learning.py --data-dir /work/data
    python benchmarks/early_learning.py --data-dir DIR --steps 150 \\
        --variant 'preset={}' --variant 'old-init={"pos_embed_std": 0.02}'

A variant is NAME=JSON, the config fields it changes (one fresh process-local run each; run
nothing else meanwhile: the timings are printed too).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, command_line, machine  # noqa: E402

from vitlab.config import load_preset  # noqa: E402
from vitlab.data import load_dataset  # noqa: E402
from vitlab.errors import TrainingInterrupted  # noqa: E402
from vitlab.inference import load_predictor, loss_and_accuracy  # noqa: E402
from vitlab.train import train  # noqa: E402

# reference-mnist before issue 17, and the variants it compared, in its order (each a full set of changes)
BEFORE = {"lr": 0.0005, "warmup_epochs": 1.0, "pos_embed_std": 0.02}
FAST = {**BEFORE, "warmup_epochs": 0.1, "lr": 0.001}
VARIANTS = {
    "before (lr 5e-4, warmup 1 epoch, pos std 0.02)": BEFORE,
    "warmup 0.1": {**BEFORE, "warmup_epochs": 0.1},
    "warmup 0.1, lr 1e-3": FAST,
    "warmup 0.1, lr 2e-3": {**FAST, "lr": 0.002},
    "warmup 0.1, lr 1e-3, no clipping": {**FAST, "grad_clip": 0.0},
    "warmup 0.1, lr 1e-3, pos std 0.2": {**FAST, "pos_embed_std": 0.2},
    "warmup 0.1, lr 1e-3, pos std 1 (the preset since)": {**FAST, "pos_embed_std": 1.0},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--preset", default="reference-mnist")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--variant", action="append", metavar="NAME=JSON", help="fields changed from the preset (default: issue 17's seven variants)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    try:
        variants = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.variant)} if args.variant else VARIANTS
    except ValueError:
        p.error("--variant takes NAME=JSON, e.g. 'wide={\"pos_embed_std\": 1.0}'")
    preset = load_preset(args.preset)
    data = load_dataset(preset.dataset, args.data_dir, val_size=preset.val_size, download=False)
    val_images, val_labels = data.val.images[:2000], data.val.labels[:2000]
    rows = []
    for name, changes in variants.items():
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:  # each run's checkpoints: ~75 MB at the reference's size
            cfg = preset.replace(data_dir=args.data_dir, out=out, name="run", tensorboard=False, **changes)
            try:
                train(cfg, data=data, progress=False, log=lambda s: None, stop_when=lambda st: st.step >= args.steps)
            except TrainingInterrupted:
                pass  # stopped at step N with its checkpoint, as intended
            predictor = load_predictor(Path(out) / "run" / "last")
        loss, acc = loss_and_accuracy(predictor.logits(val_images), val_labels)
        rows.append(f"| {name} | `{json.dumps(changes)}` | {loss:.4f} | **{acc:.4f}** | {time.perf_counter() - t:.0f} s |")
        print(rows[-1], flush=True)
    body = (f"{args.preset}, validation loss and accuracy on 2,000 validation images after {args.steps} steps "
            f"(batch {preset.batch_size}):\n\n| variant | changes | val loss | val acc | wall |\n|---|---|---|---|---|\n"
            + "\n".join(rows))
    print(f"machine: {machine()}\n{body}")
    if not args.no_record:
        append_results(f"Early learning of {args.preset} (benchmarks/early_learning.py)", command_line(), body)


if __name__ == "__main__":
    main()
