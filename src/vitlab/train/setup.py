"""Stage 3, the setup: what a run trains with, built once: the model (compiled and wrapped for
DistributedDataParallel where asked), the optimizer, the weight EMA, the batches and the
learning-rate schedule."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ..augment import BatchAugment, Normalize
from ..checkpoint import CheckpointMeta, read_meta
from ..config import TrainConfig
from ..data import DatasetSplits
from ..devices import check_fits
from ..distributed import Dist
from ..errors import ConfigError
from ..options import need
from ..model import (TRAINING_ONLY, ArchConfig, Kernels, ViT, ViTConfig, check_patch_fits, default_patch_size,
                     flops_per_image)
from ..weight_init import apply_init
from .batches import Batches


def build_model_config(cfg: TrainConfig, data: DatasetSplits) -> ViTConfig:
    """The architecture of ``cfg`` at the data's image size, channels and class count."""
    patch = cfg.patch_size or default_patch_size(data.image_size)
    try:
        check_patch_fits(data.image_size, patch, f"the image size {data.image_size} of {cfg.dataset}")
    except ConfigError as e:
        raise ConfigError(f"{e}, or set --image-size") from None
    return ViTConfig(**{**cfg.arch(), "patch_size": patch}, image_size=data.image_size, channels=data.channels,
                     num_classes=len(data.classes), norm_eps=cfg.norm_eps)


def pretrained_arch(cfg: TrainConfig, image_size: int) -> TrainConfig:
    """``cfg`` with the architecture of its --init-from folder (every field of the function its
    weights compute: depth, width, heads, MLP and its activation, tokenizer, pooling, LayerScale,
    LSA, QK-norm, LayerNorm epsilon; not the regularisation) at this run's patch size: --patch-size where the
    config sets one, else the folder's (or the nearest that tiles ``image_size``)."""
    from ..pretrained import patch_for, read_source

    src = read_source(Path(cfg.init_from).expanduser()).cfg
    patch = cfg.patch_size or patch_for(image_size, src.patch_size)
    arch = {f.name: getattr(src, f.name) for f in fields(ArchConfig) if f.name not in (*TRAINING_ONLY, "patch_size")}
    return cfg.replace(**arch, norm_eps=src.norm_eps, patch_size=patch).validate()


def build_batches(cfg: TrainConfig, data: DatasetSplits, model_cfg: ViTConfig, normalize: Normalize,
                  batch_size: int, device: torch.device, dist: Dist) -> Batches:
    """The training images on the device as uint8, with their augmentation; with
    --progressive-size, the first epochs' images at that side, which must tile into patches."""
    size = cfg.progressive_size
    if size:
        check_patch_fits(size, model_cfg.patch_size, f"--progressive-size {size}")
        need(size < data.image_size, f"--progressive-size {size} must be below the image size {data.image_size}")
    augment = BatchAugment(normalize, data.image_size, cfg.crop, cfg.crop_scale, cfg.crop_ratio, cfg.hflip,
                           cfg.random_erasing, cfg.trivial_augment, cfg.translate)
    images = data.train.images
    check_fits(images.nbytes + data.train.labels.nbytes, device,
               f"the training set as uint8 ({len(images)} images of {'x'.join(map(str, images.shape[1:]))})",
               "lower --image-size, or train on the CPU (--device cpu)")
    return Batches(images.to(device), data.train.labels.to(device), augment, batch_size, cfg.seed,
                   cfg.repeated_augment, cfg.mixup_alpha, cfg.cutmix_alpha, model_cfg.num_classes,
                   dist.rows(batch_size), (size, cfg.progressive_epochs))


def initial_weights(model: ViT, folder: str) -> dict:
    """Load ``folder``'s weights (vitlab.load_pretrained, adapted to ``model``'s config) into
    ``model``; what the run's manifest records of where they came from."""
    from ..pretrained import load_into, read_source

    source = read_source(Path(folder).expanduser())
    load_into(model, source)
    return {"folder": str(Path(folder).expanduser().resolve()), "kind": source.kind, "sha256": source.sha256()}


def balanced_weights(counts: torch.Tensor) -> torch.Tensor:
    """n / (classes x n_c) for each class c present (scikit-learn's 'balanced'); 0 for a class with
    no training image (it cannot be learned from this split, and an infinite weight is no help)."""
    present = counts > 0
    weights = torch.zeros(len(counts), dtype=torch.float32)
    weights[present] = counts.sum() / (present.sum() * counts[present]).float()
    return weights


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return int(round(cfg.warmup_epochs * steps_per_epoch))


def schedule_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The optimizer steps of the whole run, where the schedule ends: --max-steps, else whole epochs."""
    return cfg.max_steps or cfg.epochs * steps_per_epoch


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min(min_lr, lr)`` at ``total_steps``."""
    min_lr = min(min_lr, lr)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: ViT, lr: float, weight_decay: float, scaler: "torch.amp.GradScaler | None" = None,
                    kind: str = "adamw", layer_decay: float = 1.0) -> "torch.optim.AdamW | MuonAdamW":
    """AdamW over the weight-decay groups; with a gradient scaler (fp16), the fused kernel,
    which skips a step of non-finite gradients on the device (the unfused one makes the
    scaler read a flag on the host at every step). ``kind="muon"``: Muon for the blocks'
    weight matrices, AdamW for the rest (MuonAdamW). Each group's ``lr_scale`` (--layer-decay)
    multiplies the learning rate the loop sets."""
    fused = True if scaler is not None else None
    groups = model.param_groups(weight_decay, layer_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused)
    matrices = {id(p) for block in model.blocks for p in block.parameters() if p.ndim == 2 and p.requires_grad}

    def split(hidden: bool) -> list[dict]:
        parts = [{**g, "params": [p for p in g["params"] if (id(p) in matrices) == hidden]} for g in groups]
        return [g for g in parts if g["params"]]

    muon = torch.optim.Muon(split(True), lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, torch.optim.AdamW(split(False), lr=lr, betas=(0.9, 0.999), fused=fused))


class MuonAdamW:
    """Two optimizers stepped as one (Keller Jordan's split for transformers): Muon, which
    orthogonalises each weight matrix's momentum by Newton-Schulz iterations, and AdamW for
    the parameters that are not hidden matrices. The loop sets ``lr`` on every group alike:
    Muon's step is scaled to AdamW's RMS (``adjust_lr_fn="match_rms_adamw"``)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def gradient_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> "torch.amp.GradScaler | None":
    """fp16 gradients underflow without a loss scale (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


class WeightEMA:
    """An exponential moving average of a model's weights, updated after every step with
    one fused foreach lerp. The decay ramps up as min(decay, (1 + step) / (10 + step)),
    so early averages are not dominated by the random initialisation. The average is a
    deep copy of the model: the same architecture and the same kernel options."""

    def __init__(self, model: ViT, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self._ema = list(self.model.parameters())
        self._src = list(model.parameters())

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._ema, [p.detach() for p in self._src], 1.0 - d)


@dataclass
class Setup:
    """What a run trains with, built once."""

    model: ViT
    step_model: torch.nn.Module  # the model as the training step calls it (compiled, DDP-wrapped, or itself)
    ema: WeightEMA | None
    optimizer: "torch.optim.Optimizer | MuonAdamW"
    scaler: torch.amp.GradScaler | None  # fp16 only
    class_weights: torch.Tensor | None  # each class's weight in the loss (--class-weights balanced), on the device
    origin: dict  # where the first weights came from (--init-from): folder, kind, sha256; {} from scratch
    normalize: Normalize
    batches: Batches
    meta: CheckpointMeta
    config_yaml: str
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def build(cls, cfg: TrainConfig, data: DatasetSplits, device: torch.device, kernels: Kernels,
              dist: Dist, amp_dtype: torch.dtype | None = None, checkpoint: Path | None = None) -> "Setup":
        """Everything built on ``device``, computing with ``kernels`` under ``amp_dtype``; with
        several processes (``dist``), wrapped for DistributedDataParallel, each rank handed its
        rows of a batch. A new run (no ``checkpoint`` to resume) starts from --init-from's
        weights where it names a folder."""
        model_cfg = build_model_config(cfg, data)
        model = ViT(model_cfg, kernels)
        if checkpoint is not None and dist.main:  # resumed: its manifest (rank 0's machine) says where they came from
            origin = read_meta(checkpoint, verify=False).extra.get("init_from")
            origin = origin if isinstance(origin, dict) and all(
                isinstance(v, str) and len(v) <= 4096 for v in origin.values()) and len(origin) <= 8 else {}
        elif cfg.init_from and dist.main:  # (the other ranks get the weights from DistributedDataParallel's broadcast)
            origin = initial_weights(model, cfg.init_from)
        else:
            origin = {}
        if checkpoint is None and not cfg.init_from:
            apply_init(model, cfg.init)  # --init: how a new run's blocks start
        model.freeze(cfg.freeze_blocks)
        model = model.to(device)
        normalize = Normalize(data.mean, data.std, device)
        batch_size = min(cfg.batch_size, len(data.train) // dist.world * dist.world)
        step_model = model
        if dist.world > 1:  # wrapped first and compiled after (PyTorch's order: the gradient all-reduce can then
            from torch.nn.parallel import DistributedDataParallel  # overlap the backward pass)

            step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            step_model = torch.compile(step_model)
        batches = build_batches(cfg, data, model_cfg, normalize, batch_size, device, dist)
        steps = batches.steps_per_epoch
        scaler = gradient_scaler(device, amp_dtype)
        return cls(
            model=model,
            step_model=step_model,
            ema=WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None,
            optimizer=build_optimizer(model, cfg.lr, cfg.weight_decay, scaler, cfg.optimizer, cfg.layer_decay),
            scaler=scaler,
            class_weights=balanced_weights(torch.bincount(data.train.labels, minlength=len(data.classes))).to(device)
            if cfg.class_weights == "balanced" else None,
            origin=origin,
            normalize=normalize,
            batches=batches,
            meta=CheckpointMeta(model_cfg, data.classes, data.mean, data.std, cfg.dataset, data=data.fingerprint()),
            config_yaml=cfg.to_yaml(),
            steps_per_epoch=steps,
            total_steps=schedule_steps(cfg, steps),
            warmup_steps=warmup_steps(cfg, steps),
        )

    def flops_in(self, epoch: int) -> float:
        """The work one training image of epoch ``epoch`` costs, as computed: the class-token
        shortcut, and the smaller images of --progressive-size, counted."""
        cfg, size = self.meta.model, self.batches.size_in(epoch)
        cfg = cfg if size == cfg.image_size else replace(cfg, image_size=size)
        return flops_per_image(cfg, training=True, cls_only_last_block=self.model.kernels.cls_only_last_block)

    def origin_record(self) -> dict:
        """What a checkpoint's manifest keeps of where the run's first weights came from."""
        return {"init_from": self.origin} if self.origin else {}

    def batches_in(self, epoch: int) -> int:
        """Batches of epoch ``epoch`` (0-based): all of them but in a partial last epoch."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def reschedule(self, cfg: TrainConfig) -> None:
        """A new length (a --time-budget decision): the schedule and the saved config follow."""
        self.total_steps = schedule_steps(cfg, self.steps_per_epoch)
        self.warmup_steps = warmup_steps(cfg, self.steps_per_epoch)
        self.config_yaml = cfg.to_yaml()
