"""Stage 6, the loop: one optimizer step after another over an epoch's batches, with no file,
no log and no host sync of its own. What happens at a log interval, a checkpoint or a stop
request is the caller's (``at_interval``, ``save``, ``should_stop``): this module reads top to
bottom as the arithmetic of training."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..devices import autocast, synchronize
from .compute import Compute
from .setup import Setup, lr_at
from .state import TrainState

Pending = list[tuple[torch.Tensor, float]]  # (loss, lr) of the steps since the last log interval


def loss_and_logits(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                    amp_dtype: torch.dtype | None, label_smoothing: float,
                    class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass under autocast; the loss itself in fp32 (each class weighed by
    ``class_weights`` where given: --class-weights balanced)."""
    with autocast(device, amp_dtype):
        logits = model(x)
    return F.cross_entropy(logits.float(), y, weight=class_weights, label_smoothing=label_smoothing), logits


def apply_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                    grad_clip: float, scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward, optional gradient-norm clipping, optimizer step (gradients already zeroed).
    With a gradient scaler (fp16): the loss scaled, the gradients unscaled before clipping,
    the step skipped when they are not finite, the scale updated, all on the device."""
    if scaler is None:
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


def train_epoch(setup: Setup, state: TrainState, compute: Compute, cfg: TrainConfig, *,
                at_interval: Callable[[Pending], None], save: Callable[[Pending], None],
                stop_point: Callable[[Pending], None], skipped: Callable[[str], None]) -> float:
    """Train the rest of epoch ``state.epoch`` (from batch ``state.batch``); returns the last
    learning rate. Every ``cfg.log_every`` batches and at the epoch's end ``at_interval`` runs
    (the one host sync); ``save`` every ``cfg.checkpoint_every`` steps; ``stop_point`` after each
    step (several processes: at log intervals, where they agree) saves and raises
    TrainingInterrupted when a stop was asked for."""
    device = compute.device
    if state.batch == 0:
        state.epoch_sums.zero_()
    setup.model.train()
    step_on_device = torch.full((), state.step, dtype=torch.long, device=device)
    pending: Pending = []
    lr = cfg.lr
    for batch in setup.batches.epoch(state.epoch, state.batch, lambda: setup.batches_in(state.epoch)):
        lr = state.lr_scale * lr_at(state.step, setup.total_steps, setup.warmup_steps, cfg.lr, cfg.min_lr)
        for group in setup.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # (--layer-decay)
        loss, logits = loss_and_logits(setup.step_model, batch.images, batch.targets, device, compute.amp_dtype,
                                       cfg.label_smoothing, setup.class_weights)
        setup.optimizer.zero_grad(set_to_none=True)
        state.batch = batch.index + 1
        # host sync (and, with several processes, one collective) per step, only with this option
        if cfg.on_nonfinite == "skip" and compute.any(not bool(torch.isfinite(loss))):
            state.lr_scale *= 0.5
            skipped(f"step {state.step + 1}: loss is {loss.item()}; skipped the batch, learning rate now "
                    f"x{state.lr_scale:g}")
            continue
        step_on_device += 1
        state.bad_step = torch.where((state.bad_step < 0) & ~torch.isfinite(loss.detach()), step_on_device,
                                     state.bad_step)
        apply_gradients(setup.model, setup.optimizer, loss, cfg.grad_clip, setup.scaler)  # DDP averages in backward
        state.step += 1
        if setup.ema is not None:
            setup.ema.update(state.step)
        with torch.no_grad():
            acc = state.epoch_sums.dtype  # float64, float32 on MPS (devices.accumulation_dtype)
            state.epoch_sums += torch.stack([loss.detach().to(acc) * len(batch.labels),
                                             (logits.argmax(1) == batch.labels).sum().to(acc),
                                             batch.labels.new_full((), len(batch.labels), dtype=acc)])
        pending.append((loss.detach(), lr))
        at_log = state.batch % cfg.log_every == 0 or state.batch == setup.batches_in(state.epoch)
        if at_log:
            at_interval(pending)  # may change the epoch's length (--time-budget)
        if state.batch < setup.batches_in(state.epoch):
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                save(pending)
            # one process asks at every step; several agree at the log interval (at an epoch's end
            # the caller stops after the epoch's checkpoint)
            if compute.dist.world == 1 or at_log:
                stop_point(pending)
    synchronize(device)
    return lr
