"""Data + augmentation throughput on real CIFAR-10: vitlab's batched in-memory pipeline
against torchvision's per-image transforms.v2 pipeline through a DataLoader.

Both produce normalised float batches of RandomResizedCrop(32) + horizontal flip
(p=0.5) with per-sample random parameters, from the same uint8 training images.

    python benchmarks/pipeline.py --data-dir DIR      # DIR holds cifar-10-batches-py/
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, command_line, machine  # noqa: E402

from vitlab.augment import BatchAugment, Normalize  # noqa: E402
from vitlab.data import load_dataset  # noqa: E402
from vitlab.devices import keep_freed_memory  # noqa: E402
from vitlab.train import crop_plans, epoch_order  # noqa: E402


class PerImageCIFAR(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: array -> PIL image -> transform."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def torchvision_transform(mean, std, trivial_augment: bool = False):
    extra = [v2.TrivialAugmentWide()] if trivial_augment else []
    return v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(32, antialias=True), v2.RandomHorizontalFlip(0.5),
                       *extra, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def time_loader(loader, batches: int) -> float:
    """Images/s over ``batches`` batches, epochs started again as needed (a small dataset)."""
    it = iter(loader)
    next(it)  # start-up (worker spawn) excluded
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        x = next(it, None)
        if x is None:
            it = iter(loader)
            x = next(it)
        n += len(x[0])
    return n / (time.perf_counter() - t)


def time_vitlab(images: torch.Tensor, labels: torch.Tensor, augment: BatchAugment, batch: int, batches: int,
                device: torch.device) -> float:
    """Batches drawn, cropped and augmented as vitlab.train does (crop plans included in the time)."""
    images, labels = images.to(device), labels.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    steps = len(images) // batch
    augment(images[:batch], gen)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    done, epoch = 0, 0
    while done < batches:
        order = epoch_order(len(images), 0, epoch, device)
        plans = crop_plans(augment, 0, epoch, 0, steps, batch, images.shape[2:], device)
        n = min(steps, batches - done)
        for b, plan in zip(range(n), plans):
            idx = order[b * batch: (b + 1) * batch]
            augment(images.index_select(0, idx), gen, plan)
            labels.index_select(0, idx)
        done, epoch = done + n, epoch + 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    # As `vitlab train` does; process-wide, so forked DataLoader workers inherit it too.
    allocator = "glibc keeps freed blocks (vitlab.devices.keep_freed_memory)" if keep_freed_memory(device) else "default allocator"
    data = load_dataset(args.dataset, args.data_dir, val_size=0, download=False)
    imgs, labels = data.train.images, data.train.labels
    print(f"machine: {machine()}; {len(imgs)} {args.dataset} training images")

    hwc = imgs.permute(0, 2, 3, 1).squeeze(-1).numpy()
    results: dict[tuple[str, str], list[float]] = {}
    # Interleave: each contender in turn, three rounds, and keep each one's best round (drift hits all alike).
    # vitlab's pipeline is timed over 10x more batches than the loaders: a batch takes well under a millisecond.
    for _ in range(3):
        for policy, ta in (("crop+flip", False), ("crop+flip+TrivialAugmentWide", True)):
            augment = BatchAugment(Normalize(data.mean, data.std, device), data.image_size, crop=True,
                                   crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5,
                                   trivial_augment=1.0 if ta else 0.0)
            results.setdefault((policy, f"vitlab batched ({device.type})"), []).append(
                time_vitlab(imgs, labels, augment, args.batch, 10 * args.batches, device))
            per_image = PerImageCIFAR(hwc, labels.numpy(), torchvision_transform(data.mean, data.std, ta))
            for workers in ((0, 2) if not ta else (2,)):
                loader = DataLoader(per_image, batch_size=args.batch, shuffle=True, num_workers=workers,
                                    persistent_workers=False)
                n = args.batches if workers else max(10, args.batches // 3)
                results.setdefault((policy, f"torchvision v2 per-image, DataLoader workers={workers}"), []).append(
                    time_loader(loader, n))
    best = {k: max(v) for k, v in results.items()}
    lines = ["| augmentation | pipeline | images/s | vs torchvision (2 workers) |", "|---|---|---|---|"]
    for (policy, name), v in best.items():
        base = best[(policy, "torchvision v2 per-image, DataLoader workers=2")]
        lines.append(f"| {policy} | {name} | {v:,.0f} | {v / base:.1f}x |")
    body = (f"{args.dataset} train split, batch {args.batch}, RandomResizedCrop(32, scale 0.08-1) + flip (+ TrivialAugmentWide) "
            f"+ normalise; best of 3 interleaved rounds ({10 * args.batches} batches for vitlab, {args.batches} for the "
            f"loaders); {allocator}\n\n" + "\n".join(lines))
    print(body)
    if not args.no_record:
        append_results("Data pipeline throughput (benchmarks/pipeline.py)", command_line(), body)


if __name__ == "__main__":
    main()
