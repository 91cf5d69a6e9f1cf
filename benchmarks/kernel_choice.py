"""Does ``auto`` pick the fastest kernels? For each config: the choice vitlab makes at the
start of a run (a short timing of the tokenizer and one block: its cost uncached and cached)
against a long side-by-side timing of every candidate's whole training step on full batches
(interleaved rounds, each candidate's median, twice). The table gives both, and how much slower than the truly fastest
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
from common import VITLAB_CONFIGS as SHAPES, append_results, command_line, machine, median, timed  # noqa: E402

import torch  # noqa: E402

from vitlab import autotune  # noqa: E402
from vitlab.model import ViT, ViTConfig  # noqa: E402
from vitlab.train import apply_gradients, build_optimizer, loss_and_logits  # noqa: E402

def whole_steps(cfg: ViTConfig, device: torch.device, options: list, batch: int, rounds: int) -> dict[str, float]:
    """ms per training step (forward, backward, AdamW) of the whole model at the full batch, for
    each candidate: interleaved rounds, each candidate's median."""
    torch.manual_seed(0)
    first = ViT(cfg, options[0].kernels()).to(device).train()
    models = {autotune.label(c): first if i == 0 else first.with_kernels(c.kernels()) for i, c in enumerate(options)}
    opts = {k: build_optimizer(m, 1e-3, 0.05) for k, m in models.items()}
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)

    def step(c) -> float:
        model, opt = models[autotune.label(c)], opts[autotune.label(c)]
        return timed(lambda: (opt.zero_grad(set_to_none=True),
                              apply_gradients(model, opt, loss_and_logits(model, x, y, device, c.amp_dtype, 0.1)[0], 1.0)),
                     device)

    for c in options:
        step(c)
    times = {autotune.label(c): [] for c in options}
    for _ in range(rounds):
        for c in options:
            times[autotune.label(c)].append(step(c))
    return {k: 1e3 * median(v) for k, v in times.items()}


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
             f"{args.batch} (two runs), ms per step | fastest in the long timing | chosen is slower by |", "|---|---|---|---|---|---|"]
    for name in args.configs:
        cfg = ViTConfig(**SHAPES[name])
        t = time.perf_counter()
        choice = autotune.choose(cfg, device, batch=args.batch, training=True)
        uncached = time.perf_counter() - t
        t = time.perf_counter()
        assert autotune.choose(cfg, device, batch=args.batch, training=True).source == "cached"
        cached = time.perf_counter() - t
        options = autotune.candidates(cfg, device)
        halves = [whole_steps(cfg, device, options, args.batch, args.rounds) for _ in range(2)]
        long = {k: (halves[0][k] + halves[1][k]) / 2 for k in halves[0]}
        chosen_ms = long[autotune.label(choice)]
        best = min(long, key=long.get)
        short = ", ".join(f"{k} {v:.0f}" for k, v in choice.ms.items())
        full = ", ".join(f"{k} {halves[0][k]:.0f} / {halves[1][k]:.0f}" for k in long)
        lines.append(f"| {name} | {autotune.label(choice)} ({uncached:.2f} s / {1e3 * cached:.1f} ms) | {short} | "
                     f"{full} | {best} | {100 * (chosen_ms / long[best] - 1):.1f}% |")
        print(lines[-1], flush=True)
    body = ("The short timing is the one `vitlab train` does (the tokenizer and one block, forward and backward, the batch cut "
            "to about 150 ms of one block's work on a CPU; a step estimated as tokenizer + depth x block). The long "
            "timing is the whole training step (forward, backward, AdamW) at the full batch, median of the rounds, run "
            "twice to show the noise.\n\n" + "\n".join(lines))
    print(f"machine: {machine()}\n{body}")
    if not args.no_record:
        append_results("Kernel choice by measurement (benchmarks/kernel_choice.py)", command_line(), body)


if __name__ == "__main__":
    main()
