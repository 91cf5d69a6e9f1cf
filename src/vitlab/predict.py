"""Using a trained checkpoint: evaluate it on its dataset, or classify image files."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch

from .checkpoint import CONFIG
from .config import TrainConfig
from .data import DatasetSplits, load_dataset
from .errors import CheckpointError, DataError
from .fileio import printable
from .images import failure_reason, read_image
from .inference import Predictor, evaluate, load_predictor


def checkpoint_data(checkpoint: Path, predictor: Predictor, data_dir: str | None = None,
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
    m = predictor.meta.model
    if len(data.classes) != m.num_classes or data.image_size != m.image_size or data.channels != m.channels:
        raise CheckpointError(
            f"{checkpoint}: trained for {m.num_classes} classes of {m.channels}x{m.image_size}px "
            f"images, but {cfg.dataset} has {len(data.classes)} classes of {data.channels}x{data.image_size}px")
    return cfg, data


def evaluate_checkpoint(checkpoint: Path, data_dir: str | None = None, download: bool | None = None,
                        device: str = "auto", batch_size: int | None = None, tta_flip: bool | None = None
                        ) -> dict[str, tuple[float, float]]:
    """(loss, accuracy) on Train / Val / Test, with the splits the run trained on; batch size
    and flip averaging as the run's config says unless given."""
    predictor = load_predictor(Path(checkpoint), device)
    cfg, data = checkpoint_data(Path(checkpoint), predictor, data_dir, download)
    ev = dict(normalize=predictor.normalize, batch_size=batch_size or cfg.eval_batch_size, device=predictor.device,
              amp_dtype=predictor.amp_dtype, tta_flip=cfg.tta_flip if tta_flip is None else tta_flip)
    return {split: evaluate(predictor.model, subset, **ev)
            for split, subset in (("Train", data.train), ("Val", data.val), ("Test", data.test))}


def load_image(path: Path, channels: int, size: int) -> torch.Tensor:
    """An image file as a uint8 (C, size, size) tensor, converted to the model's mode and size."""
    arr = read_image(Path(path), "L" if channels == 1 else "RGB", size)
    return torch.from_numpy(arr.reshape(size, size, channels).transpose(2, 0, 1).copy())


def predict_files(checkpoint: Path, paths: Sequence[Path], top_k: int = 3, device: str = "auto"
                  ) -> Iterator[tuple[Path, list[tuple[str, float]] | str]]:
    """For each path: a list of (class, probability), best first, or a one-line error."""
    predictor = load_predictor(Path(checkpoint), device)
    m = predictor.meta.model
    k = min(top_k, len(predictor.classes))
    for path in paths:
        try:
            image = load_image(Path(path), m.channels, m.image_size)
        except (OSError, ValueError) as e:  # Pillow raises both for unreadable files; ImageRefused is a ValueError
            yield path, failure_reason(e)
            continue
        probs, idx = predictor.logits(image.unsqueeze(0)).softmax(1)[0].topk(k)
        yield path, [(predictor.classes[int(i)], float(p)) for p, i in zip(probs, idx)]
