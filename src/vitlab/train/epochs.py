"""Stage 6b, the epochs: around each epoch of the loop, what a person and the run folder see:
the progress bar and its log-interval figures, TensorBoard, the time budget's re-plans,
checkpoints, stop requests, the epoch's validation and its row of metrics.csv."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import metrics, report, rundir
from ..budget import format_duration
from ..checkpoint import read_meta, save_checkpoint
from ..data import DatasetSplits
from ..errors import NonFiniteLoss, TrainingInterrupted
from ..fileio import printable
from .compute import Compute
from .folder import RunFolder
from .loop import Pending, train_epoch
from .setup import Setup, lr_at
from .state import TrainState
from .timebudget import TimeBudget


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


def run_epochs(folder: RunFolder, setup: Setup, state: TrainState, data: DatasetSplits, compute: Compute,
               budget: TimeBudget, should_stop: Callable[[], bool], progress: bool, log: Callable[[str], None],
               peak: float | None) -> None:
    """Every epoch left, each followed by its validation and checkpoint; stops (having saved) when
    ``should_stop`` says so."""
    budget.begin(state.step)
    while state.epoch < folder.cfg.epochs:  # a --time-budget run may re-plan its length as it goes
        t_epoch = time.perf_counter()
        lr = epoch_with_progress(folder, setup, state, compute, budget, should_stop, progress, log, peak)
        t_end = time.perf_counter()
        end_epoch(folder, setup, state, data, compute, lr, t_end - t_epoch, log)
        budget.epoch_end(time.perf_counter() - t_end)
        if compute.any(should_stop()) and state.epoch < folder.cfg.epochs:
            raise interrupted(folder, compute, f"after epoch {state.epoch}, step {state.step}")


def mfu_percent(images_per_second: float, flops_per_image: float, peak: float, processes: int) -> float:
    """Model FLOPs utilisation of the job: its rate against the peak of all its processes
    (``peak`` is one process's device, or its share of the CPU's cores, as it measured it)."""
    return 100 * images_per_second * flops_per_image / (peak * processes)


def epoch_with_progress(folder: RunFolder, setup: Setup, state: TrainState, compute: Compute, budget: TimeBudget,
                        should_stop: Callable[[], bool], progress: bool, log: Callable[[str], None],
                        peak: float | None) -> float:
    """One epoch of the loop, with what happens at its log intervals, checkpoints and stop points."""
    cfg = folder.cfg
    bar = tqdm(total=setup.batches_in(state.epoch), initial=state.batch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
               disable=not progress, leave=False, unit="step", dynamic_ncols=True)
    # (the loop zeroes the sums when the epoch starts at its first batch)
    seen_at_start = 0.0 if state.batch == 0 else float(compute.sum(state.epoch_sums)[2])
    t_epoch = time.perf_counter()

    def at_interval(pending: Pending) -> None:
        raise_if_nonfinite(folder, setup, state, compute)
        loss_sum, correct, seen = compute.sum(state.epoch_sums).tolist()  # with the line above: the syncs
        rate = (seen - seen_at_start) / max(1e-9, time.perf_counter() - t_epoch)
        flush_step_losses(folder, compute, state, pending)
        if folder.board is not None:
            folder.board.scalar(metrics.THROUGHPUT, rate, state.step)
        mfu = f" MFU {mfu_percent(rate, setup.flops_in(state.epoch), peak, compute.dist.world):.0f}%" if peak else ""
        left = (setup.total_steps - state.step) * setup.batches.batch_size / max(rate, 1e-9)  # at this speed
        bar.set_postfix_str(f"loss {loss_sum / max(seen, 1):.4f} acc {correct / max(seen, 1):.4f} "
                            f"{rate:,.0f} img/s{mfu} | run ETA {format_duration(left)}")
        replanned = budget.keep(folder.cfg, setup, state.step, state.epoch, compute, log)
        if replanned is not None:
            folder.cfg = replanned
            setup.reschedule(replanned)
            if compute.main:
                folder.save_config(budget.note())
            bar.total = setup.batches_in(state.epoch)
        bar.update(state.batch - bar.n)

    def save(pending: Pending) -> None:
        flush_step_losses(folder, compute, state, pending)  # the events up to a checkpoint are all written
        save_last(folder, setup, state, compute)

    def stop_point(pending: Pending) -> None:
        if compute.any(should_stop()):
            save(pending)
            bar.close()
            raise interrupted(folder, compute, f"at epoch {state.epoch + 1}, step {state.step}")

    lr = train_epoch(setup, state, compute, cfg, at_interval=at_interval, save=save, stop_point=stop_point, skipped=log)
    bar.close()
    raise_if_nonfinite(folder, setup, state, compute)
    return lr


def flush_step_losses(folder: RunFolder, compute: Compute, state: TrainState, pending: Pending) -> None:
    """Write the steps since the last flush to TensorBoard (the mean over the ranks) and forget them."""
    if pending:
        losses = compute.sum(torch.stack([lo for lo, _ in pending]).float()) / compute.dist.world
        if folder.board is not None:
            folder.board.steps(state.step - len(pending) + 1, losses, [r for _, r in pending])
        pending.clear()


def nonfinite_error(folder: RunFolder, setup: Setup, state: TrainState, bad: int) -> NonFiniteLoss:
    cfg = folder.cfg
    last = folder.dir / "last"
    good = "none yet"
    if (last / "model.json").is_file():
        good = f"{printable(last)} (step {read_meta(last, verify=False).extra.get('step')})"
    lr = state.lr_scale * lr_at(bad - 1, setup.total_steps, setup.warmup_steps, cfg.lr, cfg.min_lr)
    return NonFiniteLoss(f"loss became NaN/Inf at step {bad} (lr {lr:.2e}); training stopped. Last good checkpoint: "
                         f"{good}. Retry with a lower --lr, --grad-clip 1, or --on-nonfinite skip")


def raise_if_nonfinite(folder: RunFolder, setup: Setup, state: TrainState, compute: Compute) -> None:
    """Stop at the first non-finite loss of any rank (a collective with several processes)."""
    none = torch.iinfo(torch.long).max
    bad = compute.dist.all_min(torch.where(state.bad_step < 0, none, state.bad_step))  # -1 on a rank: none
    bad = int(torch.where(bad == none, -1, bad))
    if bad >= 0:
        raise nonfinite_error(folder, setup, state, bad)


def save_last(folder: RunFolder, setup: Setup, state: TrainState, compute: Compute) -> None:
    """last/ with the training state (every rank takes part: the epoch's sums are summed over them)."""
    raise_if_nonfinite(folder, setup, state, compute)  # never overwrite a good checkpoint with poisoned weights
    setup.meta.extra = {"epoch": state.epoch, "batch": state.batch, "step": state.step, **compute.kernel_record(),
                        **setup.origin_record()}
    payload = state.to_dict(setup, compute.device, compute.sum(state.epoch_sums))
    if compute.main:
        save_checkpoint(folder.dir / "last", setup.model, setup.meta, setup.config_yaml, payload)
        if folder.board is not None:
            folder.board.flush()  # what TensorBoard has is on disk up to this checkpoint


def interrupted(folder: RunFolder, compute: Compute, where: str) -> TrainingInterrupted:
    compute.dist.barrier()  # every rank leaves after the checkpoint is written
    return TrainingInterrupted(f"stopped {where}; continue with: {folder.resume_command()}")


def end_epoch(folder: RunFolder, setup: Setup, state: TrainState, data: DatasetSplits, compute: Compute, lr: float,
              epoch_seconds: float, log: Callable[[str], None]) -> None:
    """Validate the raw (and EMA) weights, keep the better as best/ if it beats the run's
    best, checkpoint last/, append the epoch's row to metrics.csv and log it."""
    cfg = folder.cfg
    loss_sum, correct, seen = compute.sum(state.epoch_sums).tolist()
    if seen == 0:  # every batch skipped for a non-finite loss: nothing was trained
        raise NonFiniteLoss(f"every batch of epoch {state.epoch + 1} had a non-finite loss and was skipped; "
                            f"training stopped. Last good checkpoint: {printable(folder.dir / 'last')}. "
                            f"Retry with a lower --lr")
    # Per-epoch validation sees each image once; flip averaging (``tta_flip``) would double
    # its cost every epoch and is kept for the final table, computed from the chosen checkpoint.
    # With --class-weights balanced, what selects best/ is the balanced accuracy: a validation split
    # carved from imbalanced training data is as imbalanced, and its accuracy would favour the common classes.
    balanced = cfg.class_weights == "balanced"
    val_loss, val_acc = compute.evaluate(setup.model, data.val, setup.normalize, cfg.eval_batch_size, balanced=balanced)
    state.epoch += 1
    state.batch = 0
    row = dict(zip(metrics.COLUMNS, (state.epoch, state.step, lr, loss_sum / seen, correct / seen, val_loss, val_acc)))
    candidates = {"raw": (val_acc, setup.model)}
    if setup.ema is not None:
        ema_loss, ema_acc = compute.evaluate(setup.ema.model, data.val, setup.normalize, cfg.eval_batch_size,
                                             balanced=balanced)
        row.update(zip(metrics.EMA_COLUMNS, (ema_loss, ema_acc)))
        candidates["ema"] = (ema_acc, setup.ema.model)
    if not state.rows or "seconds" in state.rows[0]:  # (a run begun before the clock was recorded: as it began)
        row["seconds"] = round(state.seconds(), 3)
    state.rows.append(row)
    if folder.board is not None:
        folder.board.epoch(row)
    kind, (epoch_best, best_model) = max(candidates.items(), key=lambda kv: kv[1][0])
    improved = epoch_best > state.best_val_acc  # the same on every rank: the logits are gathered
    if improved:  # the best weights of the run, raw or averaged
        state.best_val_acc = epoch_best
        setup.meta.extra = {"epoch": state.epoch, "step": state.step, "val_acc": epoch_best, "weights": kind,
                            **compute.kernel_record(), **setup.origin_record()}
    if compute.main:
        report.append_metrics(folder.dir / rundir.METRICS, state.rows)
        if improved:
            save_checkpoint(folder.dir / "best", best_model, setup.meta, setup.config_yaml)
    save_last(folder, setup, state, compute)
    log(metrics.console_line(row, cfg.epochs, improved, epoch_seconds, seen))
