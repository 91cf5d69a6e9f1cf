"""Training: the whole dataset on the device as uint8, batches drawn by index and
augmented there, AdamW with warmup + cosine, metrics accumulated on the device
and read once per log interval, checkpoints that resume bit-exactly.
"""

from __future__ import annotations

import math
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from . import report
from .augment import BatchAugment, Normalize, mix_batch
from .checkpoint import (CheckpointMeta, atomic_write_text, load_state, load_weights, read_meta, recover,
                         save_checkpoint)
from .config import TrainConfig
from .data import DatasetSplits, ImageSet, load_dataset
from .errors import CheckpointError, ConfigError, VitlabError
from .model import ViT, ViTConfig, flops_per_image
from .runtime import autocast, keep_freed_memory, resolve_attention, resolve_device, resolve_precision, synchronize


class TrainingInterrupted(VitlabError):
    """Raised after a SIGINT/SIGTERM once the last checkpoint is safely written."""


class NonFiniteLoss(VitlabError):
    """The loss became NaN or Inf."""


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, tuple[float, float]]  # split -> (loss, accuracy)
    epochs: int
    seconds: float


# ------------------------------------------------------------------- helpers

def default_patch_size(image_size: int) -> int:
    return 4 if image_size >= 16 else 2


def build_model_config(cfg: TrainConfig, data: DatasetSplits, attention: str) -> ViTConfig:
    image_size = data.image_size
    patch = cfg.patch_size or default_patch_size(image_size)
    if image_size % patch:
        raise ConfigError(f"--patch-size {patch} does not divide the image size {image_size} of {cfg.dataset}; "
                          f"choose one of {[p for p in range(1, image_size + 1) if image_size % p == 0]} or set --image-size")
    return ViTConfig(image_size=image_size, channels=data.channels, num_classes=len(data.classes), patch_size=patch,
                     depth=cfg.depth, heads=cfg.heads, dim=cfg.dim, mlp_dim=cfg.mlp_dim, dropout=cfg.dropout,
                     attn_dropout=cfg.attn_dropout, drop_path=cfg.drop_path, layer_scale=cfg.layer_scale, pool=cfg.pool,
                     patch_embed=cfg.patch_embed, lsa=cfg.lsa, attention=attention)


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min(min_lr, lr)`` at ``total_steps``."""
    min_lr = min(min_lr, lr)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: ViT, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the weight-decay groups."""
    return torch.optim.AdamW(model.param_groups(weight_decay), lr=lr, betas=(0.9, 0.999))


def loss_and_logits(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                    amp_dtype: torch.dtype | None, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass under autocast; the loss itself in fp32."""
    with autocast(device, amp_dtype):
        logits = model(x)
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing), logits


def apply_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                    grad_clip: float) -> None:
    """Backward, optional gradient-norm clipping, optimizer step (gradients already zeroed)."""
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


class WeightEMA:
    """An exponential moving average of a model's weights, updated after every step with
    one fused foreach lerp. The decay ramps up as min(decay, (1 + step) / (10 + step)),
    so early averages are not dominated by the random initialisation."""

    def __init__(self, model: ViT, decay: float):
        self.decay = decay
        self.model = ViT(model.cfg).to(next(model.parameters()).device)
        self.model.load_state_dict(model.state_dict())
        self.model.requires_grad_(False).eval()
        self._ema = list(self.model.parameters())
        self._src = list(model.parameters())

    @torch.no_grad()
    def update(self, model: ViT, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._ema, [p.detach() for p in self._src], 1.0 - d)


def epoch_order(n: int, seed: int, epoch: int, device: torch.device, repeats: int = 1) -> torch.Tensor:
    """The shuffled sample order of an epoch: a pure function of (seed, epoch), so a
    resumed run draws exactly the batches the uninterrupted one would have.

    With ``repeats`` > 1 (repeated augmentation, Hoffer et al. 2020), n/repeats distinct
    images each appear ``repeats`` times in a row, so their copies share a batch and get
    different augmentations; the epoch keeps its length of n samples."""
    g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    if repeats > 1:
        order = order[: -(-n // repeats)].repeat_interleave(repeats)[:n]
    return order.to(device)


PLAN_IMAGES = 16_384  # crops + flips drawn at once (BatchAugment.plan)


def crop_plans(augment: BatchAugment, seed: int, epoch: int, first: int, steps: int, batch_size: int,
               image_hw: tuple[int, int], device: torch.device) -> Iterator[torch.Tensor | None]:
    """Each batch's crop + flip plan for batches ``first`` to ``steps`` - 1 of an epoch,
    drawn PLAN_IMAGES at a time. Each block is a pure function of (seed, epoch, block),
    like ``epoch_order``, so a resumed run crops exactly as the uninterrupted one would."""
    per_block = max(1, PLAN_IMAGES // batch_size)
    block = None
    for b in range(first, steps):
        if b == first or b % per_block == 0:
            # (+ 7: not the seed epoch_order uses for the same seed and epoch)
            g = torch.Generator(device=device).manual_seed(((seed * 1_000_003 + epoch) * 65_537 + b // per_block + 7)
                                                           % 2**63)
            block = augment.plan(per_block * batch_size, *image_hw, g, device)
        yield None if block is None else block[(b % per_block) * batch_size:][:batch_size]


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, normalize: Normalize, batch_size: int,
                   device: torch.device, amp_dtype: torch.dtype | None, tta_flip: bool = False) -> torch.Tensor:
    """Logits (fp32, on ``device``) for a uint8 image tensor, in large eval batches;
    with ``tta_flip``, the mean of the logits of each image and its mirror image."""
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


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of logits against integer labels."""
    labels = labels.to(logits.device)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def evaluate(model: torch.nn.Module, data: ImageSet, normalize: Normalize, batch_size: int, device: torch.device,
             amp_dtype: torch.dtype | None, tta_flip: bool = False) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on a split, without augmentation or label smoothing."""
    return loss_and_accuracy(predict_logits(model, data.images, normalize, batch_size, device, amp_dtype, tta_flip),
                             data.labels)


def run_config(run_dir: Path) -> TrainConfig:
    """The saved configuration of a run folder (what --resume continues)."""
    if not (Path(run_dir) / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir}: not a run folder (no config.yaml); pass the folder `vitlab train` created")
    return TrainConfig.load_yaml(Path(run_dir) / "config.yaml")


def new_run_dir(cfg: TrainConfig, overwrite: bool) -> Path:
    name = cfg.name or f"{cfg.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out).expanduser() / name
    if run_dir.exists():
        if not overwrite:
            raise ConfigError(f"run folder {run_dir} already exists; pass --overwrite to replace it or --name to choose another")
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"cannot create run folder {run_dir}: {e.strerror}") from None
    return run_dir


@contextmanager
def stop_on_signals():
    """First SIGINT/SIGTERM sets a flag the loop checks at each step boundary; a
    second SIGINT raises KeyboardInterrupt at once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _write_metrics(path: Path, rows: list[dict]) -> None:
    fields = report.METRIC_FIELDS + [k for k in ("val_ema_loss", "val_ema_acc") if rows and k in rows[0]]
    lines = [",".join(fields)]
    for r in rows:
        lines.append(",".join(_fmt(r[k]) for k in fields))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _fmt(v) -> str:
    return str(v) if isinstance(v, int) else repr(float(v))


# --------------------------------------------------------------------- train

def train(cfg: TrainConfig | None = None, *, resume: str | Path | None = None, overwrite: bool = False,
          progress: bool = True, log: Callable[[str], None] | None = None, data: DatasetSplits | None = None,
          _stop_after_steps: int | None = None) -> RunResult:
    """Train a ViT as ``cfg`` says (or continue the run folder ``resume``) and write its report.

    With ``resume``, ``cfg`` defaults to the run's saved config. ``data`` trains on
    already-loaded splits instead of loading ``cfg.dataset`` (benchmarks, notebooks).

    ``_stop_after_steps`` simulates an interruption after that many optimizer
    steps (tests use it to check that resuming is exact).
    """
    log = log or (lambda s: tqdm.write(s))
    wall_start = time.perf_counter()

    # ---- configuration and run folder
    state = None
    if resume is not None:
        run_dir = Path(resume).expanduser()
        # The run's own config; a caller may pass it back with runtime fields changed (device, threads).
        cfg = (cfg or run_config(run_dir)).validate()
        ckpt_dir = recover(run_dir, "last")
        recover(run_dir, "best", need_state=False)
        for stale in run_dir.glob(".*.tmp"):  # half-written metrics or plots of the killed process
            stale.unlink(missing_ok=True)
        if ckpt_dir is None:
            raise CheckpointError(f"{run_dir}: no intact checkpoint to resume from")
        if ckpt_dir.name != "last":  # recover() falls back to last.prev only when last/ is missing or damaged
            log(f"note: {run_dir / 'last'} is missing or damaged; resuming from {ckpt_dir.name}")
        state = load_state(ckpt_dir)
    else:
        cfg = (cfg or TrainConfig()).validate()
        run_dir = None  # created once the data has loaded, so a bad dataset leaves nothing behind

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    attention = resolve_attention(cfg.attention, device, amp_dtype)
    keep_freed_memory(device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # ---- data, resident on the device as uint8
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_dir, val_size=cfg.val_size, image_size=cfg.image_size,
                            download=cfg.download, coarse_labels=cfg.coarse_labels, warn=log)
    model_cfg = build_model_config(cfg, data, attention)
    if run_dir is None:
        run_dir = new_run_dir(cfg, overwrite)
        cfg.save_yaml(run_dir / "config.yaml")
    train_images = data.train.images.to(device)
    train_labels = data.train.labels.to(device)
    normalize = Normalize(data.mean, data.std, device)
    augment = BatchAugment(normalize, data.image_size, cfg.crop, cfg.crop_scale, cfg.crop_ratio, cfg.hflip,
                           cfg.random_erasing, cfg.trivial_augment)
    mixing = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0

    # ---- model and optimizer
    model = ViT(model_cfg).to(device)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    model.cls_only_last_block = cfg.cls_only_last_block
    step_model = torch.compile(model) if cfg.compile else model
    ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if cfg.compile and device.type == "cpu" and amp_dtype is not None:
        log("warning: --compile with bf16 on CPU trained to 3-10 points lower accuracy than eager in our "
            "measurements (tests/test_speed_paths.py) for a 3-5% speed-up; consider --precision fp32 or no --compile")

    n_train = len(data.train)
    batch_size = min(cfg.batch_size, n_train)
    steps_per_epoch = n_train // batch_size  # drop the ragged last batch: static shapes
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed)

    meta = CheckpointMeta(model_cfg, data.classes, data.mean, data.std, cfg.dataset)
    config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    metrics_path = run_dir / "metrics.csv"
    rows: list[dict] = report.read_metrics(metrics_path) if state is not None else []
    for r in rows:
        r["epoch"], r["step"] = int(r["epoch"]), int(r["step"])
    start_epoch, start_batch, step, best_acc, elapsed, lr_scale = 0, 0, 0, -1.0, 0.0, 1.0
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, seen (this epoch)
    if state is not None:
        load_weights(ckpt_dir, model)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_batch, step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        best_acc, elapsed = float(state["best_val_acc"]), float(state["elapsed"])
        lr_scale = float(state.get("lr_scale", 1.0))
        sums = state["epoch_sums"].to(device)
        aug_gen.set_state(state["aug_generator"])
        if ema is not None:
            ema.model.load_state_dict(state["ema"])
        _set_rng_state(state["rng"], device)
        rows = rows[: int(state["metrics_rows"])]  # drop rows written after this checkpoint
        _write_metrics(metrics_path, rows)
        log(f"resuming {run_dir} at epoch {start_epoch + 1}, step {step}")

    def training_state(epoch: int, batch: int) -> dict:
        return {"epoch": epoch, "batch": batch, "step": step, "optimizer": optimizer.state_dict(),
                "aug_generator": aug_gen.get_state(), "rng": _rng_state(device), "epoch_sums": sums.clone(),
                "best_val_acc": best_acc, "metrics_rows": len(rows), "elapsed": elapsed + (time.perf_counter() - t0),
                "lr_scale": lr_scale, **({"ema": ema.model.state_dict()} if ema is not None else {})}

    # The first step whose loss was NaN/Inf, tracked on the device so that the
    # hot loop needs no host sync; read at log intervals and before every save.
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    step_on_device = torch.full((), step, dtype=torch.long, device=device)

    def raise_if_nonfinite() -> None:
        bad = int(bad_step)
        if bad < 0:
            return
        last = run_dir / "last"
        good = f"{last} (step {read_meta(last, verify=False).extra.get('step')})" if (last / "model.json").is_file() else "none yet"
        raise NonFiniteLoss(f"loss became NaN/Inf at step {bad} (lr {lr_scale * lr_at(bad - 1, total_steps, warmup_steps, cfg.lr, cfg.min_lr):.2e}); "
                            f"training stopped. Last good checkpoint: {good}. Retry with a lower --lr, "
                            f"--grad-clip 1, or --on-nonfinite skip")

    def save_last(epoch: int, batch: int) -> None:
        raise_if_nonfinite()  # never overwrite a good checkpoint with poisoned weights
        meta.extra = {"epoch": epoch, "batch": batch, "step": step}
        save_checkpoint(run_dir / "last", model, meta, config_yaml, training_state(epoch, batch))

    flops = flops_per_image(model_cfg)
    log(f"vitlab: {cfg.dataset} {n_train}/{len(data.val)}/{len(data.test)} train/val/test images "
        f"{data.channels}x{data.image_size}x{data.image_size}, {len(data.classes)} classes | "
        f"ViT {model.num_params() / 1e6:.2f}M params, {model_cfg.num_patches} patches, "
        f"{flops / 1e9:.3f} GFLOP/img/step | {device.type} {'bf16' if amp_dtype else 'fp32'} {attention} | {run_dir}")

    t0 = time.perf_counter()
    with stop_on_signals() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            order = epoch_order(n_train, cfg.seed, epoch, device, cfg.repeated_augment)
            first = start_batch if epoch == start_epoch else 0
            if first == 0:
                sums.zero_()
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not progress, leave=False, unit="step", dynamic_ncols=True)
            t_epoch, seen_at_start = time.perf_counter(), first * batch_size
            plans = crop_plans(augment, cfg.seed, epoch, first, steps_per_epoch, batch_size,
                               train_images.shape[2:], device)
            for b, plan in zip(range(first, steps_per_epoch), plans):
                lr = lr_scale * lr_at(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                idx = order[b * batch_size: (b + 1) * batch_size]
                # index_select, not images[idx]: 6 us instead of 105 us for a CIFAR batch on CPU
                x = augment(train_images.index_select(0, idx), aug_gen, plan)
                y = train_labels.index_select(0, idx)
                target = y
                if mixing:  # soft targets; accuracy below still counts the dominant label
                    x, target = mix_batch(x, y, len(data.classes), cfg.mixup_alpha, cfg.cutmix_alpha, aug_gen)
                loss, logits = loss_and_logits(step_model, x, target, device, amp_dtype, cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                if cfg.on_nonfinite == "skip" and not torch.isfinite(loss):  # host sync, only with this option
                    lr_scale *= 0.5
                    log(f"step {step + 1}: loss is {loss.item()}; skipped the batch, learning rate now x{lr_scale:g}")
                    continue
                step_on_device += 1
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step_on_device, bad_step)
                apply_gradients(model, optimizer, loss, cfg.grad_clip)
                step += 1
                if ema is not None:
                    ema.update(model, step)
                with torch.no_grad():
                    sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                         torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
                if (b + 1) % cfg.log_every == 0 or b + 1 == steps_per_epoch:
                    raise_if_nonfinite()
                    loss_sum, correct, seen = sums.tolist()  # with the line above, the only host syncs in the loop
                    rate = (seen - seen_at_start) / max(1e-9, time.perf_counter() - t_epoch)
                    bar.set_postfix_str(f"loss {loss_sum / seen:.4f} acc {correct / seen:.4f} {rate:,.0f} img/s")
                    bar.update((b + 1) - bar.n)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and b + 1 < steps_per_epoch:
                    save_last(epoch, b + 1)
                stopping = stop.is_set() or (_stop_after_steps is not None and step >= _stop_after_steps)
                if stopping and b + 1 < steps_per_epoch:  # at an epoch's end, stop after its checkpoint below
                    save_last(epoch, b + 1)
                    bar.close()
                    raise TrainingInterrupted(f"stopped at epoch {epoch + 1}, step {step}; "
                                              f"continue with: vitlab train --resume {run_dir}")
            bar.close()
            synchronize(device)
            epoch_seconds = time.perf_counter() - t_epoch
            raise_if_nonfinite()
            loss_sum, correct, seen = sums.tolist()
            # Per-epoch validation sees each image once; flip averaging (``tta_flip``) would double
            # its cost every epoch and is kept for the final table, computed from the chosen checkpoint.
            val_loss, val_acc = evaluate(model, data.val, normalize, cfg.eval_batch_size, device, amp_dtype)
            row = {"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": loss_sum / seen,
                   "train_acc": correct / seen, "val_loss": val_loss, "val_acc": val_acc}
            candidates = {"raw": (val_acc, model)}
            if ema is not None:
                row["val_ema_loss"], row["val_ema_acc"] = evaluate(ema.model, data.val, normalize, cfg.eval_batch_size,
                                                                   device, amp_dtype)
                candidates["ema"] = (row["val_ema_acc"], ema.model)
            rows.append(row)
            _write_metrics(metrics_path, rows)
            kind, (epoch_best, best_model) = max(candidates.items(), key=lambda kv: kv[1][0])
            improved = epoch_best > best_acc
            if improved:  # the best weights of the run, raw or averaged
                best_acc = epoch_best
                meta.extra = {"epoch": epoch + 1, "step": step, "val_acc": epoch_best, "weights": kind}
                save_checkpoint(run_dir / "best", best_model, meta, config_yaml)
            save_last(epoch + 1, 0)
            ema_text = f" | ema val acc {row['val_ema_acc']:.4f}" if ema is not None else ""
            log(f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                f" | val loss {val_loss:.4f} acc {val_acc:.4f}{ema_text}{' *' if improved else ''}"
                f" | {epoch_seconds:.1f}s {(seen - seen_at_start) / epoch_seconds:,.0f} img/s")
            if stop.is_set() or (_stop_after_steps is not None and step >= _stop_after_steps):
                if epoch + 1 < cfg.epochs:
                    raise TrainingInterrupted(f"stopped after epoch {epoch + 1}, step {step}; "
                                              f"continue with: vitlab train --resume {run_dir}")

    train_seconds = elapsed + (time.perf_counter() - t0)
    return finish_run(run_dir, cfg, data, model, normalize, device, amp_dtype, rows, train_seconds,
                      time.perf_counter() - wall_start, log)


def finish_run(run_dir: Path, cfg: TrainConfig, data: DatasetSplits, model: ViT, normalize: Normalize,
               device: torch.device, amp_dtype: torch.dtype | None, rows: list[dict], train_seconds: float,
               session_seconds: float, log: Callable[[str], None]) -> RunResult:
    """Evaluate the best checkpoint on every split and write results.md and the plots."""
    load_weights(run_dir / "best", model)
    model.eval()
    # Test logits are computed once: for the table and for the predictions grid below.
    test_logits = predict_logits(model, data.test.images, normalize, cfg.eval_batch_size, device, amp_dtype,
                                 cfg.tta_flip).cpu()
    test = loss_and_accuracy(test_logits, data.test.labels)
    results = {
        "Train": evaluate(model, data.train, normalize, cfg.eval_batch_size, device, amp_dtype, cfg.tta_flip),
        "Val": test if data.val_is_test else evaluate(model, data.val, normalize, cfg.eval_batch_size, device,
                                                      amp_dtype, cfg.tta_flip),
        "Test": test,
    }
    best_epoch = read_meta(run_dir / "best", verify=False).extra.get("epoch", 0)  # raw or EMA weights, whichever won
    title = f"{cfg.dataset}: ViT {cfg.depth}x{cfg.dim}, patch {model.cfg.patch_size}"
    report.write_results(run_dir / "results.md", title, results, {
        "epochs": f"{len(rows)} (best val accuracy at epoch {best_epoch}; the table uses that checkpoint)",
        "training time": f"{train_seconds:.1f} s" + (f" (this session {session_seconds:.1f} s)" if session_seconds < train_seconds else ""),
        "validation": "the test set" if data.val_is_test else f"{len(data.val)} images held out of train (fixed seed)",
        "model": f"{model.num_params():,} parameters, {model.cfg.num_patches} patches of {model.cfg.patch_size}x{model.cfg.patch_size}",
        "device": f"{device.type}, {'bf16 autocast' if amp_dtype else 'fp32'}, attention {model.cfg.attention}",
        "config": "config.yaml",
    })
    if rows:
        report.plot_curves(rows, run_dir / "loss_curve.png", title)
    # The grid: the first test images, then the first mistakes among the rest (up to 8).
    probs, preds = test_logits.softmax(1).max(1)
    first = torch.arange(min(24, len(data.test)))
    wrong = (preds != data.test.labels).nonzero().flatten()
    show = torch.cat([first, wrong[wrong >= len(first)][:32 - len(first)]])
    report.plot_predictions(data.test.images[show], data.test.labels[show], preds[show], probs[show],
                            data.classes, run_dir / "predictions.png", title)
    log("\n" + report.results_table(results) + f"\n\nresults in {run_dir}")
    return RunResult(run_dir, results, len(rows), train_seconds)
