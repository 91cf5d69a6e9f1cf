"""Run configuration: one flat dataclass, named YAML presets, and validation.

Every field is also a CLI flag (``--batch-size`` for ``batch_size``); a preset
plus a few overrides describes any run. The help text of each flag is the
``help`` metadata of its field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "folder")
PATCH_EMBEDS = ("conv", "linear", "spt", "conv-stem", "conv-pool")  # the tokenizers of model.PatchEmbed


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field carrying its CLI help text."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    # --- data
    dataset: str = _f("digits", f"dataset: one of {', '.join(DATASETS)}", choices=DATASETS)
    data_dir: str = _f("data", "folder holding (or receiving) the dataset files; for 'folder', the image tree itself")
    download: bool = _f(True, "download a missing standard dataset into --data-dir (checksum-verified)")
    val_size: float = _f(0.1, "validation images held out of train: a fraction (<1) or a count (>=1); 0 uses the test set as validation")
    coarse_labels: bool = _f(False, "CIFAR-100 only: train on the 20 coarse superclasses instead of the 100 fine labels")
    # --- model
    image_size: int | None = _f(None, "side length images are resized to (default: the dataset's own; 32 for 'folder')")
    patch_size: int | None = _f(None, "patch side length (default: 4, or 2 for images under 16 px)")
    depth: int = _f(4, "number of transformer encoder blocks")
    heads: int = _f(4, "attention heads per block (must divide --dim)")
    dim: int = _f(96, "token embedding width")
    mlp_dim: int = _f(192, "hidden width of each block's MLP")
    dropout: float = _f(0.0, "dropout on embeddings, attention output and MLP")
    attn_dropout: float = _f(0.0, "dropout on attention weights")
    drop_path: float = _f(0.0, "stochastic depth: drop rate of the last block's residual branches (linearly less for earlier blocks)")
    layer_scale: float = _f(0.0, "LayerScale initial value on each residual branch (0: off; 1e-4 is usual)")
    pool: str = _f("cls", "what feeds the head: 'cls' (class token) or 'mean' (mean of patch tokens)", choices=("cls", "mean"))
    patch_embed: str = _f("conv", "tokenizer: 'conv' or 'linear' (the plain patch projection), 'spt' (shifted patch tokenization), 'conv-stem' (a 3x3 conv first: overlapping patches) or 'conv-pool' (CCT tokenizer: 3x3 conv + max-pool stages)", choices=PATCH_EMBEDS)
    lsa: bool = _f(False, "locality self-attention: learnable temperature, tokens do not attend to themselves")
    attention: str = _f("auto", "attention kernel: 'sdpa', 'explicit', or 'auto' (fastest measured for the device)", choices=("auto", "sdpa", "explicit"))
    # --- optimisation
    epochs: int = _f(80, "training epochs")
    batch_size: int = _f(64, "training batch size")
    lr: float = _f(2e-3, "peak learning rate (AdamW)")
    min_lr: float = _f(1e-5, "learning rate at the end of the cosine decay (capped at --lr)")
    weight_decay: float = _f(0.05, "AdamW weight decay (matrices only; not biases, norms, embeddings)")
    warmup_epochs: float = _f(2.0, "epochs of linear learning-rate warmup")
    label_smoothing: float = _f(0.1, "label smoothing of the cross-entropy loss")
    grad_clip: float = _f(1.0, "clip the gradient norm to this value; 0 disables")
    seed: int = _f(0, "random seed for initialisation, data order and augmentation")
    on_nonfinite: str = _f("stop", "when the loss is NaN/Inf: 'stop' (name the step and the last good checkpoint) or 'skip' (skip the batch and halve the learning rate; one host sync per step)", choices=("stop", "skip"))
    # --- augmentation (batched on the training device)
    crop: bool = _f(True, "RandomResizedCrop to the image size")
    crop_scale: tuple[float, float] = _f((0.7, 1.0), "RandomResizedCrop area range (fractions of the image)")
    crop_ratio: tuple[float, float] = _f((0.8, 1.25), "RandomResizedCrop aspect-ratio range")
    hflip: float = _f(0.0, "probability of a horizontal flip")
    trivial_augment: float = _f(0.0, "probability that an image gets one TrivialAugment-Wide operation (0: off; 1: the published method)")
    repeated_augment: int = _f(1, "repeated augmentation: each image appears N times per batch, each copy augmented differently (1: off)")
    random_erasing: float = _f(0.0, "probability of erasing a random rectangle of each image (filled with noise)")
    mixup_alpha: float = _f(0.0, "Mixup with Beta(alpha, alpha) mixing weights (0: off)")
    cutmix_alpha: float = _f(0.0, "CutMix with Beta(alpha, alpha) area fractions (0: off; with mixup, each batch picks one)")
    ema_decay: float = _f(0.0, "keep an exponential moving average of the weights with this decay, evaluated beside the raw weights (0: off; 0.999 is usual)")
    tta_flip: bool = _f(False, "final evaluation (results table, predictions, vitlab evaluate) averages the logits of each image and its mirror image; per-epoch validation stays single-view")
    # --- runtime
    device: str = _f("auto", "'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    precision: str = _f("auto", "'auto' (bf16 where the device computes it natively), 'bf16' or 'fp32'", choices=("auto", "bf16", "fp32"))
    compile: bool = _f(False, "compile the model with torch.compile")
    cls_only_last_block: bool = _f(True, "the last block computes the class token's output only, the one the head reads: the same logits for less work (pool cls)")
    eval_batch_size: int = _f(256, "batch size for evaluation (on the 2-core CPU, 256 ran 25-40% faster than 1024)")
    threads: int = _f(0, "CPU threads for torch (0: torch's default)")
    # --- output
    out: str = _f("runs", "parent folder of run folders")
    name: str | None = _f(None, "run folder name (default: <dataset>-<timestamp>)")
    checkpoint_every: int = _f(0, "also save the last checkpoint every N optimizer steps (0: at epoch ends only)")
    log_every: int = _f(20, "steps between progress-bar updates of loss and accuracy (each one a host sync)")

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))

    # ------------------------------------------------------------------ checks
    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first bad value; return self."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.dataset in DATASETS, f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        for name in ("epochs", "batch_size", "depth", "heads", "dim", "mlp_dim", "eval_batch_size", "log_every"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"--{_flag(name)} must be a positive integer, got {v!r}")
        for name in ("image_size", "patch_size"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and v >= 1), f"--{_flag(name)} must be a positive integer, got {v!r}")
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.min_lr >= 0, f"--min-lr must be >= 0, got {self.min_lr}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        need(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables), got {self.grad_clip}")
        need(self.val_size >= 0, f"--val-size must be >= 0, got {self.val_size}")
        need(self.val_size < 1 or float(self.val_size).is_integer(), f"--val-size must be a fraction below 1 or a whole count, got {self.val_size}")
        for name in ("dropout", "attn_dropout", "drop_path", "ema_decay"):
            need(0 <= getattr(self, name) < 1, f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        need(0 <= self.trivial_augment <= 1, f"--trivial-augment is a probability in [0, 1], got {self.trivial_augment}")
        need(1 <= self.repeated_augment <= 16, f"--repeated-augment is a repeat count from 1 to 16, got {self.repeated_augment}")
        need(0 <= self.random_erasing <= 1, f"--random-erasing is a probability in [0, 1], got {self.random_erasing}")
        for name in ("layer_scale", "mixup_alpha", "cutmix_alpha"):
            need(getattr(self, name) >= 0, f"--{_flag(name)} must be >= 0 (0: off), got {getattr(self, name)}")
        need(self.dim % self.heads == 0, f"--heads {self.heads} does not divide --dim {self.dim}; dim must be a multiple of heads")
        if self.image_size is not None and self.patch_size is not None:
            need(self.image_size % self.patch_size == 0,
                 f"--patch-size {self.patch_size} does not divide --image-size {self.image_size}")
        lo, hi = self.crop_scale
        need(0 < lo <= hi <= 1, f"--crop-scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        need(0 < lo <= hi, f"--crop-ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        need(0 <= self.hflip <= 1, f"--hflip is a probability in [0, 1], got {self.hflip}")
        need(self.pool in ("cls", "mean"), f"--pool must be 'cls' or 'mean', got {self.pool!r}")
        need(self.patch_embed in PATCH_EMBEDS, f"--patch-embed must be one of {', '.join(PATCH_EMBEDS)}, got {self.patch_embed!r}")
        need(self.attention in ("auto", "sdpa", "explicit"), f"--attention must be auto, sdpa or explicit, got {self.attention!r}")
        need(self.precision in ("auto", "bf16", "fp32"), f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        need(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
             f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        need(self.on_nonfinite in ("stop", "skip"), f"--on-nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        need(self.threads >= 0, f"--threads must be >= 0, got {self.threads}")
        need(self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        need(self.name is None or (self.name and "/" not in self.name and self.name not in (".", "..")),
             f"--name must be a plain folder name, got {self.name!r}")
        return self

    # ------------------------------------------------------------ conversions
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown config key(s) {unknown}; see `vitlab train --help`")
        clean = {k: _coerce(k, v, known[k].type, source) for k, v in d.items()}
        return cls(**clean)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def save_yaml(self, path: Path) -> None:
        from .checkpoint import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: Path) -> "TrainConfig":
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        return cls.from_dict(data or {}, source=str(path))


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
    """Check a YAML value against the field's type (YAML has no tuples; ints may be floats)."""
    ann = str(annotation)
    if value is None:
        if "None" in ann:
            return None
        raise ConfigError(f"{source}: {key} may not be empty")
    try:
        if ann.startswith("tuple"):
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError("expected a pair like [0.08, 1.0]")
            return tuple(float(x) for x in value)
        if ann.startswith("bool"):
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if ann.startswith("int"):
            if isinstance(value, bool) or not float(value).is_integer():
                raise ValueError("expected an integer")
            return int(value)
        if ann.startswith("float"):
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if ann.startswith("str"):
            return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: bad value {value!r} for {key}: {e}") from None
    return value


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
    doc = yaml.safe_load(files[name].read_text()) or {}
    return doc.get("description", ""), doc.get("config", {}) or {}


def load_preset(name: str) -> TrainConfig:
    _, overrides = read_preset(name)
    return TrainConfig.from_dict(overrides, source=f"preset {name}")
