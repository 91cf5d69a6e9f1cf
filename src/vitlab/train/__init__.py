"""Training, as a package of stages, each a plain module of functions over small dataclasses:

1. ``folder``      the run folder: a new one, or the one to resume and its checks (RunFolder)
2. ``compute``     where and how this process computes, its place in the job (Compute)
3. ``setup``       model, optimizer, EMA, schedule, built once (Setup)
4. ``batches``     the loader: epoch order, crops, augmentation, mixing, this rank's rows (Batches)
5. ``state``       what a checkpoint's state.pt holds, saved and restored as one (TrainState)
6. ``loop``        one optimizer step after another over an epoch (train_epoch), no I/O;
   ``epochs``      around it: progress, TensorBoard, checkpoints, stop requests, validation
7. ``timebudget``  --time-budget: calibration, plan and re-plans, a no-op without it (TimeBudget)
8. ``finish``      the best checkpoint evaluated, and the report (finish_run)

``train()`` below tells the story in that order. The whole dataset lives on the training
device as uint8; each batch is drawn by index and augmented there in one batched pass;
metrics accumulate on the device and are read once per log interval; checkpoints resume
bit-exactly. Under torchrun every rank runs the same story: rank 0 writes, and the others
follow its decisions (``Compute.by_main``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .. import budget as budgets
from ..config import TrainConfig
from ..data import DatasetSplits, load_dataset
from ..distributed import lost_peer
from ..errors import ConfigError, NonFiniteLoss, TrainingInterrupted
from ..fileio import printable
from ..inference import predict_logits
from ..devices import matmul_peak
from .batches import PLAN_IMAGES, Batches, crop_plans, epoch_order
from .compute import Compute, choose_kernels
from .epochs import run_epochs, stop_on_signals
from .finish import RunResult, finish_run
from .folder import RunFolder, check_same_data, peer_lost, prepare_state
from .loop import F, apply_gradients, loss_and_logits, train_epoch
from .setup import Setup, WeightEMA, build_model_config, build_optimizer, lr_at, pretrained_arch
from .state import TrainState, rng_state, set_rng_state
from .timebudget import TimeBudget

__all__ = ["train", "RunResult", "RunFolder", "Compute", "Setup", "Batches", "TrainState", "TimeBudget",
           "build_model_config", "build_optimizer", "loss_and_logits", "apply_gradients", "lr_at", "WeightEMA",
           "epoch_order", "crop_plans", "PLAN_IMAGES", "rng_state", "set_rng_state", "train_epoch", "predict_logits",
           "NonFiniteLoss", "TrainingInterrupted", "F"]


def train(cfg: TrainConfig | None = None, *, resume: str | Path | None = None, overwrite: bool = False,
          progress: bool = True, log: Callable[[str], None] | None = None, data: DatasetSplits | None = None,
          stop_when: Callable[[TrainState], bool] | None = None, changes: dict | None = None) -> RunResult:
    """Train a ViT as ``cfg`` says (default: the embedded digits preset), or continue the run
    folder ``resume`` (its saved config, with ``changes`` to runtime fields only: device,
    threads, data_dir, ...), and write its report. ``data``: already-loaded splits instead of
    ``cfg.dataset``. ``stop_when(state)``, asked after every step, stops the run as Ctrl-C does:
    checkpoint saved, TrainingInterrupted raised with the command that resumes. Under torchrun
    (RANK and WORLD_SIZE set) this process is one rank of a data-parallel job."""
    log, session_start, origin = log or tqdm.write, time.perf_counter(), budgets.origin()
    started = RunFolder.initial_config(cfg, resume, changes or {})
    compute = Compute.start(started)
    log, progress = (log, progress) if compute.main else ((lambda s: None), False)
    folder = None
    try:
        folder = open_folder(cfg, resume, started, changes or {}, compute, log)
        data = data if data is not None else load_data(folder.cfg, compute, log)
        check_same_data(folder, data, compute)
        if folder.cfg.init_from and folder.checkpoint is None:  # the architecture of the weights it starts from
            folder.cfg = compute.by_main(lambda: pretrained_arch(folder.cfg, data.image_size))
        compute.adopt(compute.by_main(lambda: choose_kernels(folder.cfg, data, compute, folder.checkpoint)))
        setup = Setup.build(folder.cfg, data, compute.device, compute.kernels, compute.dist, compute.amp_dtype,
                            folder.checkpoint)
        budget = TimeBudget.start(folder.cfg, setup, data, compute, origin, resumed=resume is not None)
        fix_length(folder, setup, budget, log)
        if folder.dir is None:  # created only now: a bad dataset or a budget too short leaves no folder behind
            folder.dir = compute.by_main(lambda: folder.create(overwrite, budget.note()) or folder.dir)
        if compute.main:  # before the state, which starts the training clock: importing tensorboard takes seconds
            folder.open_board()
        state = prepare_state(folder, setup, compute, log)
        log(header(folder, setup, data, compute))
        peak = matmul_peak(compute.device, compute.amp_dtype, reps=5) if progress else None
        with stop_on_signals() as signalled:
            def should_stop() -> bool:
                return signalled.is_set() or (stop_when is not None and stop_when(state))

            run_epochs(folder, setup, state, data, compute, budget, should_stop, progress, log, peak)
        return finish_run(folder, setup, data, compute, state, budget, state.seconds(),
                          time.perf_counter() - session_start, log)
    except RuntimeError as e:
        if compute.dist.world == 1 or not lost_peer(e):
            raise
        raise peer_lost(folder, compute, e) from None
    finally:
        if folder is not None:
            folder.close()
        compute.stop()


def open_folder(cfg: TrainConfig | None, resume: str | Path | None, started: TrainConfig, changes: dict,
                compute: Compute, log: Callable[[str], None]) -> RunFolder:
    """The run folder, opened by the writing process (the others get a copy without its lock)."""
    opened = compute.by_main(lambda: RunFolder.open(cfg if resume else started, resume, log, started, changes))
    folder = opened if compute.main else RunFolder(opened.cfg, opened.dir, None, opened.checkpoint,
                                                   resuming=opened.resuming)
    compute.check(folder.cfg)
    return folder


def load_data(cfg: TrainConfig, compute: Compute, log: Callable[[str], None]) -> DatasetSplits:
    """The run's dataset: the writing process first (it may download or extract), then the others."""
    loaded: dict = {}

    def load() -> None:
        loaded["data"] = load_dataset(cfg.dataset, cfg.data_dir, val_size=cfg.val_size, image_size=cfg.image_size,
                                      download=cfg.download and compute.main, coarse_labels=cfg.coarse_labels, warn=log)

    compute.by_main(load)
    if "data" not in loaded:
        load()
    data = loaded["data"]
    if cfg.train_per_class:
        data = replace(data, train=data.train.per_class(cfg.train_per_class))
        log(f"training on the first {cfg.train_per_class} images of each class: {len(data.train)} images")
    return data


def fix_length(folder: RunFolder, setup: Setup, budget: TimeBudget, log: Callable[[str], None]) -> None:
    """The run's length: the time budget's plan, or --max-steps; the epoch count follows the step
    count in what is saved and shown."""
    cfg = budget.shape(folder.cfg, setup.steps_per_epoch)
    if budget.note():
        log(budget.note())
    if cfg.max_steps:
        cfg = cfg.replace(epochs=budgets.epochs_for(cfg.max_steps, setup.steps_per_epoch))
        if cfg.progressive_epochs >= cfg.epochs:
            raise ConfigError(f"--max-steps {cfg.max_steps} ends within the --progressive-epochs "
                              f"{cfg.progressive_epochs} ({setup.steps_per_epoch} steps each): no step at the full size")
        setup.reschedule(cfg)
    folder.cfg = cfg


def header(folder: RunFolder, setup: Setup, data: DatasetSplits, compute: Compute) -> str:
    cfg = folder.cfg
    text = (f"vitlab: {cfg.dataset} {len(data.train)}/{len(data.val)}/{len(data.test)} train/val/test images "
            f"{data.channels}x{data.image_size}x{data.image_size}, {len(data.classes)} classes | "
            f"ViT {setup.model.num_params() / 1e6:.2f}M params, {setup.meta.model.num_patches} patches, "
            f"{setup.flops_in(cfg.epochs - 1) / 1e9:.3f} GFLOP/img/step | {compute.describe()} | {printable(folder.dir)}")
    if cfg.compile and compute.device.type == "cpu" and compute.amp_dtype is not None:
        text += ("\nwarning: --compile with bf16 on CPU trained the digits to 3-10 points lower accuracy than eager "
                 "(tests/test_speed_paths.py) and ended no CIFAR-10 run sooner in our measurements (benchmarks/RESULTS.md); "
                 "consider --precision fp32 or no --compile")
    return text
