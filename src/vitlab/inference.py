"""Inference: the one path from uint8 images to logits, used by training's validation,
``vitlab evaluate``, ``vitlab predict``, explanations and export checks.

Images stay uint8 until their eval batch is on the device; each batch is normalised
there, run under the autocast the device computes natively, and returned as fp32
logits. Flip averaging (``tta_flip``) is the mean of the logits of each image and
its mirror image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .augment import Normalize
from .checkpoint import CONFIG, CheckpointMeta, build_model, open_checkpoint
from .config import DEFAULT_EVAL_BATCH, TrainConfig
from .data import DatasetSplits, load_dataset
from .errors import CheckpointError, DataError
from .fileio import printable
from .autotune import Choice, choose
from .model import ViT
from .devices import accumulation_dtype, autocast, keep_freed_memory, resolve_device


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, normalize: Normalize, batch_size: int,
                   device: torch.device, amp_dtype: torch.dtype | None, tta_flip: bool = False) -> torch.Tensor:
    """Logits (fp32, on ``device``) for a uint8 image tensor, in eval batches; with
    ``tta_flip``, the mean of the logits of each image and its mirror image."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i: i + batch_size].to(device, non_blocking=True))
        with autocast(device, amp_dtype):
            logits = model(x).float()
            if tta_flip:
                logits = (logits + model(x.flip(-1)).float()) / 2
        out.append(logits)
    return torch.cat(out) if out else torch.empty(0, device=device)


def loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(sum of cross-entropy, correct predictions, count) as one tensor of the device's
    accumulation dtype (float64, float32 on MPS): the form that adds up across batches (a
    run's epoch sums; distributed evaluation gathers the logits themselves)."""
    labels = labels.to(logits.device)
    acc = accumulation_dtype(logits.device)
    return torch.stack([F.cross_entropy(logits, labels, reduction="sum").to(acc),
                        (logits.argmax(1) == labels).sum().to(acc), logits.new_full((), len(labels), dtype=acc)])


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of logits against integer labels."""
    return from_sums(loss_sums(logits, labels))


def from_sums(sums: torch.Tensor) -> tuple[float, float]:
    loss, correct, count = sums.tolist()
    return loss / max(count, 1.0), correct / max(count, 1.0)


def evaluate(model: torch.nn.Module, data, normalize: Normalize, batch_size: int, device: torch.device,
             amp_dtype: torch.dtype | None, tta_flip: bool = False) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on a split (``data.images``, ``data.labels``), without
    augmentation or label smoothing."""
    return loss_and_accuracy(predict_logits(model, data.images, normalize, batch_size, device, amp_dtype, tta_flip),
                             data.labels)


@dataclass
class Predictor:
    """A checkpoint ready to run: model, normalisation, device and precision."""

    meta: CheckpointMeta
    model: ViT
    normalize: Normalize
    device: torch.device
    amp_dtype: torch.dtype | None
    choice: Choice | None = None  # how its kernels were chosen

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    def logits(self, images: torch.Tensor, batch_size: int = DEFAULT_EVAL_BATCH, tta_flip: bool = False) -> torch.Tensor:
        """fp32 logits (on the CPU) of uint8 images (N, C, H, W) at the model's size."""
        return predict_logits(self.model, images, self.normalize, batch_size, self.device, self.amp_dtype,
                              tta_flip).cpu()


def load_predictor(checkpoint: Path, device: str = "auto", precision: str = "auto",
                   attention: str = "auto") -> Predictor:
    """A verified checkpoint on ``device``, computing with the kernels and precision measured
    fastest there for evaluation batches (autotune; a ``precision`` or ``attention`` other than
    auto is kept: the run's own, from its manifest, reproduce its table to the last digit)."""
    checkpoint = Path(checkpoint)
    meta = open_checkpoint(checkpoint)
    dev = resolve_device(device)
    keep_freed_memory(dev)
    choice = choose(meta.model, dev, batch=DEFAULT_EVAL_BATCH, training=False, attention=attention,
                    precision=precision)
    model = build_model(checkpoint, meta, choice.kernels())
    return Predictor(meta, model.to(dev).eval(), Normalize(meta.mean, meta.std, dev), dev, choice.amp_dtype, choice)


def checkpoint_data(checkpoint: Path, meta: CheckpointMeta, data_dir: str | None = None,
                    download: bool | None = None) -> tuple[TrainConfig, DatasetSplits]:
    """The splits the checkpoint's run trained on. The data folder named in the checkpoint's
    config is only read: it is never created or downloaded into unless the user names it
    (``data_dir``); downloading needs ``download`` and a named ``data_dir``."""
    cfg = TrainConfig.load_yaml(Path(checkpoint) / CONFIG)
    if download and data_dir is None:
        raise DataError("--download needs --data-dir: vitlab downloads only into a folder you name, "
                        "never into one written in a checkpoint")
    folder = data_dir or cfg.data_dir
    if data_dir is None and cfg.dataset != "digits" and not Path(folder).expanduser().is_dir():
        raise DataError(f"the data folder of this checkpoint's run, {printable(folder)}, does not exist here; "
                        f"pass --data-dir")
    data = load_dataset(cfg.dataset, folder, val_size=cfg.val_size, image_size=cfg.image_size,
                        download=bool(download) and data_dir is not None, coarse_labels=cfg.coarse_labels)
    m = meta.model
    if len(data.classes) != m.num_classes or data.image_size != m.image_size or data.channels != m.channels:
        raise CheckpointError(
            f"{checkpoint}: trained for {m.num_classes} classes of {m.channels}x{m.image_size}px "
            f"images, but {cfg.dataset} has {len(data.classes)} classes of {data.channels}x{data.image_size}px")
    return cfg, data
