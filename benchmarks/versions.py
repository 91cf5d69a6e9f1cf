"""Two versions of vitlab side by side: a benchmark script of each checkout run on its own
source tree in turn, interleaved, in fresh processes, so that a change of code is compared on
one machine in one sitting (a refactor must show no slowdown beyond noise).

    python benchmarks/versions.py --before /path/to/old/src --rounds 2 -- epoch.py --data-dir DIR
    python benchmarks/versions.py --before /path/to/old/src -- train_step.py --impls vitlab

Each script runs with ``--no-record``; its output's table lines are printed under the version
that produced them, and the whole appended to HISTORY.md (the current page keeps the newest).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import append_results, command_line  # noqa: E402


def run(script: list[str], src: Path) -> list[str]:
    """The script of the checkout ``src`` belongs to (its benchmarks/ beside src/), on that source."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, str(src.parent / "benchmarks" / script[0]), *script[1:], "--no-record"],
                         env=env, check=True, capture_output=True, text=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return list(dict.fromkeys(lines))  # a row printed as it ran and again in the final table: once


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="the src/ folder of the version to compare against")
    p.add_argument("--after", type=Path, default=HERE.parent / "src", help="the src/ folder of this version")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-record", action="store_true")
    p.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS...")
    args = p.parse_args()
    script = [a for a in args.script if a != "--"]
    body = []
    for r in range(args.rounds):
        for name, src in (("before", args.before), ("after", args.after)):
            lines = run(script, src)
            body += [f"round {r + 1}, {name} ({src}):", "", *lines, ""]
            print("\n".join(body[-len(lines) - 3:]), flush=True)
    if not args.no_record:
        append_results(f"Two versions side by side: {script[0]} (benchmarks/versions.py)", command_line(), "\n".join(body))


if __name__ == "__main__":
    main()
