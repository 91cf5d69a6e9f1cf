"""Wall time of one full `reference-cifar10` epoch (45,000 training images + 5,000
validation, the reference architecture, vitlab's defaults for the device), with the
training images tiled from whatever CIFAR-10 subset is at hand: the time depends on
the image count, not on which images they are.

    python benchmarks/reference_epoch.py --data-dir .devdata
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, command_line, machine  # noqa: E402

from vitlab.config import load_preset  # noqa: E402
from vitlab.data import DatasetSplits, ImageSet, load_dataset  # noqa: E402
from vitlab.train import train  # noqa: E402


def tiled(s: ImageSet, n: int) -> ImageSet:
    reps = -(-n // len(s))
    return ImageSet(s.images.repeat(reps, 1, 1, 1)[:n], s.labels.repeat(reps)[:n])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--train-images", type=int, default=45000)
    p.add_argument("--epochs", type=int, default=2, help="the first epoch includes warm-up; the last is reported")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    d = load_dataset("cifar10", args.data_dir, val_size=0, download=False)
    data = DatasetSplits("cifar10", d.classes, tiled(d.train, args.train_images), tiled(d.test, 5000),
                         tiled(d.test, 5000), False, d.mean, d.std)
    cfg = load_preset("reference-cifar10").replace(epochs=args.epochs, out=tempfile.mkdtemp(), device=args.device)
    times = []
    result = train(cfg, data=data, progress=False, log=lambda s: (times.append(s), print(s, flush=True)))
    epoch_lines = [t for t in times if t.startswith("epoch")]
    last = epoch_lines[-1]
    seconds = float(last.split("|")[-1].split("s")[0])
    body = (f"reference-cifar10 preset (depth 12, dim 256, batch 128), {args.train_images} training images, "
            f"epoch {args.epochs} of {args.epochs}: **{seconds:.2f} s** of training (+ validation and checkpoint; "
            f"whole run {result.seconds:.1f} s)\n\n`{last}`")
    print(f"machine: {machine()}\n{body}")
    if not args.no_record:
        append_results("One reference-cifar10 epoch (benchmarks/reference_epoch.py)", command_line(), body)


if __name__ == "__main__":
    main()
