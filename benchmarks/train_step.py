"""Training-step throughput of the same ViT built four ways, interleaved in one process.

Each round times one step (forward + loss + backward + AdamW) of every
implementation in turn (A B C D A B C D ...), so machine drift hits all alike;
the table reports medians, ratios to timm, FLOPs per image and MFU against the
measured matmul peak.

    python benchmarks/train_step.py                      # small + reference, fp32 + bf16, eager
    python benchmarks/train_step.py --compile both --configs small
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, append_results, build_peer, command_line, machine, median, timed  # noqa: E402

from vitlab import autotune  # noqa: E402
from vitlab.model import Kernels, ViT, ViTConfig  # noqa: E402
from vitlab.devices import PRECISIONS, autocast, keep_freed_memory, matmul_peak, precision_name  # noqa: E402
from vitlab.train import apply_gradients, build_optimizer, loss_and_logits  # noqa: E402
from vitlab.train.setup import gradient_scaler  # noqa: E402

IMPLS = ["vitlab", "timm", "vit-pytorch", "tutorial"]


def make_step(name: str, cfg: dict, device: torch.device, amp: torch.dtype | None, compile_: bool):
    """A zero-argument callable running one training step on a fixed random batch."""
    torch.manual_seed(0)
    if name == "vitlab":  # exactly the calls vitlab.train makes: its kernels timed (autotune) at this precision
        choice = autotune.choose(ViTConfig(**cfg), device, batch=BATCH, training=True, precision=precision_name(amp))
        model = ViT(ViTConfig(**cfg), choice.kernels()).to(device)
        scaler = gradient_scaler(device, amp)  # fp16: as vitlab.train trains it
        opt = build_optimizer(model, 1e-3, 0.05, scaler)
    else:
        model = build_peer(name, cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)  # the usual AMP loop
    model.train()
    fwd = torch.compile(model) if compile_ else model
    x = torch.randn(BATCH, cfg["channels"], cfg["image_size"], cfg["image_size"], device=device)
    y = torch.randint(0, cfg["num_classes"], (BATCH,), device=device)

    if name == "vitlab":
        def step():
            loss, _ = loss_and_logits(fwd, x, y, device, amp, 0.1)
            opt.zero_grad(set_to_none=True)
            apply_gradients(model, opt, loss, 1.0, scaler)
    else:
        def step():
            with autocast(device, amp):
                loss = F.cross_entropy(fwd(x).float(), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
    n_params = sum(p.numel() for p in model.parameters())
    return step, n_params


def train_flops(cfg: dict, device: torch.device) -> float:
    # the architecture's FLOPs, the same for every implementation
    model = ViT(ViTConfig(**cfg), Kernels(attention="explicit", cls_only_last_block=False)).to(device)
    x = torch.randn(2, cfg["channels"], cfg["image_size"], cfg["image_size"], device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


def run_group(cfg_name: str, prec: str, compile_: bool, impls: list[str], device: torch.device,
              warmup: int, rounds: int) -> dict[str, tuple[float, int]]:
    cfg = CONFIGS[cfg_name]
    amp = PRECISIONS[prec]
    steps = {}
    for name in impls:
        try:
            steps[name] = make_step(name, cfg, device, amp, compile_)
        except ImportError as e:
            print(f"  skip {name}: {e} (pip install -e '.[bench]')")
    for _ in range(warmup):  # compile and warm caches before timing
        for step, _ in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (step, _) in steps.items():
            times[name].append(timed(step, device))
    return {name: (BATCH / median(t), steps[name][1]) for name, t in times.items()}


def main() -> None:
    global BATCH
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["small", "reference"], choices=list(CONFIGS))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(PRECISIONS))
    p.add_argument("--compile", choices=["off", "on", "both"], default="off")
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 15 small, 5 reference on CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args()
    BATCH = args.batch
    device = torch.device(args.device)
    # `vitlab train` sets this; here it is on for every implementation alike, so the ratios compare model code.
    allocator = "glibc keeps freed blocks for all implementations" if keep_freed_memory(device) else "default allocator"
    print(f"machine: {machine()}; {allocator}")

    peaks = {prec: matmul_peak(device, PRECISIONS[prec]) for prec in args.precisions}
    print("matmul peak: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items()))
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    lines = ["| config | precision | compile | impl | params | img/s | vs timm | MFU |", "|---|---|---|---|---|---|---|---|"]
    flops_of = {name: train_flops(CONFIGS[name], device) for name in args.configs}
    for cfg_name in args.configs:
        flops = flops_of[cfg_name]
        print(f"{cfg_name}: {flops / 1e9:.3f} GFLOP per training image (FlopCounterMode, fwd+bwd)")
        rounds = args.rounds or (15 if cfg_name == "small" or device.type == "cuda" else 5)
        for prec in args.precisions:
            for compile_ in modes:
                res = run_group(cfg_name, prec, compile_, args.impls, device, args.warmup, rounds)
                base = res.get("timm", (float("nan"), 0))[0]
                for name, (ips, n_params) in res.items():
                    mfu = ips * flops / peaks[prec]
                    line = (f"| {cfg_name} | {prec} | {'on' if compile_ else 'off'} | {name} | {n_params / 1e6:.2f}M | "
                            f"{ips:,.0f} | {ips / base:.2f}x | {100 * mfu:.1f}% |")
                    lines.append(line)
                    print(line, flush=True)
    peak_line = "matmul peak: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items())
    flop_line = ", ".join(f"{c} {flops_of[c] / 1e9:.3f} GFLOP" for c in args.configs)
    body = (f"batch {BATCH}; FLOPs per training image (the architecture's; vitlab's last block skips the patch tokens, "
            f"so its MFU counts work it does not do): {flop_line}; {peak_line}; {allocator}\n\n" + "\n".join(lines))
    print("\n" + body)
    if not args.no_record:
        append_results("Training step throughput (benchmarks/train_step.py)", command_line(), body)


BATCH = 128

if __name__ == "__main__":
    main()
