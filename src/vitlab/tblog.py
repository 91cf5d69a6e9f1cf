"""TensorBoard event files for a run (``<run>/tb/``), written with PyTorch's SummaryWriter.

Every scalar is logged at its optimizer step: per step the train loss and learning rate,
per log interval the throughput, per epoch train / val loss and accuracy (raw and EMA
weights); at the end the figures and the run's hyperparameters with its final metrics
(the HParams view). A resumed run opens its writer with ``purge_step`` at the checkpoint's
step, so TensorBoard drops what the killed process wrote after it and the curves equal an
uninterrupted run's. Without the ``tensorboard`` package (or with ``--no-tensorboard``)
nothing is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class Board:
    """The run's TensorBoard writer (a no-op when disabled)."""

    def __init__(self, run_dir: Path | None, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if enabled and run_dir is not None and available():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge_step, flush_secs=30)

    def steps(self, first_step: int, losses: torch.Tensor, lrs: list[float]) -> None:
        """Per-step train loss (gathered on the device, read here once) and learning rate."""
        if self.writer is None:
            return
        for i, (loss, lr) in enumerate(zip(losses.tolist(), lrs)):
            self.writer.add_scalar("train/step_loss", loss, first_step + i)
            self.writer.add_scalar("train/lr", lr, first_step + i)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def epoch(self, row: dict) -> None:
        if self.writer is None:
            return
        step = row["step"]
        for key, tag in (("train_loss", "train/loss"), ("train_acc", "train/accuracy"), ("val_loss", "val/loss"),
                         ("val_acc", "val/accuracy"), ("val_ema_loss", "val_ema/loss"), ("val_ema_acc", "val_ema/accuracy"),
                         ("lr", "train/epoch_lr")):
            if key in row:
                self.writer.add_scalar(tag, row[key], step)
        self.writer.add_scalar("epoch", row["epoch"], step)

    def figure(self, tag: str, png: Path, step: int) -> None:
        if self.writer is None or not Path(png).is_file():
            return
        from PIL import Image

        with Image.open(png) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def hparams(self, config: dict, metrics: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        flat = {k: (str(v) if isinstance(v, (list, tuple)) or v is None else v) for k, v in config.items()}
        self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".", global_step=step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
