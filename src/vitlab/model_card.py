"""The model card an export carries (README.md in a timm or transformers folder, as the hub's
folders have one; the same text in an ONNX file's metadata): what the model is, the classes,
how well it did, how it was trained, on what data, and what it is not for. Everything is read
from the checkpoint (its verified manifest and config) and its run folder, when there is one."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CONFIG
from .compare import MAX_RESULTS_BYTES
from .config import TrainConfig
from .errors import VitlabError
from .fileio import read_json
from .report import code_version
from .rundir import RESULTS_JSON

CARD = "README.md"
RECIPE = ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "warmup_epochs", "label_smoothing", "crop", "hflip",
          "trivial_augment", "random_erasing", "mixup_alpha", "cutmix_alpha", "ema_decay", "drop_path", "init",
          "init_from", "freeze_blocks", "layer_decay", "class_weights", "train_per_class", "seed")


def model_card(checkpoint: Path, meta, fmt: str, report: dict, float_input: bool = False) -> str:
    """Markdown for ``checkpoint`` exported as ``fmt`` with its parity ``report`` (an ONNX file
    takes uint8 images and normalises them itself, or, ``float_input``, normalised float32)."""
    m = meta.model
    onnx_input = (" (the ONNX file takes these normalised float32 images)" if float_input else
                  " (the ONNX file takes uint8 images and normalises them itself)")
    lines = [f"# vitlab ViT: {meta.dataset}, {m.depth} blocks x {m.dim} wide, {m.num_patches} patches of "
             f"{m.patch_size}x{m.patch_size}", "",
             f"A Vision Transformer trained by vitlab ({code_version()}), exported as {fmt}. Input: "
             f"{m.channels}x{m.image_size}x{m.image_size} images scaled to [0, 1] and normalised with mean "
             f"{_nums(meta.mean)} and std {_nums(meta.std)}" + (onnx_input if fmt == "onnx" else "") + ".", "",
             "## Classes", "", ", ".join(f"{i}: {c}" for i, c in enumerate(meta.classes)), "", "## Results", ""]
    lines += _results(checkpoint) + ["", "## Training", ""] + _recipe(checkpoint, meta) + ["", "## Data", ""]
    data = meta.data or {}
    lines += [f"- dataset `{meta.dataset}`; splits {data.get('sizes', 'not recorded')}"
              + (" (validation is the test set)" if data.get("val_is_test") else ""),
              f"- fingerprint: images sha256 `{data.get('images_sha256', '?')}`, labels sha256 "
              f"`{data.get('labels_sha256', '?')}`", "",
              "## Intended use and limits", "",
              f"- Classifying {m.image_size}x{m.image_size} images like those of its training data into the "
              f"{len(meta.classes)} classes above. It has seen nothing else: an image of another kind still gets one "
              f"of these classes, often with high confidence.",
              "- Accuracy is measured on the test split above only; it says little about other data (other cameras, "
              "sizes, lighting or populations). Check it on your own before relying on it.",
              "- Not for decisions about people, or where a mistake is costly, without a human in the loop.", "",
              "## The export's check", "",
              f"Exported logits against vitlab's on {report.get('images', '?')} images ({report.get('source', '?')}): "
              f"top-1 agreement {report.get('top1_agreement', float('nan')):.4f}, max |logit difference| "
              f"{report.get('max_abs_logit_diff', float('nan')):.2e} (tolerance {report.get('tolerance', float('nan')):.0e})."]
    return "\n".join(lines) + "\n"


def _nums(values) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def _results(checkpoint: Path) -> list[str]:
    """The run's results table, from the run folder's results.json beside the checkpoint."""
    try:
        results = read_json(Path(checkpoint).parent / RESULTS_JSON, MAX_RESULTS_BYTES)["results"]
        rows = [f"| {split} | {float(results[split]['loss']):.4f} | {float(results[split]['accuracy']):.4f} |"
                for split in ("Train", "Val", "Test")]
    except (OSError, ValueError, KeyError, TypeError):
        return ["Not recorded beside this checkpoint (no results.json in its run folder)."]
    return ["| split | loss | accuracy |", "|---|---|---|", *rows]


def _recipe(checkpoint: Path, meta) -> list[str]:
    try:
        cfg = TrainConfig.load_yaml(Path(checkpoint) / CONFIG)
    except (OSError, VitlabError):
        return ["The training config is not readable."]
    out = [f"- {name}: `{getattr(cfg, name)}`" for name in RECIPE if getattr(cfg, name) not in (None, 0, 0.0, False)]
    origin = meta.extra.get("init_from") if isinstance(meta.extra.get("init_from"), dict) else None
    if origin:
        out.append(f"- started from the {origin.get('kind')} weights of `{origin.get('folder')}` (sha256 "
                   f"`{origin.get('sha256')}`)")
    return out
