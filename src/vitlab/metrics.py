"""The numbers a run records, each defined once: its metrics.csv column (also its key in a
row), its TensorBoard tag, how the console shows it, and what values it may take. The CSV
writer and reader, TensorBoard, the epoch's console line, ``vitlab compare`` and the report's
results.json all read these tables; nothing else spells the names."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Field:
    column: str  # metrics.csv column, results.json key
    tag: str | None  # TensorBoard scalar tag
    kind: str  # "count", "lr", "loss", "accuracy", "seconds", "rate"

    def valid(self, value: float) -> bool:
        """Whether ``value`` is one this field can hold."""
        if not math.isfinite(value):
            return False
        if self.kind == "count":
            return value.is_integer() and 0 <= value <= 1 << 53
        if self.kind == "accuracy":
            return 0 <= value <= 1
        return value >= 0


# One row of metrics.csv per epoch (the EMA columns only in runs with --ema-decay).
EPOCH = (Field("epoch", "epoch", "count"), Field("step", None, "count"), Field("lr", "train/epoch_lr", "lr"),
         Field("train_loss", "train/loss", "loss"), Field("train_acc", "train/accuracy", "accuracy"),
         Field("val_loss", "val/loss", "loss"), Field("val_acc", "val/accuracy", "accuracy"))
EMA = (Field("val_ema_loss", "val_ema/loss", "loss"), Field("val_ema_acc", "val_ema/accuracy", "accuracy"))
# The training clock at the epoch's end, its validation and checkpoints included (earlier
# sessions of a resumed run too): accuracy against time, for time-to-accuracy (benchmarks/speedrun.py).
# Last, and absent from the files of runs started before it was recorded.
CLOCK = (Field("seconds", "time/train_seconds", "seconds"),)
COLUMNS = [f.column for f in EPOCH]
EMA_COLUMNS = [f.column for f in EMA]
CLOCK_COLUMNS = [f.column for f in CLOCK]
BY_COLUMN = {f.column: f for f in EPOCH + EMA + CLOCK}
OPTIONAL = (EMA_COLUMNS, CLOCK_COLUMNS)  # the column groups a metrics.csv may have after COLUMNS, in this order

# TensorBoard, per step and per log interval.
STEP_LOSS, STEP_LR, THROUGHPUT = "train/step_loss", "train/lr", "train/images_per_second"

# What results.json holds of a finished run that `vitlab compare` shows, with the values it may take.
RESULTS = (Field("best_val_acc", "hparam/best_val_acc", "accuracy"), Field("train_seconds", None, "seconds"),
           Field("images_per_second", None, "rate"))
TEST_ACC, TEST_LOSS = Field("test_acc", "hparam/test_acc", "accuracy"), Field("test_loss", "hparam/test_loss", "loss")


def best_val(row: dict) -> float:
    """An epoch's best validation accuracy, of the raw weights or their EMA."""
    return max(row["val_acc"], row.get("val_ema_acc", 0.0))


def console_line(row: dict, epochs: int, improved: bool, seconds: float, images: float) -> str:
    """The line a run prints after each epoch."""
    ema = f" | ema val acc {row['val_ema_acc']:.4f}" if "val_ema_acc" in row else ""
    return (f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
            f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}{ema}{' *' if improved else ''}"
            f" | {seconds:.1f}s {images / max(seconds, 1e-9):,.0f} img/s")


# ------------------------------------------------ per-class numbers of a split

def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true class, predicted class) counts, int64 (num_classes, num_classes)."""
    return torch.bincount(labels.long() * num_classes + preds.long(), minlength=num_classes ** 2).view(num_classes, num_classes)


def per_class_recall(confusion: torch.Tensor) -> torch.Tensor:
    """Each class's recall (its images classified as it); their mean is the balanced accuracy,
    which a class imbalance cannot inflate as it inflates accuracy."""
    return confusion.diag().double() / confusion.sum(1).clamp_min(1)


def balanced_accuracy(confusion: torch.Tensor) -> float:
    """The mean recall of the classes that have images (a class absent from a split is left out,
    not counted as missed)."""
    present = confusion.sum(1) > 0
    return float(per_class_recall(confusion)[present].mean()) if present.any() else 0.0
