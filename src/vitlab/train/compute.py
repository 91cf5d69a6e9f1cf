"""Stage 2, the compute choice: where this process computes (device, threads, its place in
the process group) and how (precision, attention kernel, layout), and the few collectives the
stages use. One :class:`Compute` for one process and for a rank of a torchrun job alike."""

from __future__ import annotations

import random
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import autotune, errors, metrics
from ..augment import Normalize
from ..checkpoint import read_meta
from ..config import TrainConfig
from ..data import DatasetSplits
from ..distributed import Dist, from_env, start, threads_per_rank
from ..distributed import stop as stop_process_group
from ..errors import ConfigError, VitlabError
from ..inference import loss_and_accuracy, predict_logits
from ..model import Kernels
from ..devices import (allow_tf32, deterministic_kernels, keep_freed_memory, precision_name, resolve_attention,
                       resolve_device, resolve_precision)
from .setup import build_model_config


@dataclass
class Compute:
    """Where and how this process computes, and its place in the job (``dist``, a job of one
    without torchrun)."""

    device: torch.device
    amp_dtype: torch.dtype | None
    kernels: Kernels
    dist: Dist
    choice: autotune.Choice | None = None  # how the kernels were chosen (autotune)
    settings: ExitStack = field(default_factory=ExitStack)  # process-wide settings, undone by stop()

    @classmethod
    def start(cls, cfg: TrainConfig) -> "Compute":
        """Device, threads and process group from ``cfg``'s runtime fields; the rest of the
        run's config may not be known yet (a resumed run under torchrun: see RunFolder.initial_config)."""
        with ExitStack() as settings:
            settings.enter_context(deterministic_kernels(cfg.deterministic))  # before any CUDA work
            d = from_env()
            if d.world > 1:
                torch.set_num_threads(threads_per_rank(cfg.threads, d))
                device = start(d, cfg.device)
            else:
                if cfg.threads:
                    torch.set_num_threads(cfg.threads)
                device = resolve_device(cfg.device)
            amp_dtype = resolve_precision(cfg.precision, device)
            keep_freed_memory(device)
            allow_tf32(device)
            # a resumed run's random streams come from its checkpoint, so the defaults' seed is harmless there
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            kernels = Kernels(resolve_attention(cfg.attention, device, amp_dtype), cfg.cls_only_last_block)
            return cls(device, amp_dtype, kernels, d, settings=settings.pop_all())  # kept until stop()

    def stop(self) -> None:
        stop_process_group()
        self.settings.close()

    def check(self, cfg: TrainConfig) -> None:
        """What the run's own config asks of the process group, checked alike on every rank."""
        if cfg.batch_size % self.dist.world:
            raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by the "
                              f"{self.dist.world} processes; choose a multiple of {self.dist.world}")

    @property
    def main(self) -> bool:
        """Whether this process writes (the only one, or rank 0)."""
        return self.dist.main

    def by_main(self, fn: Callable[[], object]):
        """``fn()`` run by the writing process only; its result, or its error, on every rank
        (there as the same vitlab error type, any other as a VitlabError, marked as said already
        by rank 0, which raises the original)."""
        if self.dist.world == 1:
            return fn()
        result, error = None, None
        if self.dist.main:
            try:
                result = fn()
            except Exception as e:  # any error: the other ranks must not wait for a collective timeout
                error = (type(e).__name__, str(e) if isinstance(e, VitlabError) else
                         f"{e.strerror or e}" if isinstance(e, OSError) else f"rank 0 failed: {type(e).__name__}: {e}")
                self.dist.broadcast((None, error))
                raise
        result, error = self.dist.broadcast((result, error))
        if error is not None:
            echo = getattr(errors, error[0], VitlabError)(error[1])
            echo.from_main = True  # rank 0 has said it: the CLI of this rank stays silent
            raise echo
        return result

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any."""
        return self.dist.any(flag, self.device)

    def sum(self, local: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks (a job of one: ``local`` itself)."""
        return self.dist.all_sum(local)

    def logits(self, model: torch.nn.Module, images: torch.Tensor, normalize: Normalize, batch_size: int,
               tta_flip: bool = False) -> torch.Tensor:
        """Logits of every image (on the CPU), each rank computing a shard, gathered in order."""
        n, w, r = len(images), self.dist.world, self.dist.rank
        mine = predict_logits(model, images[n * r // w: n * (r + 1) // w], normalize, batch_size, self.device,
                              self.amp_dtype, tta_flip).cpu()
        return mine if w == 1 else torch.cat(self.dist.gather(mine))

    def evaluate(self, model: torch.nn.Module, split, normalize: Normalize, batch_size: int,
                 tta_flip: bool = False, balanced: bool = False) -> tuple[float, float]:
        """(loss, accuracy) of ``split``; ``balanced``: the balanced accuracy (mean per-class recall)."""
        logits = self.logits(model, split.images, normalize, batch_size, tta_flip)
        loss, acc = loss_and_accuracy(logits, split.labels)
        if balanced:
            acc = metrics.balanced_accuracy(metrics.confusion_matrix(logits.argmax(1), split.labels, logits.shape[1]))
        return loss, acc

    def kernel_record(self) -> dict:
        """What a checkpoint's manifest keeps of the kernel choice, so a resume computes the same way."""
        return {"kernels": self.choice.to_dict()} if self.choice else {}

    def adopt(self, choice: autotune.Choice) -> None:
        """Compute as ``choice`` says (precision, attention kernel, layout) from here on."""
        self.choice, self.amp_dtype = choice, choice.amp_dtype
        self.kernels = choice.kernels(self.kernels.cls_only_last_block)

    def describe(self) -> str:
        where = f" x {self.dist.world} processes" if self.dist.world > 1 else ""
        how = self.choice.describe() if self.choice else f"{precision_name(self.amp_dtype)} {self.kernels.attention}"
        return f"{self.device.type}{where} {how}"


def choose_kernels(cfg: TrainConfig, data: DatasetSplits, compute: Compute, checkpoint: Path | None) -> autotune.Choice:
    """Precision, attention kernel and layout for this run: a resumed run keeps what its
    checkpoint trained with (its numbers continue exactly); a new one times the candidates
    the flags leave open (autotune), or takes them from the cache."""
    model_cfg = build_model_config(cfg, data)
    if checkpoint is not None:
        options = autotune.candidates(model_cfg, compute.device, cfg.attention, cfg.precision)
        saved = autotune.Choice.from_dict(read_meta(checkpoint, verify=False).extra.get("kernels"), options)
        # a checkpoint from before autotune trained with the rule of thumb, the first candidate
        return replace(saved or options[0], source="resumed")
    world = compute.dist.world
    batch = max(1, min(cfg.batch_size, len(data.train) // world * world) // world)
    return autotune.choose(model_cfg, compute.device, batch=batch, training=True, attention=cfg.attention,
                           precision=cfg.precision, cls_only_last_block=cfg.cls_only_last_block)
