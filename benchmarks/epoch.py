"""Wall time of one full training epoch on real CIFAR-10 (45,000 training images plus
validation on 5,000), small config: vitlab end to end against a conventional loop
(per-image torchvision v2 transforms through a DataLoader with 2 workers, the
tutorial nn.MultiheadAttention ViT, AdamW, fp32). This is the speed-up a user sees.

Both sides are timed from the first training batch to the end of validation; file
parsing is excluded from both. vitlab's time also includes writing its checkpoints.

    python benchmarks/epoch.py --data-dir DIR      # DIR holds cifar-10-batches-py/
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, TutorialViT, append_results, command_line, machine  # noqa: E402
from pipeline import PerImageCIFAR, torchvision_transform  # noqa: E402

from vitlab import TrainConfig  # noqa: E402
from vitlab.data import load_dataset  # noqa: E402
from vitlab.train import train  # noqa: E402


def conventional_epoch(data, device: torch.device, batch: int, workers: int, config: str = "small"
                       ) -> tuple[float, float]:
    from torchvision.transforms import v2

    cfg = CONFIGS[config]
    model = TutorialViT(**cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    hwc = lambda s: s.images.permute(0, 2, 3, 1).numpy()  # noqa: E731
    train_set = PerImageCIFAR(hwc(data.train), data.train.labels.numpy(), torchvision_transform(data.mean, data.std))
    val_tf = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean, data.std)])
    val_set = PerImageCIFAR(hwc(data.val), data.val.labels.numpy(), val_tf)
    train_loader = DataLoader(train_set, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=batch, num_workers=workers)
    t = time.perf_counter()
    model.train()
    for x, y in train_loader:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in val_loader:
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, correct / len(val_set)


def vitlab_epoch(data_dir: str, device: str, batch: int, val_size: int = 5000, config: str = "small"
                 ) -> tuple[float, float]:
    c = CONFIGS[config]
    cfg = TrainConfig(dataset="cifar10", data_dir=data_dir, download=False, val_size=val_size, epochs=1, batch_size=batch,
                      patch_size=c["patch_size"], depth=c["depth"], heads=c["heads"], dim=c["dim"], mlp_dim=c["mlp_dim"],
                      lr=1e-3, warmup_epochs=0, crop=True, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5,
                      device=device)
    with tempfile.TemporaryDirectory() as out:
        result = train(cfg.replace(out=out), progress=False, log=lambda s: None)
    return result.seconds, result.results["Val"][1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--val-size", type=int, default=5000, help="validation images held out of the training files")
    p.add_argument("--config", default="small", choices=list(CONFIGS), help="the model both sides train")
    p.add_argument("--vitlab-only", action="store_true", help="time vitlab's epoch alone (comparing its versions)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    print(f"machine: {machine()}")
    data = load_dataset("cifar10", args.data_dir, val_size=args.val_size, download=False)
    if args.vitlab_only:
        vit_s, vit_acc = vitlab_epoch(args.data_dir, args.device, args.batch, args.val_size, args.config)
        print(f"| vitlab defaults (`vitlab.train.train`, epochs=1) | {vit_s:.1f} s | {vit_acc:.3f} |")
        return
    conv_s, conv_acc = conventional_epoch(data, torch.device(args.device), args.batch, args.workers, args.config)
    print(f"conventional: {conv_s:.1f} s (val acc {conv_acc:.3f})", flush=True)
    vit_s, vit_acc = vitlab_epoch(args.data_dir, args.device, args.batch, args.val_size, args.config)
    print(f"vitlab: {vit_s:.1f} s (val acc {vit_acc:.3f})", flush=True)
    c = CONFIGS[args.config]
    body = (f"CIFAR-10, {len(data.train):,} train + {len(data.val):,} val images, {args.config} config (depth {c['depth']}, "
            f"dim {c['dim']}, heads {c['heads']}, MLP {c['mlp_dim']}), "
            f"batch {args.batch}, RandomResizedCrop + flip\n\n"
            "| loop | epoch wall time (train + val) | val acc after 1 epoch | speed-up |\n|---|---|---|---|\n"
            f"| conventional: torchvision v2 + DataLoader({args.workers} workers) + nn.MultiheadAttention ViT + AdamW, fp32 "
            f"| {conv_s:.1f} s | {conv_acc:.3f} | 1.0x |\n"
            f"| vitlab defaults (`vitlab.train.train`, epochs=1) | {vit_s:.1f} s | {vit_acc:.3f} | {conv_s / vit_s:.2f}x |")
    print(body)
    if not args.no_record:
        append_results("One CIFAR-10 epoch, end to end (benchmarks/epoch.py)", command_line(), body)


if __name__ == "__main__":
    main()
