"""Time to accuracy, measured like a speedrun: a preset trained on several seeds, each run's
validation accuracy against its training clock at every epoch (metrics.csv's ``seconds``),
the time each reached each target, its test accuracy and the whole command's wall time;
the mean and spread over seeds, printed, appended to HISTORY.md, and drawn as one plot
(accuracy against minutes, a line per seed, the targets marked).

    python benchmarks/speedrun.py fast-cifar10 --data-dir /work/data --seeds 0 1 2 --targets 0.75 0.8
    python benchmarks/speedrun.py fast-cifar10 --data-dir /work/data --seeds 0 1 2 --budget 5m \\
        --label muon --set optimizer=muon                      # one arm of an A/B at a short budget
    python benchmarks/speedrun.py fast-cifar10 --data-dir /work/data --seeds 0 --baseline --budget 26m \\
        --against fast-cifar10-muon-15ep       # the conventional loop, and its time to each accuracy against vitlab's

Every run is a real ``vitlab train`` command in its own process, run while nothing else runs.
The rate of a 2048x2048 bf16 matrix product (best of 20) is measured before each run: the
targets' time limits are quoted for a given rate, and a claim holds for the machine kind it
was measured on. The series is resumable: a seed whose folder holds its record (speedrun.json,
written last) is read, not run again (``--fresh`` runs it again), so a long series survives an
interruption.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish  # noqa: E402

from vitlab.devices import matmul_peak  # noqa: E402
from vitlab.metrics import best_val  # noqa: E402
from vitlab.report import code_version, read_metrics  # noqa: E402

RUNS = Path(__file__).with_name("speedruns")  # run folders (git-ignored) and plots


def bf16_rate() -> float:
    """GFLOP/s of a 2048x2048 bf16 matrix product on this CPU, best of 20 after warm-up."""
    return matmul_peak(torch.device("cpu"), torch.bfloat16, n=2048, reps=20) / 1e9


def run_seed(preset: str, seed: int, args: argparse.Namespace, folder: Path) -> dict:
    """One seed: the command, its wall time, the machine's rate beside it, and what the run recorded."""
    if args.baseline:
        record = folder / "speedrun.json"
        if record.is_file() and not args.fresh:
            return json.loads(record.read_text())  # done in an earlier call of the series
        return run_baseline(seed, args, folder, record, bf16_rate())
    flags = ["--preset", preset, "--seed", str(seed), "--data-dir", args.data_dir, "--no-download",
             *(["--time-budget", args.budget] if args.budget else []),
             *[part for kv in args.set for part in flag_args(kv)]]
    return {**train_and_record(flags, folder, args.fresh), "seed": seed}


def train_and_record(flags: list[str], folder: Path, fresh: bool = False) -> dict:
    """``vitlab train FLAGS`` into ``folder`` in its own process: its wall time, the bf16 rate
    measured just before, the test accuracy (and balanced accuracy), the validation curve on the
    training clock; kept in folder/speedrun.json, which a later call reads instead of training."""
    record = folder / "speedrun.json"
    if record.is_file() and not fresh:
        return json.loads(record.read_text())  # done in an earlier call of the series
    rate = bf16_rate()
    cmd = [sys.executable, "-m", "vitlab.cli", "train", *flags, "--out", str(folder.parent), "--name", folder.name,
           "--overwrite", "--quiet"]
    print(f"{folder.name}: {' '.join(cmd[2:])}  (bf16 rate {rate:.0f} GFLOP/s)", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{folder.name} failed:\n{done.stderr[-3000:]}")
    results = json.loads((folder / "results.json").read_text())
    rows = read_metrics(folder / "metrics.csv")
    out = {"wall_s": wall, "bf16_gflops": rate, "test_acc": results["results"]["Test"]["accuracy"],
           "balanced_test_acc": results.get("balanced_test_acc"), "per_class_recall": results.get("per_class_recall"),
           "classes": results.get("classes"),
           "curve": [(r.get("seconds", float("nan")), best_val(r)) for r in rows], "epochs": len(rows),
           "command": " ".join(["vitlab", *cmd[3:]])}
    record.write_text(json.dumps(out))
    return out


def run_baseline(seed: int, args: argparse.Namespace, folder: Path, record: Path, rate: float) -> dict:
    """The conventional loop (benchmarks/conventional.py) for the same budget, in its own process."""
    cmd = [sys.executable, str(Path(__file__).with_name("conventional.py")), "--data-dir", args.data_dir, "--budget",
           args.budget, "--seed", str(seed)]
    print(f"seed {seed}: conventional loop, budget {args.budget} (bf16 rate {rate:.0f} GFLOP/s)", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"seed {seed} failed:\n{done.stderr[-3000:]}")
    out = {**json.loads(done.stdout.strip().splitlines()[-1]), "seed": seed, "bf16_gflops": rate,
           "command": " ".join(cmd[1:])}
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(out))
    return out


def flag_args(setting: str) -> list[str]:
    """'ema_decay=0.999' as ['--ema-decay', '0.999']; 'tta_flip=true' as ['--tta-flip']."""
    field, value = setting.split("=", 1)
    flag = "--" + field.strip().replace("_", "-")
    if value.lower() in ("true", "false"):
        return [flag if value.lower() == "true" else flag.replace("--", "--no-", 1)]
    return [flag, *value.split(",")] if "," in value else [flag, value]


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """Training seconds at the first epoch whose best validation accuracy (raw or EMA) reaches ``target``."""
    return next((s for s, acc in curve if acc >= target), None)


def best_acc(run: dict) -> float:
    """A run's best validation accuracy (raw or EMA) over its curve."""
    return max(acc for _, acc in run["curve"])


def mean_std(values: list[float], places: int | None = None) -> str:
    """'mean ± std'; accuracies (all <= 1) to 4 places and seconds to whole ones unless ``places`` says."""
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    places = (4 if max(values) <= 1 else 0) if places is None else places
    return f"{statistics.mean(values):.{places}f} ± {sd:.{places}f}"


def table(runs: list[dict], targets: list[float]) -> str:
    head = ["seed", "epochs", "test acc", "best val acc", *[f"s to val {t:g}" for t in targets], "wall s",
            "bf16 GFLOP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        reach = [time_to(r["curve"], t) for t in targets]
        lines.append(f"| {r['seed']} | {r['epochs']} | {r['test_acc']:.4f} | {best_acc(r):.4f} | "
                     + " | ".join("-" if s is None else f"{s:.0f}" for s in reach)
                     + f" | {r['wall_s']:.0f} | {r['bf16_gflops']:.0f} |")
    reached = [[time_to(r["curve"], t) for r in runs] for t in targets]
    lines.append(f"| mean ± std (n={len(runs)}) | | {mean_std([r['test_acc'] for r in runs])} | "
                 f"{mean_std([best_acc(r) for r in runs])} | "
                 + " | ".join(f"{mean_std([s for s in ss if s is not None])} ({sum(s is not None for s in ss)}/{len(ss)})"
                              for ss in reached)
                 + f" | {mean_std([r['wall_s'] for r in runs])} | {mean_std([r['bf16_gflops'] for r in runs])} |")
    return "\n".join(lines)


def ema_against_raw(folders: list[Path]) -> str:
    """Where the runs kept an EMA of their weights (each epoch evaluates both): the raw weights'
    and the EMA's best and last validation accuracy, from each run's metrics.csv, a free A/B
    of the EMA (it never changes what trains); '' where a run has none."""
    metrics = [folder / "metrics.csv" for folder in folders]
    if not all(m.is_file() for m in metrics):
        return ""
    runs = [read_metrics(m) for m in metrics]
    if not all(rows and "val_ema_acc" in rows[0] for rows in runs):
        return ""
    acc = lambda rows, key: [float(r[key]) for r in rows]  # noqa: E731
    best = {k: [max(acc(rows, k)) for rows in runs] for k in ("val_acc", "val_ema_acc")}
    last = {k: [acc(rows, k)[-1] for rows in runs] for k in ("val_acc", "val_ema_acc")}
    return (f"\n\nThe EMA against the raw weights (the same runs; each epoch validates both): best validation "
            f"accuracy {mean_std(best['val_acc'])} raw, {mean_std(best['val_ema_acc'])} EMA; last epoch "
            f"{mean_std(last['val_acc'])} raw, {mean_std(last['val_ema_acc'])} EMA.")


def side_by_side(runs: list[dict], other: list[dict], name: str, targets: list[float]) -> str:
    """Time to the same validation accuracy, these runs against ``other`` (another series, read
    from its records: vitlab against the conventional loop is the issue's headline): at each
    target, and at the highest accuracy every run of both series reached, the mean seconds of
    each on its training clock and their ratio; levels a run never reached are left out."""
    common = round(min(best_acc(r) for r in runs + other), 4)
    lines = [f"| validation accuracy | this series: s | {name}: s | ratio (this / {name}) |", "|---|---|---|---|"]
    for level in sorted({*targets, common}):
        ours, theirs = [time_to(r["curve"], level) for r in runs], [time_to(r["curve"], level) for r in other]
        if None in ours or None in theirs:
            continue
        lines.append(f"| {level:.4f}{' (the highest all reached)' if level == common else ''} | {mean_std(ours, 1)} | "
                     f"{mean_std(theirs, 1)} | {statistics.mean(ours) / statistics.mean(theirs):.2f} |")
    return f"\n\nTime to the same accuracy, against `{name}` ({len(other)} runs):\n\n" + "\n".join(lines)


def shown(path: Path) -> str:
    """``path`` as the repository names it (benchmarks/speedruns/...), where it is inside."""
    try:
        return path.resolve().relative_to(Path(__file__).resolve().parents[1]).as_posix()
    except ValueError:
        return str(path)


def plot(runs: list[dict], targets: list[float], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        ax.plot([s / 60 for s, _ in r["curve"]], [a for _, a in r["curve"]], marker=".", label=f"seed {r['seed']}")
    for t in targets:
        ax.axhline(t, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="training minutes", ylabel="validation accuracy (best of raw and EMA)", title=title)
    save_plot(fig, [ax], path)


def save_plot(fig, axes, path: Path) -> None:
    """Grid and legend on each of ``axes``, then ``fig`` written to ``path`` and closed."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", help="--time-budget of each run (screening at a short budget)")
    p.add_argument("--targets", type=float, nargs="+", default=[])
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a vitlab flag for this arm")
    p.add_argument("--label", default="", help="this arm's name in the table and the plot's file")
    p.add_argument("--fresh", action="store_true", help="run every seed again")
    p.add_argument("--baseline", action="store_true",
                   help="run the conventional timm loop (benchmarks/conventional.py) for --budget instead of vitlab")
    p.add_argument("--runs", type=Path, default=RUNS, help="where the run folders and the plot go")
    p.add_argument("--against", metavar="NAME",
                   help="another series' folder under --runs (e.g. fast-cifar10-muon-15ep): time to the same accuracy")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    if args.baseline and not args.budget:
        p.error("--baseline needs --budget: the conventional loop trains for a wall-clock time")
    other = sorted((args.runs / args.against).glob("seed*/speedrun.json")) if args.against else []
    if args.against and not other:
        p.error(f"--against {args.against}: no finished runs (seed*/speedrun.json) under {args.runs / args.against}")
    name = "-".join(filter(None, ["conventional" if args.baseline else args.preset, args.label, args.budget]))
    runs = [run_seed(args.preset, s, args, args.runs / name / f"seed{s}") for s in args.seeds]
    body = table(runs, args.targets) + ema_against_raw([args.runs / name / f"seed{s}" for s in args.seeds])
    if other:
        body += side_by_side(runs, [json.loads(f.read_text()) for f in other], args.against, args.targets)
    picture = args.runs / f"{name}.png"
    plot(runs, args.targets, f"{name} ({len(runs)} seeds)", picture)
    what = (f"the conventional loop: timm VisionTransformer at `{args.preset}`'s size, {runs[0]['recipe']}"
            if args.baseline else f"preset `{args.preset}`")
    text = (f"{what}{' with ' + ', '.join(args.set) if args.set else ''}"
            f"{', time budget ' + args.budget if args.budget else ''}; {code_version()}; times on the run's training "
            f"clock (validation and checkpoints included, start-up and report not: the wall column has the whole "
            f"command); plot: {shown(picture)}\n\n{body}")
    publish(f"Speedrun: {name}", text, record=not args.no_record)


if __name__ == "__main__":
    main()
