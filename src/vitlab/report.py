"""What a run leaves for people to read: results.md, loss_curve.png, predictions.png."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .checkpoint import atomic_write_bytes, atomic_write_text  # noqa: E402

METRIC_FIELDS = ["epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc"]


def read_metrics(path: Path) -> list[dict[str, float]]:
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def results_table(results: dict[str, tuple[float, float]]) -> str:
    """Markdown table: rows Train / Val / Test, columns Loss / Accuracy."""
    lines = ["| Split | Loss | Accuracy |", "|---|---|---|"]
    for split, (loss, acc) in results.items():
        lines.append(f"| {split} | {loss:.4f} | {acc:.4f} |")
    return "\n".join(lines)


def write_results(path: Path, title: str, results: dict[str, tuple[float, float]], facts: dict[str, str]) -> None:
    body = [f"# {title}", "", results_table(results), ""]
    body += [f"- **{k}**: {v}" for k, v in facts.items()]
    atomic_write_text(path, "\n".join(body) + "\n")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_curves(rows: Sequence[dict[str, float]], path: Path, title: str) -> None:
    """Train and val loss (left) and accuracy (right) per epoch."""
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
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
    atomic_write_bytes(path, _png(fig))


def plot_predictions(images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, probs: torch.Tensor,
                     classes: Sequence[str], path: Path, title: str, cols: int = 8) -> None:
    """A grid of test images titled 'pred (p)' with the true label below; mistakes in red."""
    n = len(images)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.45, rows * 1.7))
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        img = images[i].permute(1, 2, 0).cpu().numpy()
        ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  interpolation="nearest")
        right = int(preds[i]) == int(labels[i])
        color = "tab:green" if right else "tab:red"
        ax.set_title(f"{_short(classes[int(preds[i])])} ({float(probs[i]):.2f})", fontsize=7, color=color)
        ax.text(0.5, -0.1, f"true: {_short(classes[int(labels[i])])}", fontsize=6, ha="center", va="top",
                transform=ax.transAxes, color="black" if right else "tab:red")
        if not right:
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color("tab:red")
                spine.set_linewidth(2)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title + "   (red: mistakes)", fontsize=9)
    atomic_write_bytes(path, _png(fig))


def _short(name: str, limit: int = 12) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
