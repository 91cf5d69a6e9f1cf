"""Does ``auto`` pick the fastest kernels? For each config: the choice vitlab makes at the
start of a run (a short timing on a cut-down batch: its cost uncached and cached) against a
long side-by-side timing of every candidate on full training batches (interleaved rounds,
each candidate's fastest). The table gives both, and how much slower than the truly fastest
the chosen candidate is (0% when they agree).

    python benchmarks/kernel_choice.py [--configs small reference conv-pool] [--batch 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import VITLAB_CONFIGS as SHAPES, append_results, command_line, machine  # noqa: E402

import torch  # noqa: E402

from vitlab import autotune  # noqa: E402
from vitlab.model import ViTConfig  # noqa: E402

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="rounds of the long timing")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    os.environ["VITLAB_CACHE_DIR"] = tempfile.mkdtemp()  # nothing cached at the start
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = ["| config | chosen (cost uncached / cached) | short timing, ms per step | long timing at batch "
             f"{args.batch}, ms per step | fastest in the long timing | chosen is slower by |", "|---|---|---|---|---|---|"]
    for name in args.configs:
        cfg = ViTConfig(**SHAPES[name])
        t = time.perf_counter()
        choice = autotune.choose(cfg, device, batch=args.batch, training=True)
        uncached = time.perf_counter() - t
        t = time.perf_counter()
        assert autotune.choose(cfg, device, batch=args.batch, training=True).source == "cached"
        cached = time.perf_counter() - t
        options = autotune.candidates(cfg, device)
        long = autotune.measure(cfg, device, options, args.batch, True, seconds=float("inf"), rounds=args.rounds,
                                images=args.batch)
        chosen_ms = long.ms[autotune.label(choice)]
        best = min(long.ms, key=long.ms.get)
        short = ", ".join(f"{k} {v:.0f}" for k, v in choice.ms.items())
        full = ", ".join(f"{k} {v:.0f}" for k, v in long.ms.items())
        lines.append(f"| {name} | {autotune.label(choice)} ({uncached:.2f} s / {1e3 * cached:.1f} ms) | {short} | "
                     f"{full} | {best} | {100 * (chosen_ms / long.ms[best] - 1):.1f}% |")
        print(lines[-1], flush=True)
    body = ("Training step (forward + backward) of each candidate; the short timing is the one `vitlab train` does, "
            "its batch cut to about 80 ms of work on a CPU.\n\n" + "\n".join(lines))
    print(f"machine: {machine()}\n{body}")
    if not args.no_record:
        append_results("Kernel choice by measurement (benchmarks/kernel_choice.py)", command_line(), body)


if __name__ == "__main__":
    main()
