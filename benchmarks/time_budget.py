"""Does ``--time-budget`` keep its word? Each budget is a whole ``vitlab train`` command,
timed from outside (process start to exit); the table gives the wall time against the
budget, the steps and epochs vitlab chose (the last one partial where the steps are not whole
epochs), and the test accuracy, beside the preset run with its
own fixed epochs.

    python benchmarks/time_budget.py --preset quick-mnist --data-dir DIR --budgets 2m 5m 10m
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, command_line, machine  # noqa: E402

from vitlab.budget import parse_duration  # noqa: E402


def run(args: list[str], out: Path, name: str) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "vitlab", "train", "--out", str(out), "--name", name, "--quiet", *args]
    t = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.monotonic() - t
    return wall, json.loads((out / name / "results.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick-mnist")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--budgets", nargs="+", default=["2m", "5m", "10m"])
    p.add_argument("--no-fixed", action="store_true", help="skip the run with the preset's own epochs")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    out = Path(tempfile.mkdtemp())
    base = ["--preset", args.preset, "--data-dir", args.data_dir, "--no-download"]
    lines = ["| command | budget | wall time | of the budget | epochs (steps) | test accuracy |", "|---|---|---|---|---|---|"]
    for budget in args.budgets:
        wall, res = run([*base, "--time-budget", budget], out, f"b{budget}")
        limit = parse_duration(budget)
        lines.append(f"| `--preset {args.preset} --time-budget {budget}` | {limit:.0f} s | {wall:.1f} s | "
                     f"{100 * wall / limit:.1f}% | {res['epochs']} ({res['time_budget']['steps']}) | "
                     f"{res['results']['Test']['accuracy']:.4f} |")
        print(lines[-1], flush=True)
    if not args.no_fixed:
        wall, res = run(base, out, "fixed")
        lines.append(f"| `--preset {args.preset}` (its own epochs) | – | {wall:.1f} s | – | {res['epochs']} | "
                     f"{res['results']['Test']['accuracy']:.4f} |")
        print(lines[-1], flush=True)
    body = "Wall time: the whole command, measured from outside (Python start-up and imports included).\n\n" + "\n".join(lines)
    print(f"machine: {machine()}\n{body}")
    if not args.no_record:
        append_results("Training to a time budget (benchmarks/time_budget.py)", command_line(), body)


if __name__ == "__main__":
    main()
