"""Training: the whole dataset on the device as uint8, batches drawn by index and
augmented there, AdamW with warmup + cosine, metrics accumulated on the device
and read once per log interval, checkpoints that resume bit-exactly.

``train()`` reads top to bottom: open the run (or recover it), set up the runtime,
load the data, build the parts, start or restore the ``TrainState``, then for each
epoch ``train_epoch`` (the hot loop) and ``end_epoch`` (validate, pick raw or EMA
weights, checkpoint, log), and ``finish_run`` (the report).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import autotune, errors, report, rundir
from .augment import BatchAugment, Normalize, mix_batch
from . import budget as budgets
from .budget import Plan, epochs_for, format_duration, parse_duration
from .checkpoint import (CONFIG, CheckpointMeta, check_weights_header, load_state, load_weights, read_meta, recover,
                         save_checkpoint)
from .config import RUNTIME_FIELDS, TrainConfig, check_resume_changes, default_config
from .data import DatasetSplits, fingerprint_changes, load_dataset
from .distributed import LAUNCHER_ENV, Dist, PeerLost, from_env, lost_peer, start, threads_per_rank
from .distributed import stop as stop_distributed
from .errors import CheckpointError, ConfigError, DataError, NonFiniteLoss, TrainingInterrupted, VitlabError
from .fileio import printable, temp_dir
from .explanations import explain_images, plot_grid
from .inference import Predictor, loss_and_accuracy, predict_logits
from .model import Kernels, ViT, ViTConfig, check_patch_fits, default_patch_size, flops_per_image
from .tblog import Board
from .runtime import (autocast, keep_freed_memory, matmul_peak, resolve_attention, resolve_device, resolve_precision,
                      synchronize)


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, tuple[float, float]]  # split -> (loss, accuracy)
    epochs: int
    seconds: float


# ------------------------------------------------------------------- pieces

def build_model_config(cfg: TrainConfig, data: DatasetSplits) -> ViTConfig:
    """The architecture of ``cfg`` at the data's image size, channels and class count."""
    patch = cfg.patch_size or default_patch_size(data.image_size)
    try:
        check_patch_fits(data.image_size, patch, f"the image size {data.image_size} of {cfg.dataset}")
    except ConfigError as e:
        raise ConfigError(f"{e}, or set --image-size") from None
    return ViTConfig(**{**cfg.arch(), "patch_size": patch}, image_size=data.image_size, channels=data.channels,
                     num_classes=len(data.classes))


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


def rng_state(device: torch.device) -> dict:
    """Every global random stream, exactly (Python's Mersenne Twister with its position and
    its cached Gaussian; NumPy's likewise), as tensors and plain numbers for state.pt."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------ the run

@dataclass
class Runtime:
    """Where and how this process computes; with ``dist``, its place in a torchrun job."""

    device: torch.device
    amp_dtype: torch.dtype | None
    kernels: Kernels
    dist: Dist | None = None
    choice: autotune.Choice | None = None  # how the kernels were chosen (autotune)

    @classmethod
    def setup(cls, cfg: TrainConfig) -> "Runtime":
        """Device, threads and process group from ``cfg``'s runtime fields; the rest of the
        run's config may not be known yet (a resumed run under torchrun: see Run.initial_config)."""
        d = from_env()
        if d is not None:
            torch.set_num_threads(threads_per_rank(cfg.threads, d))
            device = start(d, cfg.device)
        else:
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            device = resolve_device(cfg.device)
        amp_dtype = resolve_precision(cfg.precision, device)
        keep_freed_memory(device)
        # a resumed run's random streams come from its checkpoint, so the defaults' seed is harmless there
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        kernels = Kernels(resolve_attention(cfg.attention, device, amp_dtype), cfg.cls_only_last_block)
        return cls(device, amp_dtype, kernels, d)

    def check(self, cfg: TrainConfig) -> None:
        """What the run's own config asks of the process group, checked alike on every rank."""
        if self.dist is not None and cfg.batch_size % self.dist.world:
            raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by the "
                              f"{self.dist.world} processes; choose a multiple of {self.dist.world}")

    @property
    def main(self) -> bool:
        """Whether this process writes (the only one, or rank 0)."""
        return self.dist is None or self.dist.main

    def on_main(self, fn: Callable[[], object]):
        """``fn()`` run by the writing process only; its result, or its error, on every rank."""
        if self.dist is None:
            return fn()
        result, error = None, None
        if self.dist.main:
            try:
                result = fn()
            except (VitlabError, OSError) as e:
                error = (type(e).__name__, str(e) if isinstance(e, VitlabError) else f"{e.strerror or e}")
                self.dist.broadcast((None, error))
                raise
        result, error = self.dist.broadcast((result, error))
        if error is not None:
            echo = getattr(errors, error[0], VitlabError)(error[1])
            echo.from_main = True  # rank 0 has said it: the CLI of this rank stays silent
            raise echo
        return result

    def agree(self, flag: bool) -> bool:
        """True on every rank when it is True on any (one process: the flag itself)."""
        return flag if self.dist is None else self.dist.any(flag, self.device)

    def global_sums(self, local: torch.Tensor) -> torch.Tensor:
        return local if self.dist is None else self.dist.all_sum(local)

    def logits(self, model: torch.nn.Module, images: torch.Tensor, normalize: Normalize, batch_size: int,
               tta_flip: bool = False) -> torch.Tensor:
        """Logits of every image (on the CPU); with several processes, each computes a shard."""
        if self.dist is None:
            return predict_logits(model, images, normalize, batch_size, self.device, self.amp_dtype, tta_flip).cpu()
        n, w = len(images), self.dist.world
        part = images[n * self.dist.rank // w: n * (self.dist.rank + 1) // w]
        mine = predict_logits(model, part, normalize, batch_size, self.device, self.amp_dtype, tta_flip).cpu()
        return torch.cat(self.dist.gather(mine))

    def evaluate(self, model: torch.nn.Module, split, normalize: Normalize, batch_size: int,
                 tta_flip: bool = False) -> tuple[float, float]:
        return loss_and_accuracy(self.logits(model, split.images, normalize, batch_size, tta_flip), split.labels)

    def kernel_record(self) -> dict:
        """What a checkpoint's manifest keeps of the kernel choice, so a resume computes the same way."""
        return {"kernels": self.choice.to_dict()} if self.choice else {}

    def use(self, choice: autotune.Choice) -> None:
        """Compute as ``choice`` says (precision, attention kernel, layout) from here on."""
        self.choice, self.amp_dtype = choice, choice.amp_dtype
        self.kernels = choice.kernels(self.kernels.cls_only_last_block)

    def describe(self) -> str:
        where = f" x {self.dist.world} processes" if self.dist else ""
        how = self.choice.describe() if self.choice else f"{'bf16' if self.amp_dtype else 'fp32'} {self.kernels.attention}"
        return f"{self.device.type}{where} {how}"


def choose_kernels(cfg: TrainConfig, data: DatasetSplits, rt: Runtime, checkpoint: Path | None) -> autotune.Choice:
    """Precision, attention kernel and layout for this run: a resumed run keeps what its
    checkpoint trained with (its numbers continue exactly); a new one times the candidates
    the flags leave open (autotune), or takes them from the cache."""
    model_cfg = build_model_config(cfg, data)
    if checkpoint is not None:
        options = autotune.candidates(model_cfg, rt.device, cfg.attention, cfg.precision)
        saved = autotune.Choice.from_dict(read_meta(checkpoint, verify=False).extra.get("kernels"), options)
        # a checkpoint from before autotune trained with the rule of thumb, the first candidate
        return replace(saved or options[0], source="resumed")
    world = rt.dist.world if rt.dist else 1
    batch = max(1, min(cfg.batch_size, len(data.train) // world * world) // world)
    return autotune.choose(model_cfg, rt.device, batch=batch, training=True, attention=cfg.attention,
                           precision=cfg.precision, cls_only_last_block=cfg.cls_only_last_block)


@dataclass
class Run:
    """The run folder, its configuration and, when resuming, the checkpoint to continue."""

    cfg: TrainConfig
    dir: Path | None = None  # None until the data has loaded: a bad dataset leaves no folder behind
    lock: rundir.RunLock | None = None
    checkpoint: Path | None = None
    board: Board | None = None  # TensorBoard (rank 0)
    plan: Plan | None = None  # the --time-budget decision
    keeper: budgets.Keeper | None = None  # a --time-budget run's watch on its pace (rank 0's decides)
    clock_origin: float = 0.0  # the time.perf_counter() a --time-budget counts from

    @staticmethod
    def initial_config(cfg: TrainConfig | None, resume: str | Path | None, changes: dict) -> TrainConfig:
        """The configuration the runtime is set up with. A resumed run's own, read-only; but
        under torchrun, where the run folder may live on rank 0's machine only, every rank
        starts from ``cfg`` or the defaults (plus ``changes``: the same device and threads on
        every rank) and is handed the run's config by rank 0 once the process group exists."""
        if resume is None:
            return (cfg or default_config()).validate()
        check_resume_changes(changes)
        if cfg is None and from_env():
            cfg = default_config().replace(**changes)
        elif cfg is None:
            run_dir = Path(resume).expanduser()
            rundir.open_existing(run_dir).release()  # a clear error for a folder that is not a run, before reading it
            cfg = TrainConfig.load_yaml(run_dir / CONFIG).replace(**changes)
        return cfg.validate()

    @classmethod
    def open(cls, cfg: TrainConfig | None, resume: str | Path | None, log: Callable[[str], None],
             runtime: TrainConfig, changes: dict) -> "Run":
        """A new run (``cfg``), or the run folder ``resume``, checked against its checkpoint;
        ``cfg`` None resumes with the saved config plus ``changes``. The device and threads
        are ``runtime``'s, the ones the process group started with."""
        if resume is None:
            return cls(cfg)
        run_dir = Path(resume).expanduser()
        lock = rundir.open_existing(run_dir)  # refuses a run another process is training
        try:
            saved = TrainConfig.load_yaml(run_dir / CONFIG)
            cfg = (cfg or saved.replace(**changes)).replace(device=runtime.device, threads=runtime.threads)
            ckpt = recover(run_dir, "last")
            recover(run_dir, "best", need_state=False)
            rundir.remove_stale(run_dir)  # half-written metrics or plots of the killed process
            if ckpt is None:
                log(f"note: {printable(run_dir)} has no checkpoint yet (stopped before its first one); "
                    f"starting it again from the beginning")
                cfg = cfg.replace(download=False)
            else:
                if ckpt.name != "last":  # recover() falls back to last.prev only when last/ is missing or damaged
                    log(f"note: {printable(run_dir / 'last')} is missing or damaged; resuming from {ckpt.name}")
                checked = TrainConfig.load_yaml(ckpt / CONFIG)  # covered by the manifest's checksums
                # a --time-budget run re-plans its length as it goes: the checkpoint's is the one it continues
                ignore = RUNTIME_FIELDS + (("max_steps", "epochs") if checked.time_budget else ())
                for what, other in ((f"{run_dir / 'config.yaml'} differs from", saved), ("this config differs from", cfg)):
                    changed = other.differences(checked, ignore)
                    if changed:
                        raise CheckpointError(f"{what} the checksummed copy in {ckpt.name}/ in {', '.join(changed)}; "
                                              f"--resume continues the run as it started (start a new run to change it)")
                # Only where and how fast it computes may change; a resumed run never downloads.
                cfg = checked.replace(**{k: getattr(cfg, k) for k in RUNTIME_FIELDS}).replace(download=False).validate()
        except BaseException:
            lock.release()
            raise
        return cls(cfg, run_dir, lock, ckpt)

    def create(self, overwrite: bool) -> None:
        name = self.cfg.name or f"{self.cfg.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        self.dir, self.lock = rundir.create(self.cfg, name, overwrite)
        self.save_config()

    def save_config(self) -> None:
        self.cfg.save_yaml(self.dir / CONFIG, note=self.plan.describe() if self.plan else None)

    def resume_command(self) -> str:
        return f"vitlab train --resume {printable(self.dir)}"

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        if self.lock is not None:
            self.lock.release()


@dataclass
class Parts:
    """What a run trains with, built once."""

    model: ViT
    step_model: torch.nn.Module  # the model as the training step calls it (compiled, DDP-wrapped, or itself)
    ema: WeightEMA | None
    optimizer: torch.optim.Optimizer
    normalize: Normalize
    augment: BatchAugment
    aug_gen: torch.Generator
    train_images: torch.Tensor  # uint8, on the device
    train_labels: torch.Tensor
    meta: CheckpointMeta
    config_yaml: str
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    flops_per_image: float  # the work one training image costs, as computed (class-token shortcut included)

    @classmethod
    def build(cls, cfg: TrainConfig, data: DatasetSplits, rt: Runtime) -> "Parts":
        model_cfg = build_model_config(cfg, data)
        model = ViT(model_cfg, rt.kernels).to(rt.device)
        normalize = Normalize(data.mean, data.std, rt.device)
        n_train = len(data.train)
        world = rt.dist.world if rt.dist else 1
        batch_size = min(cfg.batch_size, n_train // world * world)
        steps = n_train // batch_size  # drop the ragged last batch: static shapes
        step_model = torch.compile(model) if cfg.compile else model
        if rt.dist is not None:
            from torch.nn.parallel import DistributedDataParallel

            step_model = DistributedDataParallel(step_model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        return cls(
            model=model,
            step_model=step_model,
            ema=WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None,
            optimizer=build_optimizer(model, cfg.lr, cfg.weight_decay),
            normalize=normalize,
            augment=BatchAugment(normalize, data.image_size, cfg.crop, cfg.crop_scale, cfg.crop_ratio, cfg.hflip,
                                 cfg.random_erasing, cfg.trivial_augment, cfg.translate),
            aug_gen=torch.Generator(device=rt.device).manual_seed(cfg.seed),
            train_images=data.train.images.to(rt.device),
            train_labels=data.train.labels.to(rt.device),
            meta=CheckpointMeta(model_cfg, data.classes, data.mean, data.std, cfg.dataset, data=data.fingerprint()),
            config_yaml=cfg.to_yaml(),
            batch_size=batch_size,
            steps_per_epoch=steps,
            total_steps=schedule_steps(cfg, steps),
            warmup_steps=warmup_steps(cfg, steps),
            flops_per_image=flops_per_image(model_cfg, training=True,
                                            cls_only_last_block=rt.kernels.cls_only_last_block),
        )

    def batches_in(self, epoch: int) -> int:
        """Batches of epoch ``epoch`` (0-based): all of them but in a partial last epoch."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def reschedule(self, cfg: TrainConfig) -> None:
        """A new length (a --time-budget decision): the schedule and the saved config follow."""
        self.total_steps = schedule_steps(cfg, self.steps_per_epoch)
        self.warmup_steps = warmup_steps(cfg, self.steps_per_epoch)
        self.config_yaml = cfg.to_yaml()


STATE_SCALARS = {"epoch": int, "batch": int, "step": int, "best_val_acc": float, "elapsed": float,
                 "lr_scale": float, "metrics_rows": int}


@dataclass
class TrainState:
    """Everything that changes while a run trains: saved in ``last/state.pt`` (with the
    optimizer, EMA, augmentation-generator and RNG states) and restored as one object. It is
    the same whatever the number of processes: counters count global batches, the epoch's
    sums are summed over the ranks before they are saved."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps taken
    best_val_acc: float = -1.0
    elapsed: float = 0.0  # training seconds of earlier sessions
    lr_scale: float = 1.0  # halved by every batch skipped for a non-finite loss
    metrics_rows: int = 0
    epoch_sums: torch.Tensor | None = None  # float64 (loss sum, correct, seen) of this epoch, this rank's, on the device
    rows: list[dict] = field(default_factory=list)  # metrics.csv
    started: float = field(default_factory=time.perf_counter)  # this session's start of training
    # The first step whose loss was NaN/Inf, tracked on the device so the hot loop needs no host sync.
    bad_step: torch.Tensor | None = None

    def seconds(self) -> float:
        return self.elapsed + (time.perf_counter() - self.started)

    def to_dict(self, parts: Parts, rt: Runtime) -> dict:
        return {**{k: getattr(self, k) for k in STATE_SCALARS}, "elapsed": self.seconds(),
                "metrics_rows": len(self.rows), "epoch_sums": rt.global_sums(self.epoch_sums).cpu(),
                "device_type": rt.device.type, "optimizer": parts.optimizer.state_dict(),
                "aug_generator": parts.aug_gen.get_state(), "rng": rng_state(rt.device),
                **({"ema": parts.ema.model.state_dict()} if parts.ema is not None else {})}

    @classmethod
    def restore(cls, path: Path, d: dict, weights: dict, parts: Parts, rt: Runtime, rows: list[dict]) -> "TrainState":
        """The state ``d`` (read from ``path``) and ``weights`` put back into ``parts``; a foreign
        or other-device state is a CheckpointError naming the file."""
        device = rt.device
        try:
            state = cls(**{k: kind(d[k]) for k, kind in STATE_SCALARS.items()})
            if d["device_type"] != device.type:
                raise CheckpointError(f"{path}: this run trained on {d['device_type']}; its random streams cannot "
                                      f"continue on {device.type}: resume with --device {d['device_type']}")
            if (parts.ema is not None) != ("ema" in d):
                raise CheckpointError(f"{path}: the state {'lacks' if parts.ema else 'has'} EMA weights but the "
                                      f"config says ema_decay {'> 0' if parts.ema else '= 0'}")
            parts.model.load_state_dict(weights)
            parts.optimizer.load_state_dict(d["optimizer"])
            parts.aug_gen.set_state(d["aug_generator"])
            if parts.ema is not None:
                parts.ema.model.load_state_dict(d["ema"])
            set_rng_state(d["rng"], device)
            sums = d["epoch_sums"].to(device=device, dtype=torch.float64)
            state.epoch_sums = sums if rt.main else torch.zeros_like(sums)  # the saved sums are all ranks'
            if state.epoch_sums.shape != (3,) or not 0 <= state.batch <= parts.batches_in(state.epoch):
                raise ValueError("counters out of range")
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{path}: not a training state of this run ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
        state.rows = rows[: state.metrics_rows]  # drop rows written after this checkpoint
        return state


def prepare_state(run: Run, parts: Parts, rt: Runtime, log: Callable[[str], None]) -> TrainState:
    """A fresh state, or the one in the checkpoint being resumed (metrics.csv cut back to it).
    The writing process reads the checkpoint and hands it to the others."""
    if run.checkpoint is None:
        state = TrainState(epoch_sums=torch.zeros(3, device=rt.device, dtype=torch.float64))
    else:
        def read() -> tuple:
            load_weights(run.checkpoint, parts.model)  # checks the header first
            weights = {k: v.cpu() for k, v in parts.model.state_dict().items()}
            return load_state(run.checkpoint), weights, report.read_metrics(run.dir / rundir.METRICS)

        d, weights, rows = rt.on_main(read)
        state = TrainState.restore(run.checkpoint / "state.pt", d, weights, parts, rt, rows)
        if rt.main:
            report.write_metrics(run.dir / rundir.METRICS, state.rows)
        log(f"resuming {printable(run.dir)} at epoch {state.epoch + 1}, step {state.step}")
    state.bad_step = torch.full((), -1, dtype=torch.long, device=rt.device)
    state.started = time.perf_counter()
    return state


def calibrate(cfg: TrainConfig, parts: Parts, data: DatasetSplits, rt: Runtime, steps: int = 8
              ) -> tuple[float, float, float]:
    """(seconds per training step, per evaluated image, per checkpoint) measured on copies of the
    model and optimizer, with the random streams put back: the run itself is untouched."""
    model = copy.deepcopy(parts.model).train()
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    optimizer.load_state_dict(parts.optimizer.state_dict())
    rng = torch.get_rng_state()
    bs = parts.batch_size // (rt.dist.world if rt.dist else 1)
    gen = torch.Generator(device=rt.device).manual_seed(12345)
    idx = torch.arange(bs, device=rt.device) % len(parts.train_labels)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        x = parts.augment(parts.train_images.index_select(0, idx), gen)
        y = parts.train_labels.index_select(0, idx)
        loss, _ = loss_and_logits(model, x, y, rt.device, rt.amp_dtype, cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        apply_gradients(model, optimizer, loss, cfg.grad_clip)
        synchronize(rt.device)
        times.append(time.perf_counter() - t)
    images = data.val.images[: max(2 * cfg.eval_batch_size, 256)]
    predict_logits(model, images[: cfg.eval_batch_size], parts.normalize, cfg.eval_batch_size, rt.device, rt.amp_dtype)
    passes = []  # the fastest of three: one pass is a fraction of a second, and a hiccup doubled it (measured)
    for _ in range(3):
        t = time.perf_counter()
        predict_logits(model, images, parts.normalize, cfg.eval_batch_size, rt.device, rt.amp_dtype)
        passes.append(time.perf_counter() - t)
    eval_per_image = min(passes) / max(1, len(images))
    torch.set_rng_state(rng)
    return sorted(times[2:])[len(times[2:]) // 2], eval_per_image, checkpoint_seconds(cfg, parts, model, optimizer)


def checkpoint_seconds(cfg: TrainConfig, parts: Parts, model: ViT, optimizer: torch.optim.Optimizer) -> float:
    """One save of weights and optimizer state (fsynced), in a temporary folder where the run
    will live: on small models an epoch's checkpoints cost as much as its steps."""
    out = Path(cfg.out).expanduser()
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out, ".vitlab-calibrate-")
    try:
        t = time.perf_counter()
        save_checkpoint(tmp / "last", model, parts.meta, parts.config_yaml, {"optimizer": optimizer.state_dict()})
        return time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if made and not any(out.iterdir()):
            out.rmdir()  # a folder this measurement made, left empty: a refused run leaves nothing


def plan_budget(cfg: TrainConfig, parts: Parts, data: DatasetSplits, rt: Runtime, since: float) -> Plan:
    step_s, eval_s, ckpt_s = calibrate(cfg, parts, data, rt)
    return budgets.plan(parse_duration(cfg.time_budget), step_s, eval_s, parts.steps_per_epoch, len(data.val),
                len(data.train) + len(data.test) + (0 if data.val_is_test else len(data.val)),
                val_passes=2 if cfg.ema_decay > 0 else 1, final_passes=2 if cfg.tta_flip else 1, max_steps=1 << 40,
                since=since, checkpoint_seconds=ckpt_s)


def check_same_data(run: Run, data: DatasetSplits, rt: Runtime) -> None:
    """Every rank has the same data, and when resuming it is what the run started on (its
    fingerprint in the checkpoint)."""
    mine = data.fingerprint()
    if rt.dist is not None and len({json.dumps(f, sort_keys=True) for f in rt.dist.gather(mine)}) > 1:
        raise DataError(f"rank {rt.dist.rank}: the processes of this job see different data under "
                        f"{printable(run.cfg.data_dir)}; every machine needs the same dataset files")
    if run.checkpoint is None:
        return
    saved = rt.on_main(lambda: read_meta(run.checkpoint, verify=False).data)
    if saved is not None:
        changed = fingerprint_changes(saved, mine)
        if changed:
            raise CheckpointError(f"{printable(run.dir)}: the data is not what this run started on: "
                                  f"{', '.join(changed)} changed; resume with the original files (--data-dir)")


def nonfinite_error(run: Run, parts: Parts, state: TrainState, bad: int, cfg: TrainConfig) -> NonFiniteLoss:
    last = run.dir / "last"
    good = "none yet"
    if (last / "model.json").is_file():
        good = f"{printable(last)} (step {read_meta(last, verify=False).extra.get('step')})"
    lr = state.lr_scale * lr_at(bad - 1, parts.total_steps, parts.warmup_steps, cfg.lr, cfg.min_lr)
    return NonFiniteLoss(f"loss became NaN/Inf at step {bad} (lr {lr:.2e}); training stopped. Last good checkpoint: "
                         f"{good}. Retry with a lower --lr, --grad-clip 1, or --on-nonfinite skip")


def raise_if_nonfinite(run: Run, parts: Parts, state: TrainState, rt: Runtime) -> None:
    """Stop at the first non-finite loss of any rank (a collective with several processes)."""
    bad = state.bad_step
    if rt.dist is not None:  # the earliest bad step of any rank (-1 on a rank: none)
        none = torch.iinfo(torch.long).max
        bad = rt.dist.all_min(torch.where(bad < 0, none, bad))
        bad = torch.where(bad == none, -1, bad)
    bad = int(bad)
    if bad >= 0:
        raise nonfinite_error(run, parts, state, bad, run.cfg)


def save_last(run: Run, parts: Parts, state: TrainState, rt: Runtime) -> None:
    raise_if_nonfinite(run, parts, state, rt)  # never overwrite a good checkpoint with poisoned weights
    parts.meta.extra = {"epoch": state.epoch, "batch": state.batch, "step": state.step, **rt.kernel_record()}
    payload = state.to_dict(parts, rt)  # on every rank: its epoch sums are a collective
    if rt.main:
        save_checkpoint(run.dir / "last", parts.model, parts.meta, parts.config_yaml, payload)
        if run.board is not None:
            run.board.flush()  # what TensorBoard has is on disk up to this checkpoint


def peer_lost(run: Run | None, rt: Runtime, error: BaseException) -> PeerLost:
    """One line for a collective that failed because another rank went away. Under `vitlab
    train --nproc` the launcher names the rank that died and says how to resume; a rank other
    than 0 says nothing of its own (rank 0, or the launcher, speaks for the job)."""
    last = run.dir / "last" if run is not None and run.dir is not None else None
    resume = (f"; its last checkpoint is intact, continue with: {run.resume_command()}"
              if last is not None and last.is_dir() else "")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    e = PeerLost(f"rank {rt.dist.rank}: another process of this job stopped ({first[:160]}){resume}")
    e.from_main = bool(os.environ.get(LAUNCHER_ENV)) or not rt.main
    return e


def interrupted(run: Run, rt: Runtime, where: str) -> TrainingInterrupted:
    if rt.dist is not None:
        rt.dist.barrier()  # every rank leaves after the checkpoint is written
    return TrainingInterrupted(f"stopped {where}; continue with: {run.resume_command()}")


def train_epoch(run: Run, parts: Parts, state: TrainState, rt: Runtime, should_stop: Callable[[], bool],
                progress: bool, log: Callable[[str], None], peak: float | None) -> float:
    """Train the rest of epoch ``state.epoch`` (from batch ``state.batch``): the hot loop.
    Returns the last learning rate. Raises TrainingInterrupted, after saving, when
    ``should_stop`` says so before the epoch's end.

    With several processes every rank draws and augments the whole global batch (the same
    draws as one process would make) and trains on its own rows; stop requests and
    non-finite losses are combined across ranks at the log interval, where the loop syncs."""
    cfg, device = run.cfg, rt.device
    n_classes = parts.meta.model.num_classes
    mixing = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
    steps, bs = parts.batches_in(state.epoch), parts.batch_size
    rows = slice(None) if rt.dist is None else rt.dist.rows(bs)
    order = epoch_order(len(parts.train_labels), cfg.seed, state.epoch, device, cfg.repeated_augment)
    first = state.batch
    if first == 0:
        state.epoch_sums.zero_()
    parts.model.train()
    bar = tqdm(total=steps, initial=first, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", disable=not progress,
               leave=False, unit="step", dynamic_ncols=True)
    t_epoch, seen_at_start = time.perf_counter(), float(rt.global_sums(state.epoch_sums)[2])
    step_on_device = torch.full((), state.step, dtype=torch.long, device=device)
    pending: list[tuple[torch.Tensor, float]] = []  # (loss, lr) of the steps since the last log interval
    plans = crop_plans(parts.augment, cfg.seed, state.epoch, first, parts.steps_per_epoch, bs,
                       parts.train_images.shape[2:], device)
    lr = cfg.lr
    for b, plan in zip(itertools.count(first), plans):
        if b >= steps:  # the epoch's length; a --time-budget run may change it at a log interval
            break
        lr = state.lr_scale * lr_at(state.step, parts.total_steps, parts.warmup_steps, cfg.lr, cfg.min_lr)
        for group in parts.optimizer.param_groups:
            group["lr"] = lr
        idx = order[b * bs: (b + 1) * bs]
        # index_select, not images[idx]: 6 us instead of 105 us for a CIFAR batch on CPU
        x = parts.augment(parts.train_images.index_select(0, idx), parts.aug_gen, plan)
        y = parts.train_labels.index_select(0, idx)
        target = y
        if mixing:  # soft targets; accuracy below still counts the dominant label
            x, target = mix_batch(x, y, n_classes, cfg.mixup_alpha, cfg.cutmix_alpha, parts.aug_gen)
        x, y, target = x[rows], y[rows], target[rows]  # this rank's share of the global batch
        loss, logits = loss_and_logits(parts.step_model, x, target, device, rt.amp_dtype, cfg.label_smoothing)
        parts.optimizer.zero_grad(set_to_none=True)
        state.batch = b + 1
        # host sync (and, with several processes, one collective) per step, only with this option
        if cfg.on_nonfinite == "skip" and rt.agree(not bool(torch.isfinite(loss))):
            state.lr_scale *= 0.5
            log(f"step {state.step + 1}: loss is {loss.item()}; skipped the batch, learning rate now x{state.lr_scale:g}")
            continue
        step_on_device += 1
        state.bad_step = torch.where((state.bad_step < 0) & ~torch.isfinite(loss.detach()), step_on_device,
                                     state.bad_step)
        apply_gradients(parts.model, parts.optimizer, loss, cfg.grad_clip)  # DDP averaged the gradients in backward
        state.step += 1
        if parts.ema is not None:
            parts.ema.update(state.step)
        with torch.no_grad():
            state.epoch_sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                             torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
        pending.append((loss.detach(), lr))
        at_log = (b + 1) % cfg.log_every == 0 or b + 1 == steps
        if at_log:
            raise_if_nonfinite(run, parts, state, rt)
            loss_sum, correct, seen = rt.global_sums(state.epoch_sums).tolist()  # with the line above: the syncs
            rate = (seen - seen_at_start) / max(1e-9, time.perf_counter() - t_epoch)
            flush_step_losses(run, rt, state, pending)
            if run.board is not None:
                run.board.scalar("train/images_per_second", rate, state.step)
            mfu = f" MFU {100 * rate * parts.flops_per_image / peak:.0f}%" if peak else ""
            left = (parts.total_steps - state.step) * bs / max(rate, 1e-9)  # the epochs to come, at this speed
            bar.set_postfix_str(f"loss {loss_sum / max(seen, 1):.4f} acc {correct / max(seen, 1):.4f} "
                                f"{rate:,.0f} img/s{mfu} | run ETA {format_duration(left)}")
            if run.plan is not None:  # a --time-budget run, not resumed (rank 0 decides, the others follow)
                keep_budget(run, parts, state, rt, log)
                steps = bar.total = parts.batches_in(state.epoch)
            bar.update((b + 1) - bar.n)
        if b + 1 < steps:
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                flush_step_losses(run, rt, state, pending)  # the events up to a checkpoint are all written
                save_last(run, parts, state, rt)
            # one process asks at every step; several agree at the log interval (at an epoch's
            # end the caller stops after the epoch's checkpoint)
            if (rt.dist is None or at_log) and rt.agree(should_stop()):
                flush_step_losses(run, rt, state, pending)
                save_last(run, parts, state, rt)
                bar.close()
                raise interrupted(run, rt, f"at epoch {state.epoch + 1}, step {state.step}")
    bar.close()
    synchronize(device)
    raise_if_nonfinite(run, parts, state, rt)
    return lr


def flush_step_losses(run: Run, rt: Runtime, state: TrainState, pending: list[tuple[torch.Tensor, float]]) -> None:
    """Write the steps since the last flush to TensorBoard (the mean over the ranks) and forget them."""
    if pending:
        losses = rt.global_sums(torch.stack([lo for lo, _ in pending]).float()) / (rt.dist.world if rt.dist else 1)
        if run.board is not None:
            run.board.steps(state.step - len(pending) + 1, losses, [r for _, r in pending])
        pending.clear()


def end_epoch(run: Run, parts: Parts, state: TrainState, data: DatasetSplits, rt: Runtime, lr: float,
              epoch_seconds: float, log: Callable[[str], None]) -> None:
    """Validate the raw (and EMA) weights, keep the better as best/ if it beats the run's
    best, checkpoint last/, append the epoch's row to metrics.csv and log it."""
    cfg = run.cfg
    loss_sum, correct, seen = rt.global_sums(state.epoch_sums).tolist()
    if seen == 0:  # every batch skipped for a non-finite loss: nothing was trained
        raise NonFiniteLoss(f"every batch of epoch {state.epoch + 1} had a non-finite loss and was skipped; "
                            f"training stopped. Last good checkpoint: {printable(run.dir / 'last')}. "
                            f"Retry with a lower --lr")
    # Per-epoch validation sees each image once; flip averaging (``tta_flip``) would double
    # its cost every epoch and is kept for the final table, computed from the chosen checkpoint.
    val_loss, val_acc = rt.evaluate(parts.model, data.val, parts.normalize, cfg.eval_batch_size)
    state.epoch += 1
    state.batch = 0
    row = {"epoch": state.epoch, "step": state.step, "lr": lr, "train_loss": loss_sum / seen,
           "train_acc": correct / seen, "val_loss": val_loss, "val_acc": val_acc}
    candidates = {"raw": (val_acc, parts.model)}
    if parts.ema is not None:
        row["val_ema_loss"], row["val_ema_acc"] = rt.evaluate(parts.ema.model, data.val, parts.normalize,
                                                              cfg.eval_batch_size)
        candidates["ema"] = (row["val_ema_acc"], parts.ema.model)
    state.rows.append(row)
    if run.board is not None:
        run.board.epoch(row)
    kind, (epoch_best, best_model) = max(candidates.items(), key=lambda kv: kv[1][0])
    improved = epoch_best > state.best_val_acc  # the same on every rank: the logits are gathered
    if improved:  # the best weights of the run, raw or averaged
        state.best_val_acc = epoch_best
        parts.meta.extra = {"epoch": state.epoch, "step": state.step, "val_acc": epoch_best, "weights": kind,
                            **rt.kernel_record()}
    if rt.main:
        report.append_metrics(run.dir / rundir.METRICS, state.rows)
        if improved:
            save_checkpoint(run.dir / "best", best_model, parts.meta, parts.config_yaml)
    save_last(run, parts, state, rt)
    ema_text = f" | ema val acc {row['val_ema_acc']:.4f}" if parts.ema is not None else ""
    log(f"epoch {state.epoch:>3}/{run.cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
        f" | val loss {val_loss:.4f} acc {val_acc:.4f}{ema_text}{' *' if improved else ''}"
        f" | {epoch_seconds:.1f}s {seen / max(epoch_seconds, 1e-9):,.0f} img/s")


def keep_budget(run: Run, parts: Parts, state: TrainState, rt: Runtime, log: Callable[[str], None]) -> None:
    """--time-budget, at a log interval: fit the run's step count to the pace it keeps (and its
    threads to the cores other processes leave free). The writing process decides, every rank
    follows; the schedule stretches or shrinks from here, and the next checkpoint and
    config.yaml record the new length."""
    def decide() -> tuple[int | None, int | None]:
        threads = run.keeper.threads() if run.keeper.cores is not None else None
        if threads is not None:
            torch.set_num_threads(threads)
        return run.keeper.check(state.step, state.epoch, time.perf_counter()), threads

    steps, threads = rt.on_main(decide)
    if threads is not None:
        log(f"time budget: other processes keep cores busy; training on {threads} thread(s) now")
    if steps is None or steps == parts.total_steps:
        return
    run.cfg = run.cfg.replace(max_steps=steps, epochs=epochs_for(steps, parts.steps_per_epoch))
    parts.reschedule(run.cfg)
    if rt.main:
        run.save_config()
        log(f"time budget: re-planned {run.plan.revisions[-1]}")


# --------------------------------------------------------------------- train

def train(cfg: TrainConfig | None = None, *, resume: str | Path | None = None, overwrite: bool = False,
          progress: bool = True, log: Callable[[str], None] | None = None, data: DatasetSplits | None = None,
          stop_when: Callable[[TrainState], bool] | None = None, changes: dict | None = None) -> RunResult:
    """Train a ViT as ``cfg`` says (default: the embedded digits preset), or continue the
    run folder ``resume``, and write its report.

    With ``resume``, ``cfg`` defaults to the run's saved config with ``changes`` (runtime
    fields only: device, threads, data_dir, ...). ``data`` trains on already-loaded
    splits instead of loading ``cfg.dataset`` (benchmarks, notebooks). ``stop_when`` is
    asked after every optimizer step; when it returns True the run stops as it does on
    Ctrl-C: checkpoint saved, TrainingInterrupted raised with the command that resumes.

    Under torchrun (RANK and WORLD_SIZE in the environment) this process is one rank of a
    data-parallel job (vitlab.distributed): rank 0 writes, every rank trains its share.
    """
    log = log or (lambda s: tqdm.write(s))
    session_start = time.perf_counter()
    clock_origin = budgets.origin()  # what a --time-budget counts from
    changes = changes or {}
    initial = Run.initial_config(cfg, resume, changes)
    rt = Runtime.setup(initial)
    if not rt.main:
        log, progress = (lambda s: None), False
    run = None
    try:
        opened = rt.on_main(lambda: Run.open(cfg if resume else initial, resume, log, initial, changes))
        run = opened if rt.main else Run(opened.cfg, opened.dir, None, opened.checkpoint)
        cfg = run.cfg
        rt.check(cfg)
        if data is None:  # the writing process first: it may download or extract
            loaded: dict = {}

            def load() -> None:
                loaded["data"] = load_dataset(cfg.dataset, cfg.data_dir, val_size=cfg.val_size, image_size=cfg.image_size,
                                              download=cfg.download and rt.main, coarse_labels=cfg.coarse_labels, warn=log)

            rt.on_main(load)
            if "data" not in loaded:
                load()
            data = loaded["data"]
        check_same_data(run, data, rt)
        rt.use(rt.on_main(lambda: choose_kernels(cfg, data, rt, run.checkpoint)))  # the same on every rank
        parts = Parts.build(cfg, data, rt)
        if cfg.time_budget and resume is None:  # a resumed run keeps the steps decided at its start
            run.plan = rt.on_main(lambda: plan_budget(cfg, parts, data, rt, clock_origin))
            if rt.main:  # the others follow its decisions
                run.keeper = budgets.Keeper(run.plan, clock_origin, None if cfg.threads or rt.dist is not None
                                            else torch.get_num_threads())
            run.clock_origin = clock_origin
            length = run.plan.steps / parts.steps_per_epoch
            cfg = cfg.replace(max_steps=run.plan.steps, warmup_epochs=min(cfg.warmup_epochs, length / 5))
            log(run.plan.describe())
        if cfg.max_steps:  # the epoch count follows the step count, in what is saved and shown
            cfg = run.cfg = cfg.replace(epochs=epochs_for(cfg.max_steps, parts.steps_per_epoch))
            parts.reschedule(cfg)
        if run.dir is None:
            created = rt.on_main(lambda: run.create(overwrite) or run.dir)
            run.dir = created
        if rt.main:  # before the state, which starts the training clock: importing tensorboard takes seconds
            # a resumed run drops the events the killed process wrote after its checkpoint
            # (a run restarted from its beginning drops all of them)
            run.board = Board(run.dir, cfg.tensorboard,
                              purge_step=int(read_meta(run.checkpoint, verify=False).extra.get("step", 0)) + 1
                              if run.checkpoint else (0 if resume is not None else None))
        state = prepare_state(run, parts, rt, log)
        peak = matmul_peak(rt.device, rt.amp_dtype, reps=5) if progress else None
        log(f"vitlab: {cfg.dataset} {len(data.train)}/{len(data.val)}/{len(data.test)} train/val/test images "
            f"{data.channels}x{data.image_size}x{data.image_size}, {len(data.classes)} classes | "
            f"ViT {parts.model.num_params() / 1e6:.2f}M params, {parts.meta.model.num_patches} patches, "
            f"{parts.flops_per_image / 1e9:.3f} GFLOP/img/step | {rt.describe()} | {printable(run.dir)}")
        if cfg.compile and rt.device.type == "cpu" and rt.amp_dtype is not None:
            log("warning: --compile with bf16 on CPU trained to 3-10 points lower accuracy than eager in our "
                "measurements (tests/test_speed_paths.py) for a 3-5% speed-up; consider --precision fp32 or no --compile")
        with stop_on_signals() as signalled:
            def should_stop() -> bool:
                return signalled.is_set() or (stop_when is not None and stop_when(state))

            if run.keeper is not None:
                run.keeper.start(time.perf_counter(), state.step)
            while state.epoch < run.cfg.epochs:  # a --time-budget run may re-plan its length as it goes
                t_epoch = time.perf_counter()
                lr = train_epoch(run, parts, state, rt, should_stop, progress, log, peak)
                t_end = time.perf_counter()
                end_epoch(run, parts, state, data, rt, lr, t_end - t_epoch, log)
                if run.keeper is not None:
                    run.keeper.pace.epoch_end(time.perf_counter() - t_end)
                if rt.agree(should_stop()) and state.epoch < run.cfg.epochs:
                    raise interrupted(run, rt, f"after epoch {state.epoch}, step {state.step}")
        train_seconds = state.seconds()  # the training itself: the final evaluation and report come after
        run.clock_origin = clock_origin
        return finish_run(run, parts, data, rt, state, train_seconds, time.perf_counter() - session_start, log)
    except RuntimeError as e:
        if rt.dist is None or not lost_peer(e):
            raise
        raise peer_lost(run, rt, e) from None
    finally:
        if run is not None:
            run.close()
        stop_distributed()


def final_checkpoint(run: Run, log: Callable[[str], None]) -> Path:
    """best/, verified; last/ (with a note) when best/ is missing or damaged."""
    for name in ("best", "last"):
        folder = run.dir / name
        try:
            meta = read_meta(folder)
            check_weights_header(folder, meta.model)
        except CheckpointError as e:
            if name == "best":
                log(f"note: {e}; the report uses {printable(run.dir / 'last')} instead")
            continue
        return folder
    raise CheckpointError(f"{printable(run.dir)}: neither best/ nor last/ is intact; nothing to report")


def finish_run(run: Run, parts: Parts, data: DatasetSplits, rt: Runtime, state: TrainState, train_seconds: float,
               session_seconds: float, log: Callable[[str], None]) -> RunResult:
    """Evaluate the best checkpoint on every split and write results.md and the plots;
    then remove the crash-safety copies (best.prev/, last.prev/)."""
    cfg, model = run.cfg, parts.model

    def choose() -> tuple:
        chosen = final_checkpoint(run, log)
        load_weights(chosen, model)
        return chosen, {k: v.cpu() for k, v in model.state_dict().items()}, read_meta(chosen, verify=False).extra

    chosen, weights, extra = rt.on_main(choose)  # raw or EMA weights, whichever won
    model.load_state_dict(weights)
    model.eval()
    ev = dict(normalize=parts.normalize, batch_size=cfg.eval_batch_size, tta_flip=cfg.tta_flip)
    # Test logits are computed once: for the table and for the predictions grid below.
    test_logits = rt.logits(model, data.test.images, **ev)
    test = loss_and_accuracy(test_logits, data.test.labels)
    results = {
        "Train": rt.evaluate(model, data.train, **ev),
        "Val": test if data.val_is_test else rt.evaluate(model, data.val, **ev),
        "Test": test,
    }
    if rt.main:
        write_report(run, parts, data, rt, state, results, test_logits, chosen, extra, train_seconds, session_seconds)
        log("\n" + report.results_table(results))
        budget = (f", time budget {cfg.time_budget}: {format_duration(time.perf_counter() - run.clock_origin)} used"
                  if cfg.time_budget else "")
        log(f"done: best epoch {extra.get('epoch', 0)} (val accuracy {float(extra.get('val_acc') or 0):.4f}), test "
            f"accuracy {results['Test'][1]:.4f}, {format_duration(train_seconds)} of training{budget}; report: "
            f"{printable(run.dir / 'results.md')}")
    return RunResult(run.dir, results, len(state.rows), train_seconds)


def write_report(run: Run, parts: Parts, data: DatasetSplits, rt: Runtime, state: TrainState, results: dict,
                 test_logits: torch.Tensor, chosen: Path, extra: dict, train_seconds: float,
                 session_seconds: float) -> None:
    """results.md (+ results.json), loss_curve.png, predictions.png, attention.png and
    confusion.png, the TensorBoard summary; then the tidy-up and one line saying how it went."""
    cfg, model = run.cfg, parts.model
    title = f"{cfg.dataset}: ViT {cfg.depth}x{cfg.dim}, patch {model.cfg.patch_size}"
    probs, preds = test_logits.softmax(1).max(1)
    confusion = report.confusion_matrix(preds, data.test.labels, len(data.classes))
    images_per_second = len(data.train) * len(state.rows) / max(train_seconds, 1e-9)
    code = report.code_version()  # read from .git once, for results.md and results.json
    facts = {
        "epochs": f"{len(state.rows)} (best val accuracy at epoch {extra.get('epoch', 0)}, "
                  f"{extra.get('weights', 'raw')} weights; the table uses {chosen.name}/)",
        "training time": f"{train_seconds:.1f} s" + (f" (this session {session_seconds:.1f} s)"
                                                      if session_seconds < train_seconds else ""),
        "throughput": f"{images_per_second:,.0f} training images/s",
        "validation": "the test set" if data.val_is_test else f"{len(data.val)} images held out of train (fixed seed)",
        "model": f"{model.num_params():,} parameters, {model.cfg.num_patches} patches of {model.cfg.patch_size}x{model.cfg.patch_size}",
        "device": f"{rt.describe()} attention" + (" (bf16 autocast)" if rt.amp_dtype else "") + (
            "; timed: " + ", ".join(f"{k} {v:.1f} ms" for k, v in rt.choice.ms.items()) if rt.choice and rt.choice.ms
            else ""),
        "code": code,
        "config": CONFIG,
        "figures": "[loss_curve.png](loss_curve.png), [predictions.png](predictions.png), "
                   "[attention.png](attention.png) (where it looks: gradient-weighted attention of the same images), "
                   "[confusion.png](confusion.png)",
    }
    budget = None
    if cfg.time_budget:
        limit = parse_duration(cfg.time_budget)
        used = time.perf_counter() - run.clock_origin + REPORT_TAIL
        budget = {"budget_s": limit, "used_s": used, "epochs": cfg.epochs, "steps": state.step}
        facts["time budget"] = (f"{format_duration(limit)}; this process ran {format_duration(used)} "
                                f"({100 * used / limit:.0f}% of it) for {state.step} steps in {cfg.epochs} epochs"
                                + (f" ({run.plan.describe().replace(chr(10), '; ')})" if run.plan else ""))
    report.write_results(run.dir / rundir.RESULTS_MD, title, results, facts,
                         {"Per-class accuracy (test)": report.per_class_table(confusion, data.classes)})
    report.write_json(run.dir / rundir.RESULTS_JSON, {
        "results": {k: {"loss": v[0], "accuracy": v[1]} for k, v in results.items()},
        "best_epoch": extra.get("epoch", 0), "best_val_acc": extra.get("val_acc"), "epochs": len(state.rows),
        "planned_epochs": cfg.epochs, "train_seconds": train_seconds, "images_per_second": images_per_second,
        "classes": list(data.classes), "confusion": confusion.tolist(), "time_budget": budget,
        "kernels": rt.choice.to_dict() if rt.choice else None, "code": code})
    if state.rows:
        report.plot_curves(state.rows, run.dir / "loss_curve.png", title)
    # The grid: the first test images, then the first mistakes among the rest (up to 8).
    first = torch.arange(min(24, len(data.test)))
    wrong = (preds != data.test.labels).nonzero().flatten()
    show = torch.cat([first, wrong[wrong >= len(first)][:32 - len(first)]])
    report.plot_predictions(data.test.images[show], data.test.labels[show], preds[show], probs[show],
                            data.classes, run.dir / "predictions.png", title)
    predictor = Predictor(parts.meta, model, parts.normalize, rt.device, rt.amp_dtype)
    explained = explain_images(predictor, data.test.images[show], "gradient")
    plot_grid(explained, range(len(show)), data.classes, data.test.labels[show], run.dir / "attention.png",
              f"{title}: where it looks (gradient-weighted attention)")
    report.plot_confusion(confusion, data.classes, run.dir / "confusion.png", title)
    if run.board is not None:
        run.board.report({name: run.dir / f"{name}.png" for name in ("predictions", "attention", "confusion")},
                         cfg.to_dict(), {"best_val_acc": float(extra.get("val_acc") or 0.0),
                                         "test_acc": results["Test"][1], "test_loss": results["Test"][0]}, state.step)
        run.board.close()
    rundir.tidy(run.dir)


REPORT_TAIL = 0.5  # seconds of the report still to come when its time is measured
