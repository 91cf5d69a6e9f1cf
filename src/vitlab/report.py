"""What a run leaves for people to read: metrics.csv, results.md, loss_curve.png, predictions.png.

Figures are drawn with matplotlib's object API on an Agg canvas of their own, never
through pyplot: writing a plot does not touch the backend a notebook or an application
has chosen.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import metrics
from .metrics import per_class_recall
from .errors import DataError
from .fileio import NotRegularFile, append_synced, atomic_write_bytes, atomic_write_text, printable, read_bounded

METRIC_FIELDS = metrics.COLUMNS
HEADERS = [METRIC_FIELDS + ema + clock for ema in ([], metrics.EMA_COLUMNS) for clock in ([], metrics.CLOCK_COLUMNS)]


# -------------------------------------------------------------------- metrics

MAX_METRICS_BYTES = 8 << 20  # a row is ~150 bytes: 50,000 epochs
MAX_METRICS_ROWS = 100_000  # --epochs' own limit


def read_metrics(path: Path, problems: list[str] | None = None) -> list[dict[str, float]]:
    """The rows of a run's metrics.csv ([] when there is none), each checked: whole, increasing
    epochs and steps, finite losses >= 0, accuracies in [0, 1]. The first line that is not such
    a row ends the file (a crash tears the last line of a log that is appended to); what it
    was is added to ``problems``. A file that is not vitlab's metrics (other columns, not a
    regular file, over MAX_METRICS_BYTES) is a DataError."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = read_bounded(path, MAX_METRICS_BYTES).decode("utf-8")
    except (OSError, ValueError) as e:
        raise DataError(f"{printable(path)}: cannot read ({e.strerror if isinstance(e, OSError) and e.strerror else e})") from None
    lines = csv.reader(io.StringIO(text))
    header = next(lines, None)
    if header not in HEADERS:
        raise DataError(f"{printable(path)}: not a vitlab metrics file (columns {header})")
    rows: list[dict[str, float]] = []
    for number, line in enumerate(lines, start=2):
        why = _row_problem(line, header, rows[-1] if rows else None)
        if why is None and len(rows) >= MAX_METRICS_ROWS:
            why = f"more than {MAX_METRICS_ROWS:,} rows"
        if why is not None:
            if problems is not None and not (number == len(text.splitlines()) and not text.endswith("\n")):
                problems.append(f"{printable(path)} line {number}: {why}; the rows before it are used")
            break
        rows.append({k: (int(float(v)) if k in ("epoch", "step") else float(v)) for k, v in zip(header, line)})
    return rows


def _row_problem(line: list[str], header: list[str], previous: dict | None) -> str | None:
    """Why ``line`` is not the row that follows ``previous``, or None."""
    if len(line) != len(header):
        return f"{len(line)} values for {len(header)} columns"
    try:
        values = {k: float(v) for k, v in zip(header, line)}
    except ValueError:
        return "a value that is not a number"
    for k, v in values.items():
        field = metrics.BY_COLUMN[k]
        if not field.valid(v):
            return (f"{k} is {v}" if not math.isfinite(v) else f"{k} {v} is not an accuracy"
                    if field.kind == "accuracy" else f"{k} must be a whole number" if field.kind == "count"
                    else f"{k} {v} is negative")
    if values["epoch"] != (previous["epoch"] + 1 if previous else 1) or (previous and values["step"] < previous["step"]):
        return "epochs must count up from 1 and steps may not go back"
    return None


def _fields(rows: list[dict]) -> list[str]:
    """The columns of ``rows``: what the first row has (a run resumed from a file without an
    optional column keeps writing without it)."""
    return METRIC_FIELDS + [k for group in metrics.OPTIONAL for k in group if rows and k in rows[0]]


def _line(row: dict, fields: list[str]) -> str:
    return ",".join(_fmt(row[k]) for k in fields)


def write_metrics(path: Path, rows: list[dict]) -> None:
    fields = _fields(rows)
    atomic_write_text(path, "\n".join([",".join(fields)] + [_line(r, fields) for r in rows]) + "\n")


def append_metrics(path: Path, rows: list[dict]) -> None:
    """metrics.csv after ``rows[-1]`` was added: one appended line (the cost of an epoch's row
    does not grow with the run), the whole file when it starts, or when ``path`` is not a
    file of vitlab's own (a link: replaced, never written through)."""
    if len(rows) <= 1 or not Path(path).is_file():
        write_metrics(path, rows)
        return
    try:
        append_synced(path, (_line(rows[-1], _fields(rows)) + "\n").encode())
    except NotRegularFile:
        write_metrics(path, rows)


def _fmt(v) -> str:
    return str(v) if isinstance(v, int) else repr(float(v))


# -------------------------------------------------------------------- results

def code_version() -> str:
    """'vitlab X.Y.Z', plus the git commit when vitlab runs from a checkout (read from
    .git's files: no program is started), plus a digest of the package's own files: a
    commit does not say whether the tree had uncommitted changes, the digest does."""
    from . import __version__

    text = f"vitlab {__version__}"
    commit = _git_commit(Path(__file__).resolve().parents[2])
    return text + (f", git commit {commit}" if commit else "") + f", source sha256 {source_digest()}"


def source_digest(package: Path = Path(__file__).resolve().parent) -> str:
    """sha256 (first 12 hex digits) over the names and bytes of the package's .py (its
    subpackages' too) and preset files."""
    h = hashlib.sha256()
    for f in sorted([*package.rglob("*.py"), *package.glob("presets/*.yaml")]):
        h.update(f.relative_to(package).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _git_commit(repo: Path) -> str | None:
    git = repo / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12] or None
        ref = head[5:]
        common = Path((git / "commondir").read_text().strip()) if (git / "commondir").is_file() else Path(".")
        for base in (git, (git / common).resolve()):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()[:12]
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0][:12]
    except (OSError, IndexError, ValueError):
        pass
    return None


def results_table(results: dict[str, tuple[float, float]]) -> str:
    """Markdown table: rows Train / Val / Test, columns Loss / Accuracy."""
    lines = ["| Split | Loss | Accuracy |", "|---|---|---|"]
    for split, (loss, acc) in results.items():
        lines.append(f"| {split} | {loss:.4f} | {acc:.4f} |")
    return "\n".join(lines)


def per_class_table(confusion: torch.Tensor, classes: Sequence[str]) -> str:
    """Markdown: accuracy (recall) of each class with its count and most frequent confusion;
    with more than 20 classes, the worst first."""
    n = confusion.sum(1)
    acc = per_class_recall(confusion)
    order = list(range(len(classes))) if len(classes) <= 20 else acc.argsort().tolist()
    lines = ["| class | test images | accuracy | most often taken for |", "|---|---|---|---|"]
    for c in order:
        off = confusion[c].clone()
        off[c] = -1
        other = int(off.argmax())
        mistaken = f"{classes[other]} ({int(confusion[c, other])})" if int(confusion[c, other]) > 0 else "–"
        lines.append(f"| {classes[c]} | {int(n[c])} | {float(acc[c]):.4f} | {mistaken} |")
    return "\n".join(lines)


def write_results(path: Path, title: str, results: dict[str, tuple[float, float]], facts: dict[str, str],
                  sections: dict[str, str] | None = None) -> None:
    body = [f"# {title}", "", results_table(results), ""]
    body += [f"- **{k}**: {v}" for k, v in facts.items()]
    for heading, text in (sections or {}).items():
        body += ["", f"## {heading}", "", text]
    atomic_write_text(path, "\n".join(body) + "\n")


def write_json(path: Path, data: dict) -> None:
    import json

    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


# -------------------------------------------------------------------- figures

def new_figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path, dpi: int = 110, tight: bool = True) -> None:
    """``tight``: trim the margins to what was drawn (a second drawing of the figure). zlib at
    level 3: half the time of the default 6 for files 13% larger (a heatmap grid, measured)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None, pil_kwargs={"compress_level": 3})
    atomic_write_bytes(path, buf.getvalue())


@dataclass
class Tile:
    """One image of a tile grid: uint8 (C, H, W) pixels, a heatmap (h, w) to lay over them or
    None, a line above and a line below (with their colours), and a red frame for a mistake."""

    image: torch.Tensor
    above: str
    below: str
    above_color: str = "black"
    below_color: str = "black"
    mistake: bool = False
    heat: torch.Tensor | None = None


def tile_pixels(tile: Tile, side: int) -> np.ndarray:
    """The tile as (side, side, 3) floats in [0, 1]: each pixel a sharp square (nearest), the
    heatmap smooth (bilinear), min-max scaled and coloured with jet at 45% over the image."""
    img = tile.image.float().div(255.0)
    img = img.expand(3, -1, -1) if img.shape[0] == 1 else img
    pixels = torch.nn.functional.interpolate(img[None], size=(side, side), mode="nearest-exact")[0]
    if tile.heat is not None:
        from matplotlib import colormaps

        heat = torch.nn.functional.interpolate(tile.heat.float()[None, None], size=(side, side), mode="bilinear",
                                               align_corners=False)[0, 0]
        heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
        jet = torch.from_numpy(colormaps["jet"](heat.numpy())[..., :3]).float().permute(2, 0, 1)
        pixels = 0.55 * pixels + 0.45 * jet
    return pixels.permute(1, 2, 0).clamp(0, 1).numpy()


def plot_tiles(tiles: Sequence[Tile], path: Path, title: str, cols: int = 8, cell: tuple[float, float] = (1.45, 1.7),
               sizes: tuple[float, float, float] = (7, 6, 9), title_lines: int = 1, dpi: int = 110) -> None:
    """A grid of images, each with a line above and below, drawn as one picture on one axis:
    32 small axes took four times as long to draw (0.56 s against 0.14 s), at every run's end."""
    from matplotlib.patches import Rectangle

    rows = max(1, math.ceil(len(tiles) / cols))
    cw, ch = round(cell[0] * dpi), round(cell[1] * dpi)
    side = min(cw - 10, ch - round(0.5 * dpi))  # room for a line of text above and below
    canvas = np.ones((rows * ch, cols * cw, 3), dtype=np.float32)
    band = 0.2 + 0.15 * title_lines  # inches above the grid for the title
    fig = new_figure(cols * cell[0], rows * cell[1] + band)
    ax = fig.add_axes((0, 0, 1, rows * cell[1] / (rows * cell[1] + band)))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        x0, y0 = c * cw + (cw - side) // 2, r * ch + (ch - side) // 2
        canvas[y0:y0 + side, x0:x0 + side] = tile_pixels(tile, side)
        ax.text(x0 + side / 2, y0 - 3, tile.above, fontsize=sizes[0], color=tile.above_color, ha="center", va="bottom")
        ax.text(x0 + side / 2, y0 + side + 3, tile.below, fontsize=sizes[1], color=tile.below_color, ha="center",
                va="top")
        if tile.mistake:
            ax.add_patch(Rectangle((x0 - 1.5, y0 - 1.5), side + 2, side + 2, fill=False, edgecolor="tab:red",
                                   linewidth=2))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(title, fontsize=sizes[2], y=1 - 0.08 / (rows * cell[1] + band), va="top")
    save_png(fig, path, dpi=dpi, tight=False)


def plot_curves(rows: Sequence[dict[str, float]], path: Path, title: str) -> None:
    """Train and val loss (left) and accuracy (right) per epoch."""
    epochs = [r["epoch"] for r in rows]
    fig = new_figure(10, 3.8)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train (augmented, label smoothing)", ms=3)
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "o-", label="val", ms=3)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_acc.plot(epochs, [r["train_acc"] for r in rows], "o-", label="train (augmented)", ms=3)
    ax_acc.plot(epochs, [r["val_acc"] for r in rows], "o-", label="val", ms=3)
    if rows and "val_ema_acc" in rows[0]:
        ax_acc.plot(epochs, [r["val_ema_acc"] for r in rows], "o-", label="val (EMA weights)", ms=3)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_png(fig, path)


def show_image(ax, image: torch.Tensor) -> None:
    """A uint8 (C, H, W) image on an axis, grey or colour, pixels as they are."""
    img = image.permute(1, 2, 0).cpu().numpy()
    ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
              interpolation="nearest")


def plot_predictions(images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, probs: torch.Tensor,
                     classes: Sequence[str], path: Path, title: str, cols: int = 8) -> None:
    """A grid of test images titled 'pred (p)' with the true label below; mistakes in red."""
    tiles = []
    for i in range(len(images)):
        right = int(preds[i]) == int(labels[i])
        tiles.append(Tile(images[i], f"{short(classes[int(preds[i])])} ({float(probs[i]):.2f})",
                          f"true: {short(classes[int(labels[i])])}", "tab:green" if right else "tab:red",
                          "black" if right else "tab:red", mistake=not right))
    plot_tiles(tiles, path, title + "   (red: mistakes)", cols)


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (each true class's share of predictions), classes
    sorted by accuracy, best first; names on the axes where they fit, a log colour scale so
    that rare confusions stay visible at 100 classes."""
    from matplotlib.colors import LogNorm

    n = len(classes)
    rows = confusion.double() / confusion.sum(1, keepdim=True).clamp_min(1)
    order = (-rows.diag()).argsort()
    shown = rows[order][:, order].numpy()
    size = min(16.0, 3.0 + 0.12 * n)
    fig = new_figure(size + 1.5, size)
    ax = fig.subplots()
    floor = 1.0 / max(1.0, float(confusion.sum(1).max()))
    im = ax.imshow(np.clip(shown, floor, 1.0), cmap="viridis", norm=LogNorm(vmin=floor, vmax=1.0), interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's test images")
    names = [short(classes[int(i)], 16) for i in order]
    if n <= 50:
        ax.set_xticks(range(n), names, rotation=90, fontsize=max(4, 9 - n // 10))
        ax.set_yticks(range(n), names, fontsize=max(4, 9 - n // 10))
    else:
        step = max(1, n // 50)
        ax.set_xticks(range(0, n, step), names[::step], rotation=90, fontsize=4)
        ax.set_yticks(range(0, n, step), names[::step], fontsize=4)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (sorted by accuracy, best first)")
    ax.set_title(f"{title}: confusion on the test set ({int(confusion.sum()):,} images)", fontsize=9)
    save_png(fig, path)


def short(name: str, limit: int = 12) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
