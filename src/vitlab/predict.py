"""Using a trained checkpoint: evaluate it on its dataset, or classify image files."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .augment import Normalize
from .checkpoint import CONFIG, load_weights, read_meta
from .config import TrainConfig
from .data import load_dataset
from .errors import CheckpointError
from .model import ViT
from .runtime import keep_freed_memory, resolve_attention, resolve_device, resolve_precision


def _load(checkpoint: Path, device: str):
    meta = read_meta(checkpoint)
    dev = resolve_device(device)
    keep_freed_memory(dev)
    amp = resolve_precision("auto", dev)
    meta.model.attention = resolve_attention("auto", dev, amp)  # same function, fastest kernel here
    model = ViT(meta.model)
    load_weights(checkpoint, model)
    return meta, model.to(dev).eval(), dev, amp


def evaluate_checkpoint(checkpoint: Path, data_dir: str | None = None, download: bool | None = None,
                        device: str = "auto", batch_size: int = 1024, tta_flip: bool | None = None
                        ) -> dict[str, tuple[float, float]]:
    """(loss, accuracy) on Train / Val / Test, with the splits the run trained on; flip
    averaging as the run's config says unless ``tta_flip`` is given."""
    from .train import evaluate

    checkpoint = Path(checkpoint)
    meta, model, dev, amp = _load(checkpoint, device)
    cfg = TrainConfig.load_yaml(checkpoint / CONFIG)
    data = load_dataset(cfg.dataset, data_dir or cfg.data_dir, val_size=cfg.val_size, image_size=cfg.image_size,
                        download=cfg.download if download is None else download, coarse_labels=cfg.coarse_labels)
    if len(data.classes) != meta.model.num_classes or data.image_size != meta.model.image_size \
            or data.channels != meta.model.channels:
        raise CheckpointError(
            f"{checkpoint}: trained for {meta.model.num_classes} classes of {meta.model.channels}x{meta.model.image_size}px "
            f"images, but {cfg.dataset} has {len(data.classes)} classes of {data.channels}x{data.image_size}px")
    normalize = Normalize(meta.mean, meta.std, dev)
    return {split: evaluate(model, subset, normalize, batch_size, dev, amp,
                           cfg.tta_flip if tta_flip is None else tta_flip)
            for split, subset in (("Train", data.train), ("Val", data.val), ("Test", data.test))}


def load_image(path: Path, channels: int, size: int) -> torch.Tensor:
    """An image file as a uint8 (C, size, size) tensor, converted to the model's mode and size."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.reshape(size, size, channels).transpose(2, 0, 1).copy())


def predict_files(checkpoint: Path, paths: Sequence[Path], top_k: int = 3, device: str = "auto"
                  ) -> Iterator[tuple[Path, list[tuple[str, float]] | str]]:
    """For each path: a list of (class, probability), best first, or an error message."""
    meta, model, dev, amp = _load(Path(checkpoint), device)
    normalize = Normalize(meta.mean, meta.std, dev)
    k = min(top_k, len(meta.classes))
    for path in paths:
        try:
            image = load_image(Path(path), meta.model.channels, meta.model.image_size)
        except FileNotFoundError:
            yield path, "no such file"
            continue
        except Exception as e:  # PIL raises many types for unreadable files
            yield path, f"cannot read as an image ({type(e).__name__})"
            continue
        with torch.inference_mode():
            logits = model(normalize(image.unsqueeze(0).to(dev))).float()
        probs, idx = logits.softmax(1)[0].topk(k)
        yield path, [(meta.classes[int(i)], float(p)) for p, i in zip(probs, idx)]
