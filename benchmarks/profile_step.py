"""Where a training step's time goes, by op (torch.profiler): vitlab's step (forward, loss,
backward, clipping, AdamW: the calls vitlab.train makes) for the small config and for
fast-fashion-mnist's conv-pool model, at each precision asked. Ops are summed by self time
and grouped: matrix products (linear, conv, attention kernels), elementwise and
normalisation, layout changes and casts, the optimizer, the rest.

    python benchmarks/profile_step.py [--configs small conv-pool] [--precisions fp32 bf16]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402
from common import VITLAB_CONFIGS as SHAPES, append_results, command_line, machine  # noqa: E402

from vitlab.devices import keep_freed_memory  # noqa: E402

GROUPS = [  # the first group whose words appear in an op's name takes it
    ("matrix products", ("addmm", "mm", "bmm", "matmul", "linear", "conv", "scaled_dot_product", "flash", "baddbmm")),
    ("optimizer", ("adam", "_foreach", "lerp", "addcdiv", "addcmul", "clip", "norm_")),
    ("layout and casts", ("copy_", "to_copy", "clone", "contiguous", "transpose", "permute", "reshape", "view",
                          "cat", "index", "unbind", "split", "empty", "zero", "fill")),
    ("elementwise and normalisation", ("gelu", "relu", "softmax", "layer_norm", "native_layer_norm", "add", "mul",
                                       "div", "sum", "mean", "max_pool", "dropout", "exp", "log", "where", "sub",
                                       "nll", "cross_entropy", "threshold")),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, words in GROUPS:
        if any(w in low for w in words):
            return group
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["small", "conv-pool"], choices=list(SHAPES))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    train_step.BATCH = args.batch
    device = torch.device("cpu")
    keep_freed_memory(device)
    sections = []
    for name in args.configs:
        for prec in args.precisions:
            step, _ = train_step.make_step("vitlab", SHAPES[name], device, torch.bfloat16 if prec == "bf16" else None,
                                           False)
            for _ in range(3):
                step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    step()
            events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
            total = sum(e.self_cpu_time_total for e in events)
            groups = defaultdict(float)
            for e in events:
                groups[group_of(e.key)] += e.self_cpu_time_total
            ms = total / 1e3 / args.steps
            lines = [f"**{name}, {prec}**: {ms:.1f} ms per step of {args.batch} images ({1e3 * args.batch / ms:,.0f} "
                     "img/s under the profiler)", "",
                     "| group | share |", "|---|---|"]
            lines += [f"| {g} | {100 * t / total:.1f}% |" for g, t in sorted(groups.items(), key=lambda kv: -kv[1])]
            lines += ["", "| op (self time) | ms per step | share | calls per step |", "|---|---|---|---|"]
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
                lines.append(f"| `{e.key}` | {e.self_cpu_time_total / 1e3 / args.steps:.2f} | "
                             f"{100 * e.self_cpu_time_total / total:.1f}% | {e.count // args.steps} |")
            sections.append("\n".join(lines))
            print(sections[-1] + "\n", flush=True)
    body = "\n\n".join(sections)
    print(f"machine: {machine()}")
    if not args.no_record:
        append_results("Where a training step's time goes (benchmarks/profile_step.py)", command_line(), body)


if __name__ == "__main__":
    main()
