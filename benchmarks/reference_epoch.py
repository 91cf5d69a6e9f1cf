"""Wall time of one `reference-cifar10` (or `--preset reference-cifar100`) epoch (the
reference architecture, vitlab's defaults for the device), with the training images tiled
from whatever CIFAR subset is at hand: the time depends on the image count, not on which
images they are. With fewer than the full 45,000 (50,000 for CIFAR-100) training images,
the full epoch and the whole run are projected from the measured images/s.

    python benchmarks/reference_epoch.py --data-dir .devdata
    python benchmarks/reference_epoch.py --data-dir DIR --preset reference-cifar100 --train-images 5000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish  # noqa: E402

from vitlab.config import load_preset  # noqa: E402
from vitlab.data import DatasetSplits, ImageSet, load_dataset  # noqa: E402
from vitlab.train import train  # noqa: E402


TRAIN_FILES = {"cifar10": 50_000, "cifar100": 50_000}  # images in the official training files


def full_train_images(dataset: str, val_size: int | float, val_is_test: bool) -> int:
    """The training split of the full dataset, whatever subset is on disk: the official files'
    50,000 less the validation images held out of them (none where val is the test set). A
    subset's own count would project a 9,000-image epoch as if it were the real one."""
    total = TRAIN_FILES[dataset]
    if val_is_test or not val_size:
        return total
    return total - (int(val_size) if val_size >= 1 else round(total * val_size))


def tiled(s: ImageSet, n: int) -> ImageSet:
    reps = -(-n // len(s))
    return ImageSet(s.images.repeat(reps, 1, 1, 1)[:n], s.labels.repeat(reps)[:n])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--preset", default="reference-cifar10", choices=["reference-cifar10", "reference-cifar100"])
    p.add_argument("--train-images", type=int, help="default: the full training split")
    p.add_argument("--epochs", type=int, default=2, help="the first epoch includes warm-up; the last is reported")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    preset = load_preset(args.preset)
    d = load_dataset(preset.dataset, args.data_dir, val_size=preset.val_size, download=False)
    full = full_train_images(preset.dataset, preset.val_size, d.val_is_test)
    n = args.train_images or full  # tiled from the images at hand up to the full count
    data = DatasetSplits(preset.dataset, d.classes, tiled(d.train, n), d.val, d.test, d.val_is_test, d.mean, d.std)
    cfg = preset.replace(epochs=args.epochs, device=args.device, precision=args.precision)
    times = []
    with tempfile.TemporaryDirectory() as out:  # the run's checkpoints (~75 MB) go with it
        result = train(cfg.replace(out=out), data=data, progress=False,
                       log=lambda s: (times.append(s), print(s, flush=True)))
    epoch_lines = [t for t in times if t.startswith("epoch")]
    last = epoch_lines[-1]
    seconds = float(last.split("|")[-1].split("s")[0])
    full_epoch = seconds * full / n
    body = (f"{args.preset} preset (depth {cfg.depth}, dim {cfg.dim}, batch {cfg.batch_size}), {n} training images, "
            f"epoch {args.epochs} of {args.epochs}: {seconds:.2f} s of training ({n / seconds:.1f} img/s; + "
            f"validation of {len(d.val)} images and a checkpoint: whole run {result.seconds:.1f} s). One epoch of "
            f"the {full} training images: **{full_epoch / 60:.1f} min**; the preset's {preset.epochs} epochs: "
            f"**{preset.epochs * full_epoch / 3600:.1f} h** of training\n\n`{last}`")
    publish(f"One {args.preset} epoch (benchmarks/reference_epoch.py)", body, record=not args.no_record)


if __name__ == "__main__":
    main()
