"""``vitlab evaluate``: a checkpoint's loss and accuracy on the splits its run trained on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .inference import checkpoint_data, evaluate, load_predictor, loss_and_accuracy, predict_logits


@dataclass
class Evaluation:
    results: dict[str, tuple[float, float]]  # split -> (loss, accuracy)
    confusion: torch.Tensor  # test set: (true, predicted) counts
    classes: list[str]
    computed: str = ""  # device, precision and kernels, and how they were chosen


def evaluation(checkpoint: Path, data_dir: str | None = None, download: bool | None = None, device: str = "auto",
               batch_size: int | None = None, tta_flip: bool | None = None, precision: str = "auto",
               attention: str = "auto") -> Evaluation:
    """Loss and accuracy on Train / Val / Test (the splits the run trained on) and the test
    confusion matrix; batch size and flip averaging as the run's config says unless given;
    ``precision`` 'auto' (the faster where bf16 is native), 'bf16' or 'fp32'; ``attention``
    'auto' (the faster), 'sdpa' or 'explicit'. In bf16 the kernels round differently, so the
    run's table is reproduced exactly by the precision and attention its manifest records."""
    from .metrics import confusion_matrix

    predictor = load_predictor(Path(checkpoint), device, precision, attention)
    cfg, data = checkpoint_data(Path(checkpoint), predictor.meta, data_dir, download)
    ev = dict(normalize=predictor.normalize, batch_size=batch_size or cfg.eval_batch_size, device=predictor.device,
              amp_dtype=predictor.amp_dtype, tta_flip=cfg.tta_flip if tta_flip is None else tta_flip)
    results = {split: evaluate(predictor.model, subset, **ev) for split, subset in (("Train", data.train), ("Val", data.val))}
    test_logits = predict_logits(predictor.model, data.test.images, **ev).cpu()
    results["Test"] = loss_and_accuracy(test_logits, data.test.labels)
    return Evaluation(results, confusion_matrix(test_logits.argmax(1), data.test.labels, len(data.classes)), data.classes,
                      f"{predictor.device.type} {predictor.choice.describe() if predictor.choice else ''}".strip())


def evaluate_checkpoint(checkpoint: Path, data_dir: str | None = None, download: bool | None = None,
                        device: str = "auto", batch_size: int | None = None, tta_flip: bool | None = None,
                        precision: str = "auto", attention: str = "auto") -> dict[str, tuple[float, float]]:
    """(loss, accuracy) on Train / Val / Test (see :func:`evaluation`)."""
    return evaluation(checkpoint, data_dir, download, device, batch_size, tta_flip, precision, attention).results


