"""What a user would otherwise run: timm's VisionTransformer in the conventional loop
(torchvision transforms per image, a DataLoader with worker processes, AdamW, a cosine
schedule), with the recipe of the best-known public CIFAR ViT repository (omihub777/ViT-CIFAR:
RandomCrop(32, padding=4) + flip + AutoAugment's CIFAR-10 policy, label smoothing 0.1, AdamW
lr 1e-3, weight decay 5e-5, warmup then cosine), at the vitlab preset's model size, trained for a
wall-clock budget: the baseline of benchmarks/speedrun.py's side-by-side ratio.

The schedule runs on the clock (the learning rate follows the fraction of the budget used), so
that it ends where the budget does, as vitlab's --time-budget plans its steps to. The splits are
vitlab's (the same 5,000 validation images), so the accuracies compare.

    python benchmarks/conventional.py --data-dir /work/data --budget 5m --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import PerImageCIFAR  # noqa: E402

from vitlab.budget import parse_duration  # noqa: E402
from vitlab.config import load_preset  # noqa: E402
from vitlab.data import load_dataset  # noqa: E402

RECIPE = "omihub777/ViT-CIFAR: crop pad 4 + flip + AutoAugment(CIFAR10), label smoothing 0.1, AdamW 1e-3 / wd 5e-5, warmup 5% + cosine"


def run(data_dir: str, budget: float, seed: int, preset: str = "fast-cifar10", workers: int = 2,
        batch: int = 128) -> dict:
    """Train for ``budget`` seconds; (seconds, val acc) after each epoch, and the final test accuracy."""
    import timm
    from torchvision.transforms import v2

    start = time.perf_counter()
    torch.manual_seed(seed)
    cfg = load_preset(preset)
    data = load_dataset("cifar10", data_dir, val_size=cfg.val_size, download=False)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, num_classes=10, embed_dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_dim / cfg.dim)
    norm = v2.Normalize(data.mean, data.std)
    train_tf = v2.Compose([v2.PILToTensor(), v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                           v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), v2.ToDtype(torch.float32, scale=True), norm])
    hwc = lambda s: s.images.permute(0, 2, 3, 1).numpy()  # noqa: E731
    loader = DataLoader(PerImageCIFAR(hwc(data.train), data.train.labels.numpy(), train_tf), batch_size=batch,
                        shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-5)
    evaluate = lambda split: _accuracy(model, split, data.mean, data.std)  # noqa: E731
    eval_s = _eval_seconds(model, data.val, data.mean, data.std)
    curve, train_start = [], time.perf_counter()
    deadline = start + budget - 2 * eval_s * len(data.test) / len(data.val) - 5  # the final test pass, and a margin
    while time.perf_counter() + eval_s < deadline:
        model.train()
        for x, y in loader:
            used = (time.perf_counter() - train_start) / max(1e-9, deadline - train_start)
            if used >= 1:
                break
            lr = 1e-3 * (used / 0.05 if used < 0.05 else 0.5 * (1 + math.cos(math.pi * (used - 0.05) / 0.95)))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        curve.append((time.perf_counter() - train_start, evaluate(data.val)))
    return {"curve": curve, "test_acc": evaluate(data.test), "wall_s": time.perf_counter() - start,
            "epochs": len(curve), "recipe": RECIPE}


@torch.no_grad()
def _accuracy(model, split, mean, std) -> float:
    model.eval()
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    correct = 0
    for i in range(0, len(split), 512):
        x = (split.images[i: i + 512].float() / 255 - m) / s
        correct += int((model(x).argmax(1) == split.labels[i: i + 512]).sum())
    return correct / len(split)


def _eval_seconds(model, split, mean, std) -> float:
    t = time.perf_counter()
    _accuracy(model, type(split)(split.images[:1024], split.labels[:1024]), mean, std)
    return (time.perf_counter() - t) * len(split) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--budget", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(json.dumps(run(args.data_dir, parse_duration(args.budget), args.seed)))


if __name__ == "__main__":
    main()
