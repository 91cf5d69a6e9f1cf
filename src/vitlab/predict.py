"""``vitlab predict``: a checkpoint (or an exported ONNX file) classifies image files."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

from .fileio import printable
from .images import check_channels, failure_reason, load_image
from .inference import load_predictor


def predict_files(checkpoint: Path, paths: Sequence[Path], top_k: int = 3, device: str = "auto",
                  precision: str = "auto", attention: str = "auto", note: Callable[[Path, str], None] | None = None
                  ) -> Iterator[tuple[Path, list[tuple[str, float]] | str]]:
    """For each path: a list of (class, probability), best first, or a one-line error.
    ``checkpoint``: a checkpoint folder, or an ONNX file written by ``vitlab export`` (which
    computes in fp32 with its own kernels, whatever ``precision`` and ``attention`` say).
    ``note(path, text)`` hears what decoding did to an image (transparency composited)."""
    if Path(checkpoint).suffix == ".onnx" and not Path(checkpoint).is_dir():
        from .export import OnnxModel

        model = OnnxModel.load(Path(checkpoint))
        classes, channels, size, logits_of = model.classes, model.channels, model.image_size, model.logits
    else:
        predictor = load_predictor(Path(checkpoint), device, precision, attention)
        m = predictor.meta.model
        classes, channels, size, logits_of = predictor.classes, m.channels, m.image_size, predictor.logits
    check_channels(channels, printable(checkpoint))
    k = min(top_k, len(classes))
    for path in paths:
        notes: list[str] = []
        try:
            image = load_image(Path(path), channels, size, notes)
        except (OSError, ValueError) as e:  # Pillow raises both for unreadable files; ImageRefused is a ValueError
            yield path, failure_reason(e)
            continue
        for text in notes if note is not None else ():
            note(path, text)
        probs, idx = logits_of(image.unsqueeze(0)).softmax(1)[0].topk(k)
        yield path, [(classes[int(i)], float(p)) for p, i in zip(probs, idx)]
