"""Run configuration: one flat dataclass, named YAML presets, and validation.

``TrainConfig`` is the architecture (``model.ArchConfig``, whose fields and defaults it
inherits) plus data, optimisation, augmentation, runtime and output fields. Every field
is also a CLI flag (``--batch-size`` for ``batch_size``) whose help text is the field's
``help`` metadata; a preset plus a few overrides describes any run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .fileio import atomic_write_text, read_bounded
from .model import ATTENTION_KERNELS, MAX_IMAGE_SIZE, ArchConfig, check_patch_fits
from .options import flag, from_mapping, is_whole, need, option, to_mapping
from .devices import PRECISION_CHOICES, check_device_name
from .weight_init import INITS

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "folder")
DEFAULT_PRESET = "digits"  # what `vitlab train` with no options runs
MAX_CONFIG_BYTES = 1 << 20
# Fields that say where and how fast a run computes, not what it computes: --resume may
# change them, and they may differ between a run's config and its checkpoint's copy.
RUNTIME_FIELDS = ("device", "threads", "log_every", "eval_batch_size", "data_dir", "download", "tensorboard",
                  "deterministic")
RESUME_MAY_CHANGE = tuple(f for f in RUNTIME_FIELDS if f != "download")  # a resumed run never downloads
# Fields that say where a run writes and how often it saves: they name no difference between two runs.
OUTPUT_FIELDS = ("out", "name", "checkpoint_every")
DEFAULT_EVAL_BATCH = 256  # on the 2-core CPU, 256 ran 25-40% faster than 1024 (benchmarks/RESULTS.md)


def check_resume_changes(changes: Iterable[str], preset: bool = False) -> None:
    """--resume continues a run as it started: of its config, only where and how fast it
    computes may change (``changes``: the field names given; ``preset``: whether --preset was)."""
    fixed = [flag(k) for k in sorted(set(changes) - set(RESUME_MAY_CHANGE))] + (["--preset"] if preset else [])
    if fixed:
        raise ConfigError(f"--resume continues a run with its saved config; drop {', '.join(fixed)} "
                          f"(it may change only {', '.join(flag(f) for f in RESUME_MAY_CHANGE)})")


@dataclass
class TrainConfig(ArchConfig):
    # --- data
    dataset: str = option("digits", f"dataset: one of {', '.join(DATASETS)}", choices=DATASETS)
    data_dir: str = option("data", "folder holding (or receiving) the dataset files; for 'folder', the image tree itself")
    download: bool = option(True, "download a missing standard dataset into --data-dir (checksum-verified)")
    val_size: float = option(0.1, "validation images held out of train: a fraction (<1) or a count (>=1); 0 uses the test set as validation")
    coarse_labels: bool = option(False, "CIFAR-100 only: train on the 20 coarse superclasses instead of the 100 fine labels")
    train_per_class: int = option(0, "train on the first N images of each class of the training split only (few-shot experiments, quick checks; 0: all of them)")
    class_weights: str = option("none", "'balanced': weigh each class's loss by n / (classes x n_class), so that a class with fewer training images counts as much as the others (for imbalanced folders), and validation picks best/ by balanced accuracy (metrics.csv's val_acc is then the mean per-class recall); 'none'", choices=("none", "balanced"))
    image_size: int | None = option(None, f"side length images are resized to, at most {MAX_IMAGE_SIZE} (default: the dataset's own; 32 for 'folder')")
    # --- optimisation
    epochs: int = option(80, "training epochs")
    max_steps: int = option(0, "stop after this many optimizer steps, where the learning-rate schedule ends; it overrides --epochs and the last epoch may be partial (0: --epochs whole epochs)")
    batch_size: int = option(64, "training batch size")
    lr: float = option(2e-3, "peak learning rate (AdamW)")
    min_lr: float = option(1e-5, "learning rate at the end of the cosine decay (capped at --lr)")
    weight_decay: float = option(0.05, "AdamW weight decay (matrices only; not biases, norms, embeddings)")
    init_from: str | None = option(None, "start from the weights of this folder (a vitlab checkpoint, or a timm or transformers ViT folder with model.safetensors; nothing is downloaded): the architecture is the folder's, adapted to this run's image size, patch size, channels and classes (vitlab.load_pretrained)")
    norm_eps: float = option(1e-6, "LayerNorm epsilon (1e-6 as in ViT and timm; a run started from other weights takes theirs)")
    layer_decay: float = option(1.0, "layer-wise learning-rate decay (BEiT, timm): the head learns at --lr, block i of D at lr x decay^(D - i), the embeddings at lr x decay^(D + 1) (1: off)")
    freeze_blocks: int = option(0, "keep the tokenizer, the class token, the positions and the first K blocks fixed (fine-tuning from --init-from)")
    optimizer: str = option("adamw", "'adamw', or 'muon': torch.optim.Muon for the blocks' weight matrices (its step matched to AdamW's RMS, so --lr and --weight-decay keep their meaning), AdamW for embeddings, norms, biases, the head and the tokenizer", choices=("adamw", "muon"))
    init: str = option("trunc-normal", "how a new run's blocks start: 'trunc-normal' (ViT/timm), 'mimetic' (Trockman & Kolter 2023: each head's W_q W_k^T near the identity, W_v W_proj near minus it) or 'zero-residual' (each block's output projections at zero: every block starts as the identity)", choices=INITS)
    warmup_epochs: float = option(2.0, "epochs of linear learning-rate warmup")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy loss")
    grad_clip: float = option(1.0, "clip the gradient norm to this value; 0 disables")
    seed: int = option(0, "random seed for initialisation, data order and augmentation")
    on_nonfinite: str = option("stop", "when the loss is NaN/Inf: 'stop' (name the step and the last good checkpoint) or 'skip' (skip the batch and halve the learning rate; one host sync per step)", choices=("stop", "skip"))
    # --- augmentation (batched on the training device)
    crop: bool = option(True, "RandomResizedCrop to the image size")
    crop_scale: tuple[float, float] = option((0.7, 1.0), "RandomResizedCrop area range (fractions of the image)")
    crop_ratio: tuple[float, float] = option((0.8, 1.25), "RandomResizedCrop aspect-ratio range")
    hflip: float = option(0.0, "probability of a horizontal flip")
    translate: int = option(0, "shift each image by up to N pixels along each axis, a whole number drawn uniformly, edge pixels repeated (airbench's translate; with --crop, the crop box moves; 0: off)")
    trivial_augment: float = option(0.0, "probability that an image gets one TrivialAugment-Wide operation (0: off; 1: the published method)")
    repeated_augment: int = option(1, "repeated augmentation: each image appears N times per batch, each copy augmented differently (1: off)")
    random_erasing: float = option(0.0, "probability of erasing a random rectangle of each image (filled with noise)")
    progressive_size: int = option(0, "progressive resizing (fast.ai, FFCV): the first --progressive-epochs train on images of this side (crops resized to it: fewer tokens, less work per step; the learned positions resampled to the smaller grid); validation, the rest of training and everything after at the full size (0: off)")
    progressive_epochs: int = option(0, "epochs, from the first, trained at --progressive-size")
    mixup_alpha: float = option(0.0, "Mixup with Beta(alpha, alpha) mixing weights (0: off)")
    cutmix_alpha: float = option(0.0, "CutMix with Beta(alpha, alpha) area fractions (0: off; with mixup, each batch picks one)")
    ema_decay: float = option(0.0, "keep an exponential moving average of the weights with this decay, evaluated beside the raw weights (0: off; 0.999 is usual)")
    tta_flip: bool = option(False, "final evaluation (results table, predictions, vitlab evaluate) averages the logits of each image and its mirror image; per-epoch validation stays single-view")
    # --- runtime
    device: str = option("auto", "'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    precision: str = option("auto", "'auto' (the faster of fp32 and the device's native lower precision, timed at the start: bf16 on CPUs with AVX512-bf16/AMX and NVIDIA Ampere or later, fp16 on NVIDIA Volta/Turing; elsewhere fp32), 'bf16', 'fp16' (trained with a gradient scaler) or 'fp32'", choices=PRECISION_CHOICES)
    attention: str = option("auto", "attention kernel: 'sdpa', 'explicit', or 'auto' (the faster for this model on this machine, timed at the start and cached)", choices=ATTENTION_KERNELS)
    compile: bool = option(False, "compile the model with torch.compile")
    deterministic: bool = option(False, "deterministic kernels only (torch.use_deterministic_algorithms): on a GPU, two runs of one config and a resumed run then compute the same numbers, at some cost in speed; the CPU is deterministic already")
    cls_only_last_block: bool = option(True, "the last block computes the class token's output only, the one the head reads: the same logits for less work (pool cls)")
    eval_batch_size: int = option(DEFAULT_EVAL_BATCH, "batch size for evaluation (on the 2-core CPU, 256 ran 25-40% faster than 1024)")
    threads: int = option(0, "CPU threads for torch (0: torch's default)")
    # --- output
    out: str = option("runs", "parent folder of run folders")
    name: str | None = option(None, "run folder name (default: <dataset>-<timestamp>)")
    checkpoint_every: int = option(0, "also save the last checkpoint every N optimizer steps (0: at epoch ends only)")
    log_every: int = option(20, "steps between progress-bar updates of loss and accuracy (each one a host sync)")
    tensorboard: bool = option(True, "write TensorBoard event files to <run>/tb/ (when the tensorboard package is installed)")
    time_budget: str | None = option(None, "train the best model that fits this wall-clock budget (90s, 30m, 2h): vitlab measures its speed here and sets the epochs and schedule so that the run, final evaluation and report included, ends within it")

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))

    # ------------------------------------------------------------------ checks
    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first bad value; return self."""
        need(self.dataset in DATASETS, f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        super().validate()
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            v = getattr(self, name)
            need(is_whole(v) and v >= 1, f"{flag(name)} must be a positive integer, got {v!r}")
        need(is_whole(self.max_steps) and 0 <= self.max_steps <= 1 << 40,
             f"--max-steps must be a whole number >= 0 (0: off), got {self.max_steps!r}")
        need(self.epochs <= 100_000 and self.batch_size <= 1 << 20 and self.eval_batch_size <= 1 << 20,
             "--epochs, --batch-size and --eval-batch-size must be at most 100,000 and 1,048,576")
        v = self.image_size
        need(v is None or (is_whole(v) and 1 <= v <= MAX_IMAGE_SIZE),
             f"--image-size must be an integer from 1 to {MAX_IMAGE_SIZE}, got {v!r}")
        if self.image_size is not None and self.patch_size is not None:
            check_patch_fits(self.image_size, self.patch_size)
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.min_lr >= 0, f"--min-lr must be >= 0, got {self.min_lr}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        need(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables), got {self.grad_clip}")
        need(self.val_size >= 0, f"--val-size must be >= 0, got {self.val_size}")
        need(self.val_size < 1 or float(self.val_size).is_integer(), f"--val-size must be a fraction below 1 or a whole count, got {self.val_size}")
        need(0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        need(0 <= self.trivial_augment <= 1, f"--trivial-augment is a probability in [0, 1], got {self.trivial_augment}")
        need(is_whole(self.repeated_augment) and 1 <= self.repeated_augment <= 16, f"--repeated-augment is a repeat count from 1 to 16, got {self.repeated_augment}")
        need(0 <= self.random_erasing <= 1, f"--random-erasing is a probability in [0, 1], got {self.random_erasing}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            need(getattr(self, name) >= 0, f"{flag(name)} must be >= 0 (0: off), got {getattr(self, name)}")
        lo, hi = self.crop_scale
        need(0 < lo <= hi <= 1, f"--crop-scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        need(0 < lo <= hi, f"--crop-ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        need(0 <= self.hflip <= 1, f"--hflip is a probability in [0, 1], got {self.hflip}")
        need(is_whole(self.translate) and 0 <= self.translate <= MAX_IMAGE_SIZE,
             f"--translate must be a whole number of pixels from 0 to {MAX_IMAGE_SIZE}, got {self.translate!r}")
        self._validate_progressive()
        need(self.optimizer in ("adamw", "muon"), f"--optimizer must be adamw or muon, got {self.optimizer!r}")
        self._validate_finetuning()
        self._validate_runtime()
        return self

    def _validate_progressive(self) -> None:
        """Progressive resizing; that the size tiles into patches is checked once the image size is known."""
        size, epochs = self.progressive_size, self.progressive_epochs
        need(is_whole(size) and 0 <= size <= MAX_IMAGE_SIZE,
             f"--progressive-size must be a whole number of pixels from 0 (off) to {MAX_IMAGE_SIZE}, got {size!r}")
        need(is_whole(epochs) and 0 <= epochs, f"--progressive-epochs must be a whole number >= 0, got {epochs!r}")
        need((size == 0) == (epochs == 0), "--progressive-size and --progressive-epochs go together: set both, or neither")
        need(epochs < self.epochs or size == 0,
             f"--progressive-epochs {epochs} leaves no epoch at the full size: it must be below --epochs {self.epochs}")
        need(size == 0 or self.time_budget is None,
             "--progressive-size and --time-budget do not go together: the budget plans from the pace of the first "
             "steps, which changes with the image size")

    def _validate_finetuning(self) -> None:
        """Starting from other weights, and a user's own folder."""
        need(is_whole(self.train_per_class) and 0 <= self.train_per_class <= 1 << 30,
             f"--train-per-class must be a whole number >= 0, got {self.train_per_class!r}")
        need(self.class_weights in ("none", "balanced"), f"--class-weights must be none or balanced, got {self.class_weights!r}")
        need(0.0 < self.layer_decay <= 1.0, f"--layer-decay must be in (0, 1], got {self.layer_decay!r}")
        top = 64 if self.init_from else self.depth  # (with --init-from the depth is the folder's: checked once known)
        need(is_whole(self.freeze_blocks) and 0 <= self.freeze_blocks <= top,
             f"--freeze-blocks must be a whole number from 0 to the depth {top}, got {self.freeze_blocks!r}")
        need(isinstance(self.norm_eps, float) and 0 < self.norm_eps <= 1e-2,
             f"--norm-eps must be a number in (0, 0.01], got {self.norm_eps!r}")
        need(self.init_from is None or (isinstance(self.init_from, str) and 0 < len(self.init_from) <= 4096),
             "--init-from must name a folder")
        need(self.init in INITS, f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        need(self.init == "trunc-normal" or self.init_from is None,
             f"--init {self.init} initialises new weights and --init-from loads them: drop one")

    def _validate_runtime(self) -> None:
        """Where and how the run computes, and what it writes."""
        need(self.attention in ATTENTION_KERNELS, f"--attention must be auto, sdpa or explicit, got {self.attention!r}")
        need(self.precision in PRECISION_CHOICES,
             f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}")
        check_device_name(self.device)
        need(self.on_nonfinite in ("stop", "skip"), f"--on-nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        need(is_whole(self.threads) and 0 <= self.threads <= 4096, f"--threads must be from 0 to 4096, got {self.threads}")
        need(is_whole(self.checkpoint_every) and self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.time_budget is not None:
            from .budget import parse_duration

            parse_duration(self.time_budget)
        need(self.name is None or (self.name and "/" not in self.name and "\0" not in self.name
                                   and self.name not in (".", "..")),
             f"--name must be a plain folder name, got {self.name!r}")

    def arch(self) -> dict[str, Any]:
        """The architecture fields, for ``ViTConfig(**cfg.arch(), image_size=..., ...)``."""
        return {f.name: getattr(self, f.name) for f in fields(ArchConfig)}

    # ------------------------------------------------------------ conversions
    def to_dict(self) -> dict:
        return to_mapping(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        return from_mapping(cls, d, source)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save_yaml(self, path: Path, note: str | None = None) -> None:
        """``note``: comment lines written above the fields (how a field's value was decided)."""
        head = "".join(f"# {line}\n" for line in note.splitlines()) if note else ""
        atomic_write_text(path, head + self.to_yaml())

    @classmethod
    def load_yaml(cls, path: Path) -> "TrainConfig":
        return cls.from_dict(load_yaml_file(path) or {}, source=str(path))

    def differences(self, other: "TrainConfig", ignore: tuple[str, ...] = RUNTIME_FIELDS) -> list[str]:
        """'field (this vs other)' for every field that differs, runtime fields aside."""
        return [f"{f.name} ({getattr(self, f.name)!r} vs {getattr(other, f.name)!r})" for f in fields(self)
                if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)]


# ------------------------------------------------------------------------ YAML

class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors and aliases: a config needs neither, and a
    'billion laughs' file of nested aliases expands to gigabytes once it is walked."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a vitlab config",
                                              event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str | bytes, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read config {source}: {str(e).splitlines()[0] if str(e) else e}") from None
    except RecursionError:  # PyYAML composes nested collections recursively: '[[[[...' of a few KB
        raise ConfigError(f"cannot read config {source}: nested too deeply to be a vitlab config") from None


def load_yaml_file(path: Path, limit: int = MAX_CONFIG_BYTES) -> Any:
    """A YAML file read with a size limit, plain data only (no Python tags, no aliases)."""
    try:
        raw = read_bounded(Path(path), limit)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}") from None
    return parse_yaml(raw, str(path))


# ---------------------------------------------------------------------- presets

def _preset_files() -> dict[str, Any]:
    root = resources.files("vitlab") / "presets"
    return {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def preset_names() -> list[str]:
    return sorted(_preset_files())


def read_preset(name: str) -> tuple[str, dict]:
    """(description, overrides) of a shipped preset."""
    files = _preset_files()
    if name not in files:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(files))}")
    doc = parse_yaml(files[name].read_text(), f"preset {name}") or {}
    return doc.get("description", ""), doc.get("config", {}) or {}


def load_preset(name: str) -> TrainConfig:
    _, overrides = read_preset(name)
    return TrainConfig.from_dict(overrides, source=f"preset {name}")


def default_config() -> TrainConfig:
    """What ``vitlab train`` runs with no options: the embedded digits preset."""
    return load_preset(DEFAULT_PRESET)
