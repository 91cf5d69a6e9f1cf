"""TensorBoard event files for a run (``<run>/tb/``), written with PyTorch's SummaryWriter.

Every scalar is logged at its optimizer step: per step the train loss and learning rate,
per log interval the throughput, per epoch train / val loss and accuracy (raw and EMA
weights); at the end the figures and the run's hyperparameters with its final metrics
(the HParams view). A resumed run opens its writer with ``purge_step`` at the checkpoint's
step (0 for a run restarted from its beginning), so TensorBoard drops what the killed
process wrote after it and the curves equal an uninterrupted run's. The report's events
(figures and hyperparameters) are one file, written whole under a temporary name and
renamed to :data:`REPORT_EVENTS`: a report written again (a finished run resumed, or one
killed while reporting) replaces it instead of logging everything twice. Without the
``tensorboard`` package (or with ``--no-tensorboard``) nothing is written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from . import metrics
from .errors import ConfigError
from .fileio import fsync_dir, printable, temp_dir


def available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


FOLDER = "tb"
# Event files are read in name order; this name sorts after every timestamped one (until 2286).
REPORT_EVENTS = "events.out.tfevents.9999999999.vitlab-report"


class Board:
    """The run's TensorBoard writer (a no-op when disabled)."""

    def __init__(self, run_dir: Path | None, enabled: bool, purge_step: int | None = None):
        self.writer = None
        self.folder = Path(run_dir) / FOLDER if run_dir is not None else None
        if enabled and run_dir is not None and available():
            from torch.utils.tensorboard import SummaryWriter

            if self.folder.is_symlink():
                raise ConfigError(f"{printable(self.folder)} is a symbolic link; vitlab never writes through a link")
            self.writer = SummaryWriter(str(self.folder), purge_step=purge_step, flush_secs=30)

    def steps(self, first_step: int, losses: torch.Tensor, lrs: list[float]) -> None:
        """Per-step train loss (gathered on the device, read here once) and learning rate."""
        if self.writer is None:
            return
        for i, (loss, lr) in enumerate(zip(losses.tolist(), lrs)):
            self.writer.add_scalar(metrics.STEP_LOSS, loss, first_step + i)
            self.writer.add_scalar(metrics.STEP_LR, lr, first_step + i)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def epoch(self, row: dict) -> None:
        if self.writer is None:
            return
        for field in metrics.EPOCH + metrics.EMA + metrics.CLOCK:
            if field.tag is not None and field.column in row:
                self.writer.add_scalar(field.tag, row[field.column], row["step"])

    def report(self, figures: dict[str, Path], config: dict, final: dict[str, float], step: int) -> None:
        """The run's figures (PNG files it wrote) and hyperparameters with its final metrics, as one
        event file that replaces the one an earlier report wrote."""
        if self.writer is None:
            return
        from PIL import Image
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        tmp = temp_dir(self.folder, ".report.")
        try:
            writer = SummaryWriter(str(tmp))
            for tag, png in figures.items():
                if Path(png).is_file():
                    with Image.open(png) as im:
                        writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")
            flat = {k: (str(v) if isinstance(v, (list, tuple)) or v is None else v) for k, v in config.items()}
            tagged = {f"hparam/{k}": v for k, v in final.items()}
            for summary in hparams(flat, tagged):
                writer.file_writer.add_summary(summary, step)
            for k, v in tagged.items():
                writer.add_scalar(k, v, step)
            writer.close()
            (events,) = [p for p in tmp.iterdir() if "tfevents" in p.name]
            os.replace(events, self.folder / REPORT_EVENTS)
            fsync_dir(self.folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
