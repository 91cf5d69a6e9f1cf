"""Data-parallel training on this machine: 1 process x all threads against N processes
(torchrun, gloo on CPU / NCCL on GPU) x their share, the cost of the gradient all-reduce,
and how closely an N-process run reproduces the 1-process run.

    python benchmarks/distributed.py                 # small config, 2 processes
    python benchmarks/distributed.py --nproc 2 --rounds 20
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, CONFIGS, append_results, command_line, machine  # noqa: E402

from vitlab.model import Kernels, ViT, ViTConfig  # noqa: E402
from vitlab.devices import keep_freed_memory, resolve_attention, resolve_precision  # noqa: E402
from vitlab.train import apply_gradients, build_optimizer, loss_and_logits  # noqa: E402


def step_times(model_step, rounds: int, warmup: int = 3) -> float:
    """The median of ``rounds`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        model_step()
    return median_seconds(model_step, rounds)


def make(cfg_name: str, batch: int, device: torch.device, ddp: bool):
    amp = resolve_precision("auto", device)
    torch.manual_seed(0)
    cfg = CONFIGS[cfg_name]
    model = ViT(ViTConfig(**cfg), Kernels(resolve_attention("auto", device, amp))).to(device)
    opt = build_optimizer(model, 1e-3, 0.05)
    step_model = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    x = torch.randn(batch, cfg["channels"], cfg["image_size"], cfg["image_size"], device=device)
    y = torch.randint(0, cfg["num_classes"], (batch,), device=device)

    def step():
        loss, _ = loss_and_logits(step_model, x, y, device, amp, 0.1)
        opt.zero_grad(set_to_none=True)
        apply_gradients(model, opt, loss, 1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return model, step


def worker(args) -> None:
    """One rank under torchrun: DDP step time, and the all-reduce of a gradient-sized buffer."""
    import torch.distributed as dist

    from vitlab.distributed import from_env, start, threads_per_rank

    d = from_env()
    torch.set_num_threads(threads_per_rank(0, d))
    device = start(d, args.device)
    keep_freed_memory(device)
    model, step = make(args.config, args.batch // d.world, device, ddp=True)
    t_step = step_times(step, args.rounds)
    buf = torch.randn(sum(p.numel() for p in model.parameters()), device=device)
    for _ in range(3):
        dist.all_reduce(buf)
    t_reduce = step_times(lambda: dist.all_reduce(buf), args.rounds)
    if d.main:
        print(json.dumps({"step": t_step, "allreduce": t_reduce, "threads": torch.get_num_threads()}), flush=True)
    dist.destroy_process_group()


def same_run(nproc: int) -> dict:
    """Digits, 3 epochs, fp32, no dropout: one process and nproc under torchrun; the largest
    differences of metrics.csv's values and of the final weights."""
    from safetensors.torch import load_file

    args = ["--epochs", "3", "--depth", "2", "--dim", "32", "--heads", "2", "--mlp-dim", "32", "--batch-size", "64",
            "--precision", "fp32", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        subprocess.run([sys.executable, "-m", "vitlab", "train", "--threads", "1", "--out", str(out), "--name", "one",
                        *args], check=True, capture_output=True, env=env)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
                        "vitlab", "train", "--out", str(out), "--name", "many", *args], check=True, capture_output=True,
                       env=env)
        rows = [list(csv.DictReader(open(out / n / "metrics.csv"))) for n in ("one", "many")]
        metric = max(abs(float(a[k]) - float(b[k])) for a, b in zip(*rows) for k in a)
        wa, wb = (load_file(str(out / n / "last" / "model.safetensors")) for n in ("one", "many"))
        weight = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    return {"metric": metric, "weight": weight}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=list(CONFIGS))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, default=128, help="the global batch")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    device = torch.device(args.device)
    keep_freed_memory(device)
    _, step = make(args.config, args.batch, device, ddp=False)
    t_one = step_times(step, args.rounds)
    print(f"machine: {machine()}\n1 process x {torch.get_num_threads()} threads: {args.batch / t_one:,.0f} img/s", flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           str(Path(__file__).resolve()), "--worker", "--config", args.config, "--batch", str(args.batch),
           "--rounds", str(args.rounds), "--device", args.device]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode:
        sys.exit(res.stderr)
    many = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])
    print(f"{args.nproc} processes x {many['threads']} thread(s): {args.batch / many['step']:,.0f} img/s, "
          f"all-reduce {1e3 * many['allreduce']:.2f} ms", flush=True)
    agree = same_run(args.nproc) if device.type == "cpu" else None
    lines = ["| setup | global batch | step | img/s | vs 1 process |", "|---|---|---|---|---|",
             f"| 1 process x {torch.get_num_threads()} threads | {args.batch} | {1e3 * t_one:.1f} ms | "
             f"{args.batch / t_one:,.0f} | 1.00x |",
             f"| {args.nproc} processes (torchrun, {'gloo' if device.type == 'cpu' else 'nccl'}) x {many['threads']} "
             f"thread(s), DDP | {args.batch} | {1e3 * many['step']:.1f} ms | {args.batch / many['step']:,.0f} | "
             f"{t_one / many['step']:.2f}x |"]
    body = (f"{args.config} config, fp32 unless the device computes bf16 natively; the all-reduce of one "
            f"gradient-sized buffer ({sum(p.numel() for p in make(args.config, 2, device, False)[0].parameters()):,} "
            f"floats) takes {1e3 * many['allreduce']:.2f} ms, {100 * many['allreduce'] / many['step']:.1f}% of the "
            f"DDP step (DDP overlaps it with the backward pass in buckets)\n\n" + "\n".join(lines))
    if agree:
        body += (f"\n\nThe same run (digits, 3 epochs, fp32, no dropout) on 1 and {args.nproc} processes: largest "
                 f"difference of any metrics.csv value {agree['metric']:.2e}, of any final weight {agree['weight']:.2e}")
    print(body)
    if not args.no_record:
        append_results("Data-parallel training (benchmarks/distributed.py)", command_line(), body)


if __name__ == "__main__":
    main()
