"""A time budget on a shared machine: what other busy processes do to a training step with
each thread count, and whether ``--time-budget`` still ends in time.

Part 1 (threads): for 0, 1 and 2 competing processes (each a Python loop that keeps one core
busy), the median training step of the issue's small MNIST model at 1 and at 2 threads,
each in a fresh process. Part 2 (budget): the whole ``vitlab train ... --time-budget`` command
timed from outside, on an idle machine and beside the competitors; with ``--late``, the
competitors start only once the run has made its plan (its config.yaml exists), so that the
run must notice them, re-plan, and fit its report into what is left.

    python benchmarks/busy_machine.py --data-dir DIR [--budget 90s] [--skip-budget] [--late]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, command_line, machine  # noqa: E402

MODEL = ["--dataset", "mnist", "--depth", "2", "--dim", "64", "--heads", "4", "--mlp-dim", "128", "--patch-size", "7"]

STEP_SCRIPT = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from vitlab.model import ViT, ViTConfig
from vitlab.devices import autocast, resolve_precision
cfg = ViTConfig(depth=2, dim=64, heads=4, mlp_dim=128, patch_size=7, image_size=28, channels=1, num_classes=10)
model = ViT(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
amp = resolve_precision("auto", torch.device("cpu"))
x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
times = []
for i in range(int(sys.argv[2])):
    t = time.perf_counter()
    with autocast(torch.device("cpu"), amp):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    opt.zero_grad(); loss.backward(); opt.step()
    times.append(time.perf_counter() - t)
times = sorted(times[20:])
print(json.dumps({"median_ms": 1e3 * times[len(times) // 2], "p90_ms": 1e3 * times[int(0.9 * len(times))],
                  "mean_ms": 1e3 * sum(times) / len(times)}))
"""


@contextmanager
def competitors(n: int):
    """``n`` processes that each keep one core busy (a pure Python loop: no threads of its own)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def step_time(threads: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP_SCRIPT, str(threads), str(steps)], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def budget_run(data_dir: str, budget: str, out: Path, name: str, extra: list[str], late: int = 0
               ) -> tuple[float, dict, str]:
    """The command's wall time, its results.json and what it said of its plan; ``late``
    competitors start once the plan is made."""
    cmd = [sys.executable, "-m", "vitlab", "train", *MODEL, "--data-dir", data_dir, "--no-download", "--out", str(out),
           "--name", name, "--quiet", "--time-budget", budget, *extra]
    t = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while late and not (out / name / "config.yaml").exists() and proc.poll() is None:
        time.sleep(0.05)
    with competitors(late):
        stdout, stderr = proc.communicate()
    wall = time.monotonic() - t
    if proc.returncode:
        raise SystemExit(stderr)
    res = json.loads((out / name / "results.json").read_text())
    said = [line for line in stdout.splitlines() + stderr.splitlines() if "re-planned" in line
            or "thread" in line or "left out" in line]
    return wall, res, "; ".join(said)[:300]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--budget", default="90s")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="numbers of competing processes")
    p.add_argument("--skip-threads", action="store_true")
    p.add_argument("--skip-budget", action="store_true")
    p.add_argument("--budget-args", nargs="*", default=[], help="more flags for the budget runs (e.g. --threads 2)")
    p.add_argument("--late", action="store_true", help="start the competitors once the budget run has made its plan")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    cores = os.cpu_count()
    body = [f"{cores} cores; competitors: Python loops of one core each.", ""]
    if not args.skip_threads:
        body += ["| competing processes | threads | mean step | median step | p90 step |", "|---|---|---|---|---|"]
        for n in args.busy:
            with competitors(n):
                for threads in (1, 2):
                    r = step_time(threads, args.steps)
                    body.append(f"| {n} | {threads} | {r['mean_ms']:.1f} ms | {r['median_ms']:.1f} ms | "
                                f"{r['p90_ms']:.1f} ms |")
                    print(body[-1], flush=True)
        body.append("")
    if not args.skip_budget:
        from vitlab.budget import parse_duration

        limit = parse_duration(args.budget)
        when = "after the plan" if args.late else "from the start"
        body += [f"| competing processes ({when}) | budget | wall time | of the budget | epochs (steps) | test accuracy | "
                 "what the run said |", "|---|---|---|---|---|---|---|"]
        with tempfile.TemporaryDirectory() as tmp:
            for n in args.busy:
                with competitors(0 if args.late else n):
                    wall, res, said = budget_run(args.data_dir, args.budget, Path(tmp), f"busy{n}", args.budget_args,
                                                 n if args.late else 0)
                body.append(f"| {n} | {limit:.0f} s | {wall:.1f} s | {100 * wall / limit:.0f}% | {res['epochs']} "
                            f"({res['time_budget']['steps']}) | {res['results']['Test']['accuracy']:.4f} | {said} |")
                print(body[-1], flush=True)
    text = "\n".join(body)
    print(f"machine: {machine()}\n{text}")
    if not args.no_record:
        append_results("A time budget on a busy machine (benchmarks/busy_machine.py)", command_line(), text)


if __name__ == "__main__":
    main()
