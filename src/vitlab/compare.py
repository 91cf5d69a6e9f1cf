"""``vitlab compare``: several run folders side by side, the config fields that differ, their
results, and one figure of their validation curves."""

from __future__ import annotations

import glob
from dataclasses import dataclass, fields
from pathlib import Path

from . import metrics, report
from .checkpoint import CONFIG
from .config import OUTPUT_FIELDS, RUNTIME_FIELDS, TrainConfig
from .errors import VitlabError
from .fileio import atomic_write_text, printable, read_json
from .rundir import METRICS, RESULTS_JSON, run_config_problem

IGNORED = RUNTIME_FIELDS + OUTPUT_FIELDS  # where and how fast a run computed and wrote, not what it trained


MAX_RESULTS_BYTES = 1 << 20  # results.json: a 100-class confusion matrix is ~50 KB
PLOTTED = 20  # runs drawn in the figure (the best by validation accuracy); the table lists all


@dataclass
class RunSummary:
    path: Path
    cfg: TrainConfig
    rows: list[dict]
    results: dict | None  # the fields of a finished run's results.json that compare shows, checked

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
            return self.results["best_val_acc"]
        return max(map(metrics.best_val, self.rows), default=None)


def expand(patterns: list[str]) -> list[Path]:
    """Paths, with glob patterns expanded (for shells that pass them through quoted)."""
    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") and not Path(pattern).exists() else [pattern]
        out += [Path(m) for m in matches]
    return out


def _number(value, field: metrics.Field) -> float | None:
    """``value`` if it is a real number ``field`` may hold, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if field.valid(value) and value <= 1e12 else None


def read_results(path: Path) -> dict:
    """What compare shows of a results.json (metrics.RESULTS and the test accuracy), each field
    checked; ValueError (naming the field) for a file that is not one vitlab wrote."""
    data = read_json(path, MAX_RESULTS_BYTES)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    test = data.get("results", {}).get("Test", {}) if isinstance(data.get("results"), dict) else None
    given = {f.column: data.get(f.column) for f in metrics.RESULTS}
    given[metrics.TEST_ACC.column] = test.get("accuracy") if isinstance(test, dict) else test
    checked = {}
    for field in (*metrics.RESULTS, metrics.TEST_ACC):
        value = given[field.column]
        checked[field.column] = _number(value, field)
        if checked[field.column] is None and value is not None:
            raise ValueError(f"its {field.column} is {str(value)[:40]!r}")
    return checked


def load_run(path: Path, warn=print) -> RunSummary | None:
    """The run at ``path``, or None when it is not a run folder vitlab can read (saying why,
    when it has a config.yaml)."""
    if not (path / CONFIG).exists():
        return None
    problems: list[str] = []
    try:
        problem = run_config_problem(path / CONFIG)
        if problem is not None:
            raise VitlabError(problem)
        cfg = TrainConfig.load_yaml(path / CONFIG).validate()
        rows = report.read_metrics(path / METRICS, problems)
    except VitlabError as e:
        warn(f"skipped {printable(path)}: {e}")
        return None
    for p in problems:
        warn(f"note: {p}")
    results = None
    if (path / RESULTS_JSON).exists():
        try:
            results = read_results(path / RESULTS_JSON)
        except (OSError, ValueError) as e:
            warn(f"note: {printable(path / RESULTS_JSON)} is not a vitlab results file "
                 f"({e.strerror if isinstance(e, OSError) and e.strerror else e}); the run is shown as unfinished")
    return RunSummary(path, cfg, rows, results)


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
        test = res.get(metrics.TEST_ACC.column)
        dataset = r.cfg.dataset + ("" if r.cfg.dataset == main_dataset else " (other dataset)")
        seconds = res.get("train_seconds")
        cells = [printable(r.path.name), dataset, r.status, *(_fmt(getattr(r.cfg, f)) for f in diff), _fmt(r.best_val()),
                 _fmt(test), f"{len(r.rows)}/{r.cfg.epochs}", "–" if seconds is None else f"{seconds:.0f} s",
                 "–" if res.get("images_per_second") is None else f"{res['images_per_second']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[RunSummary], path: Path) -> None:
    """The validation curves of at most PLOTTED runs (the best by validation accuracy), so that
    the figure and its legend stay readable (and its file small) whatever the number of runs."""
    fig = report.new_figure(11, 4)
    ax_acc, ax_loss = fig.subplots(1, 2)
    shown = sorted(runs, key=lambda r: -(r.best_val() or 0.0))[:PLOTTED]
    if len(shown) < len(runs):
        fig.suptitle(f"the {len(shown)} runs of {len(runs)} with the best validation accuracy", fontsize=9)
    for r in shown:
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
        summary = load_run(path, warn)
        if summary is not None:
            runs.append(summary)
        elif not (path / CONFIG).exists():  # the others were named with their reason
            skipped.append(path)
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
