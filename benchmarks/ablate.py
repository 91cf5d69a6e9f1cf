"""What each element of a recipe buys: train the preset as it is, then once more with
each of its active elements removed, on the same budget, and record the test-accuracy
deltas.

    python benchmarks/ablate.py --preset digits
    python benchmarks/ablate.py --preset quick-fashion-mnist --data-dir /work/data --epochs 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, command_line, machine  # noqa: E402

from vitlab.config import TrainConfig, load_preset  # noqa: E402
from vitlab.train import train  # noqa: E402

# element -> (is it on in this config?, the overrides that remove it)
ELEMENTS = {
    "crop": (lambda c: c.crop, {"crop": False}),
    "hflip": (lambda c: c.hflip > 0, {"hflip": 0.0}),
    "trivial_augment": (lambda c: c.trivial_augment > 0, {"trivial_augment": 0.0}),
    "repeated_augment": (lambda c: c.repeated_augment > 1, {"repeated_augment": 1}),
    "random_erasing": (lambda c: c.random_erasing > 0, {"random_erasing": 0.0}),
    "mixup": (lambda c: c.mixup_alpha > 0, {"mixup_alpha": 0.0}),
    "cutmix": (lambda c: c.cutmix_alpha > 0, {"cutmix_alpha": 0.0}),
    "conv_stem": (lambda c: c.patch_embed == "conv-stem", {"patch_embed": "conv"}),
    "conv_pool": (lambda c: c.patch_embed == "conv-pool", {"patch_embed": "conv"}),
    "shifted_patches": (lambda c: c.patch_embed == "spt", {"patch_embed": "conv"}),
    "lsa": (lambda c: c.lsa, {"lsa": False}),
    "label_smoothing": (lambda c: c.label_smoothing > 0, {"label_smoothing": 0.0}),
    "drop_path": (lambda c: c.drop_path > 0, {"drop_path": 0.0}),
    "layer_scale": (lambda c: c.layer_scale > 0, {"layer_scale": 0.0}),
    "ema": (lambda c: c.ema_decay > 0, {"ema_decay": 0.0}),
    "tta_flip": (lambda c: c.tta_flip, {"tta_flip": False}),
    "warmup": (lambda c: c.warmup_epochs > 0, {"warmup_epochs": 0.0}),
    "weight_decay": (lambda c: c.weight_decay > 0, {"weight_decay": 0.0}),
}


def run(cfg: TrainConfig) -> tuple[float, float]:
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ablate-") as out:  # the run's checkpoints go with it
        result = train(cfg.replace(out=out), progress=False, log=lambda s: None)
    return result.results["Test"][1], time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (the same for every run)")
    p.add_argument("--elements", nargs="+", choices=list(ELEMENTS), help="default: every element the preset uses")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    base = load_preset(args.preset)
    if args.data_dir:
        base = base.replace(data_dir=args.data_dir)
    if args.epochs:
        base = base.replace(epochs=args.epochs)
    active = [e for e in (args.elements or ELEMENTS) if ELEMENTS[e][0](base)]
    print(f"machine: {machine()}\n{args.preset}: ablating {', '.join(active) or 'nothing (no element is on)'}")
    full_acc, full_s = run(base)
    print(f"full recipe: {full_acc:.4f} ({full_s:.0f} s)", flush=True)
    lines = ["| run | test accuracy | delta vs full | wall time |", "|---|---|---|---|",
             f"| full `{args.preset}` | {full_acc:.4f} | – | {full_s:.0f} s |"]
    for element in active:
        acc, secs = run(base.replace(**ELEMENTS[element][1]))
        lines.append(f"| without {element} | {acc:.4f} | {acc - full_acc:+.4f} | {secs:.0f} s |")
        print(lines[-1], flush=True)
    body = f"{args.preset}, {base.epochs} epochs each, seed {base.seed}\n\n" + "\n".join(lines)
    print(body)
    if not args.no_record:
        append_results(f"Ablation of {args.preset} (benchmarks/ablate.py)", command_line(), body)


if __name__ == "__main__":
    main()
