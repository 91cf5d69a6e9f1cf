"""``vitlab compare``: several run folders side by side, the config fields that differ, their
results, and one figure of their validation curves."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, fields
from pathlib import Path

from . import report
from .config import TrainConfig
from .errors import VitlabError
from .fileio import atomic_write_text, printable, read_bounded

# Fields that say where a run wrote or how often it logged, not what it trained.
IGNORED = ("out", "name", "data_dir", "download", "log_every", "checkpoint_every", "tensorboard", "threads", "device",
           "eval_batch_size")


@dataclass
class RunSummary:
    path: Path
    cfg: TrainConfig
    rows: list[dict]
    results: dict | None  # results.json of a finished run

    @property
    def finished(self) -> bool:
        return self.results is not None

    @property
    def status(self) -> str:
        if self.finished:
            return "finished"
        return f"unfinished ({len(self.rows)} of {self.cfg.epochs} epochs)"

    def best_val(self) -> float | None:
        if self.results and self.results.get("best_val_acc") is not None:
            return float(self.results["best_val_acc"])
        accs = [max(r["val_acc"], r.get("val_ema_acc", 0.0)) for r in self.rows]
        return max(accs) if accs else None


def expand(patterns: list[str]) -> list[Path]:
    """Paths, with glob patterns expanded (for shells that pass them through quoted)."""
    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") and not Path(pattern).exists() else [pattern]
        out += [Path(m) for m in matches]
    return out


def load_run(path: Path) -> RunSummary | None:
    if not (path / "config.yaml").is_file():
        return None
    try:
        cfg = TrainConfig.load_yaml(path / "config.yaml")
        rows = report.read_metrics(path / "metrics.csv")
    except (VitlabError, ValueError, KeyError, OSError):
        return None
    results = None
    if (path / "results.json").is_file():
        try:
            results = json.loads(read_bounded(path / "results.json", 64 << 20))
        except (OSError, ValueError):
            results = None
    return RunSummary(path, cfg, rows, results if isinstance(results, dict) else None)


def differing_fields(runs: list[RunSummary]) -> list[str]:
    return [f.name for f in fields(TrainConfig) if f.name not in IGNORED
            and len({repr(getattr(r.cfg, f.name)) for r in runs}) > 1]


def _fmt(v) -> str:
    return "–" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def table(runs: list[RunSummary]) -> str:
    diff = differing_fields(runs)
    main_dataset = max({r.cfg.dataset for r in runs}, key=lambda d: sum(r.cfg.dataset == d for r in runs))
    head = ["run", "dataset", "status", *diff, "best val acc", "test acc", "epochs", "training time", "images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        res = r.results or {}
        test = res.get("results", {}).get("Test", {}).get("accuracy")
        dataset = r.cfg.dataset + ("" if r.cfg.dataset == main_dataset else " (other dataset)")
        seconds = res.get("train_seconds")
        cells = [printable(r.path.name), dataset, r.status, *(_fmt(getattr(r.cfg, f)) for f in diff), _fmt(r.best_val()),
                 _fmt(test), f"{len(r.rows)}/{r.cfg.epochs}", "–" if seconds is None else f"{seconds:.0f} s",
                 "–" if res.get("images_per_second") is None else f"{res['images_per_second']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[RunSummary], path: Path) -> None:
    fig = report.new_figure(11, 4)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for r in runs:
        if not r.rows:
            continue
        epochs = [row["epoch"] for row in r.rows]
        label = printable(r.path.name) + ("" if r.finished else " (unfinished)")
        line, = ax_acc.plot(epochs, [row["val_acc"] for row in r.rows], "o-", ms=2.5, label=label)
        if "val_ema_acc" in r.rows[0]:
            ax_acc.plot(epochs, [row["val_ema_acc"] for row in r.rows], "--", color=line.get_color(), lw=1)
        ax_loss.plot(epochs, [row["val_loss"] for row in r.rows], "o-", ms=2.5, color=line.get_color(), label=label)
    for ax, name in ((ax_acc, "val accuracy (dashed: EMA weights)"), (ax_loss, "val loss")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7)
    report.save_png(fig, path)


def compare(patterns: list[str], out: Path, warn=print) -> tuple[str, Path, Path]:
    """The comparison of the runs named by ``patterns``: (Markdown, its file, the figure)."""
    runs, skipped = [], []
    for path in expand(patterns):
        summary = load_run(path)
        (runs if summary is not None else skipped).append(summary or path)
    if skipped:
        warn(f"skipped {len(skipped)} folder(s) that are not vitlab runs: " + ", ".join(printable(p) for p in skipped[:5]))
    if not runs:
        raise VitlabError("no vitlab run folders among " + ", ".join(patterns))
    text = table(runs)
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / "comparison.md", out / "comparison.png"
    atomic_write_text(md, f"# {len(runs)} runs\n\n{text}\n\n![validation curves](comparison.png)\n")
    plot(runs, png)
    return text, md, png
