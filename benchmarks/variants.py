"""Which of vitlab's own speed options pay on this device? Times the training step of
each variant of the small (or reference) config, interleaved, and prints the ratio to
the current default. The defaults in vitlab.devices / vitlab.train follow this table.

    python benchmarks/variants.py --config small --precision bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, append_results, command_line, machine, median, timed  # noqa: E402

from vitlab.model import Kernels, ViT, ViTConfig  # noqa: E402
from vitlab.devices import resolve_attention  # noqa: E402
from vitlab.train import apply_gradients, build_optimizer, loss_and_logits  # noqa: E402


def variant(cfg: dict, device, amp, batch: int, attention: str, patch_embed: str, fused: bool | None, compile_: bool,
            cls_only: bool = True):
    torch.manual_seed(0)
    model = ViT(ViTConfig(**cfg, patch_embed=patch_embed), Kernels(attention, cls_only)).to(device)
    if fused is None:
        opt = build_optimizer(model, 1e-3, 0.05)
    else:
        opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-3, fused=fused, foreach=None if fused else True)
    fwd = torch.compile(model) if compile_ else model
    x = torch.randn(batch, cfg["channels"], cfg["image_size"], cfg["image_size"], device=device)
    y = torch.randint(0, cfg["num_classes"], (batch,), device=device)

    def step():
        loss, _ = loss_and_logits(fwd, x, y, device, amp, 0.1)
        opt.zero_grad(set_to_none=True)
        apply_gradients(model, opt, loss, 1.0)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=list(CONFIGS))
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the default")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.precision == "bf16" else None
    cfg = CONFIGS[args.config]
    default_attn = resolve_attention("auto", device, amp)
    other_attn = "sdpa" if default_attn == "explicit" else "explicit"
    variants = {
        "default": dict(attention=default_attn, patch_embed="conv", fused=None, compile_=False),
        f"attention={other_attn}": dict(attention=other_attn, patch_embed="conv", fused=None, compile_=False),
        "cls_only_last_block off": dict(attention=default_attn, patch_embed="conv", fused=None, compile_=False,
                                        cls_only=False),
        "patch_embed=linear": dict(attention=default_attn, patch_embed="linear", fused=None, compile_=False),
        "AdamW fused": dict(attention=default_attn, patch_embed="conv", fused=True, compile_=False),
        "AdamW foreach": dict(attention=default_attn, patch_embed="conv", fused=False, compile_=False),
    }
    if args.compile:
        variants["torch.compile"] = dict(attention=default_attn, patch_embed="conv", fused=None, compile_=True)
    steps = {name: variant(cfg, device, amp, args.batch, **v) for name, v in variants.items()}
    for _ in range(2):
        for s in steps.values():
            s()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, s in steps.items():
            times[name].append(timed(s, device))
    base = median(times["default"])
    lines = ["| variant | img/s | vs default |", "|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {args.batch / median(t):,.0f} | {base / median(t):.2f}x |")
    body = f"{args.config} config, {args.precision}, batch {args.batch}, default attention={default_attn}\n\n" + "\n".join(lines)
    print(f"machine: {machine()}\n{body}")
    if not args.no_record:
        append_results("vitlab speed options (benchmarks/variants.py)", command_line(), body)


if __name__ == "__main__":
    main()
