"""Stage 7, the time budget (``--time-budget``): calibration at the start, the plan, and its
re-plans from the pace the run keeps, as one object that does nothing for a run without a
budget (or a resumed one, which keeps the length decided when it started)."""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from .. import budget as budgets
from ..budget import Keeper, Plan, epochs_for, parse_duration
from ..checkpoint import save_checkpoint
from ..config import TrainConfig
from ..data import DatasetSplits
from ..fileio import temp_dir
from ..inference import predict_logits
from ..model import ViT
from ..devices import keep_random_streams, synchronize
from .compute import Compute
from .loop import apply_gradients, loss_and_logits
from .setup import Setup, build_optimizer

REPORT_TAIL = 0.5  # seconds of the report still to come when its time is measured


class TimeBudget:
    """The budget's plan and its keeper (rank 0's; the other ranks follow its decisions). Without
    a budget every method does nothing and ``note()`` is None."""

    def __init__(self, origin: float, plan: Plan | None = None, keeper: Keeper | None = None):
        self.origin = origin  # the time.perf_counter() the budget counts from
        self.plan, self.keeper = plan, keeper

    @classmethod
    def start(cls, cfg: TrainConfig, setup: Setup, data: DatasetSplits, compute: Compute, origin: float,
              resumed: bool) -> "TimeBudget":
        """Calibrate and plan (the writing process; every rank gets the plan)."""
        if not cfg.time_budget or resumed:
            return cls(origin)
        threads = None if cfg.threads or compute.dist.world > 1 else torch.get_num_threads()
        share, now = budgets.early_share() if threads else None, threads
        if share is not None:  # other processes busy since the start: time the steps on the cores they leave
            now = share.threads(threads) or threads
            torch.set_num_threads(now)
        plan = compute.by_main(lambda: plan_budget(cfg, setup, data, compute, origin))
        if now != threads:
            plan.revisions.insert(0, f"before the calibration: other processes kept {share.busy:.1f} of "
                                     f"{share.cores} cores busy, so {now} thread(s) instead of {threads}")
        return cls(origin, plan, Keeper(plan, origin, threads, share, now) if compute.main else None)

    def shape(self, cfg: TrainConfig, steps_per_epoch: int) -> TrainConfig:
        """``cfg`` with the planned length (and a warmup that fits in it)."""
        if self.plan is None:
            return cfg
        length = self.plan.steps / steps_per_epoch
        return cfg.replace(max_steps=self.plan.steps, warmup_epochs=min(cfg.warmup_epochs, length / 5))

    def note(self) -> str | None:
        """What config.yaml says above its fields: the plan and every re-plan."""
        return self.plan.describe() if self.plan is not None else None

    def begin(self, step: int) -> None:
        if self.keeper is not None:
            self.keeper.start(time.perf_counter(), step)

    def epoch_end(self, seconds: float) -> None:
        if self.keeper is not None:
            self.keeper.pace.epoch_end(seconds)

    def keep(self, cfg: TrainConfig, setup: Setup, step: int, epoch: int, compute: Compute,
             log: Callable[[str], None]) -> TrainConfig | None:
        """At a log interval: the run's config with a new length, when the pace it keeps needs
        one (None otherwise); the thread count fitted to the cores others leave free."""
        if self.plan is None:
            return None

        def decide() -> tuple[int | None, int | None]:
            threads = self.keeper.threads() if self.keeper.cores is not None else None
            if threads is not None:
                torch.set_num_threads(threads)
            return self.keeper.check(step, epoch, time.perf_counter()), threads

        steps, threads = compute.by_main(decide)
        if threads is not None:
            log(f"time budget: other processes keep cores busy; training on {threads} thread(s) now")
        if steps is None or steps == setup.total_steps:
            return None
        log(f"time budget: re-planned {self.plan.revisions[-1]}")
        return cfg.replace(max_steps=steps, epochs=epochs_for(steps, setup.steps_per_epoch))

    def used(self) -> float:
        """Seconds of the budget used, the rest of the report included."""
        return time.perf_counter() - self.origin + REPORT_TAIL

    def explanations_fit(self) -> bool:
        """Whether attention.png, the report's costliest figure, still fits in the budget: the
        report's fixed part, slowed by the processes beside it, must end by then. Without a
        budget, always."""
        if self.plan is None:
            return True
        slowdown = self.keeper.report_slowdown() if self.keeper is not None else 1.0
        return self.used() + budgets.REPORT_SECONDS * slowdown <= self.plan.budget

    def report(self, cfg: TrainConfig, steps: int) -> tuple[dict | None, str | None]:
        """(results.json's ``time_budget``, results.md's line) of a finished run."""
        if not cfg.time_budget:
            return None, None
        limit, used = parse_duration(cfg.time_budget), self.used()
        line = (f"{budgets.format_duration(limit)}; this process ran {budgets.format_duration(used)} "
                f"({100 * used / limit:.0f}% of it) for {steps} steps in {cfg.epochs} epochs"
                + (f" ({self.plan.describe().replace(chr(10), '; ')})" if self.plan else ""))
        return {"budget_s": limit, "used_s": used, "epochs": cfg.epochs, "steps": steps}, line


def calibrate(cfg: TrainConfig, setup: Setup, data: DatasetSplits, compute: Compute, steps: int = 8
              ) -> tuple[float, float, float, float]:
    """(seconds per training step, per evaluated image, per checkpoint, to compile) measured on
    copies of the model and optimizer, with the random streams put back: the run itself is
    untouched. With --compile the steps are timed compiled, and the first step's excess over
    them is the compile time the run will pay again (less, where the compiler's cache helps)."""
    with keep_random_streams(compute.device):  # the run's own streams, the device's too, as they were
        return _calibrate(cfg, setup, data, compute, steps)


def _calibrate(cfg: TrainConfig, setup: Setup, data: DatasetSplits, compute: Compute, steps: int
               ) -> tuple[float, float, float, float]:
    model = copy.deepcopy(setup.model).train()
    step_model = torch.compile(model) if cfg.compile else model  # evaluation runs eager, as in the run
    scaler = copy.deepcopy(setup.scaler)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, scaler, cfg.optimizer, cfg.layer_decay)
    optimizer.load_state_dict(setup.optimizer.state_dict())
    batches = setup.batches
    bs = batches.batch_size // compute.dist.world
    gen = torch.Generator(device=compute.device).manual_seed(12345)
    idx = torch.arange(bs, device=compute.device) % len(batches.labels)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        x = batches.augment(batches.images.index_select(0, idx), gen)
        y = batches.labels.index_select(0, idx)
        loss, _ = loss_and_logits(step_model, x, y, compute.device, compute.amp_dtype, cfg.label_smoothing,
                                  setup.class_weights)
        optimizer.zero_grad(set_to_none=True)
        apply_gradients(model, optimizer, loss, cfg.grad_clip, scaler)
        synchronize(compute.device)
        times.append(time.perf_counter() - t)
    images = data.val.images[: max(2 * cfg.eval_batch_size, 256)]
    predict_logits(model, images[: cfg.eval_batch_size], setup.normalize, cfg.eval_batch_size, compute.device,
                   compute.amp_dtype)
    passes = []  # the fastest of three: one pass is a fraction of a second, and a hiccup doubled it (measured)
    for _ in range(3):
        synchronize(compute.device)
        t = time.perf_counter()
        predict_logits(model, images, setup.normalize, cfg.eval_batch_size, compute.device, compute.amp_dtype)
        synchronize(compute.device)  # (on a GPU the passes are only queued until here)
        passes.append(time.perf_counter() - t)
    eval_per_image = min(passes) / max(1, len(images))
    step = sorted(times[2:])[len(times[2:]) // 2]
    compile_s = max(0.0, times[0] - step) if cfg.compile else 0.0
    return step, eval_per_image, checkpoint_seconds(cfg, setup, model, optimizer), compile_s


def checkpoint_seconds(cfg: TrainConfig, setup: Setup, model: ViT, optimizer: torch.optim.Optimizer) -> float:
    """One save of weights and optimizer state (fsynced), in a temporary folder where the run
    will live: on small models an epoch's checkpoints cost as much as its steps."""
    out = Path(cfg.out).expanduser()
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out, ".vitlab-calibrate-")
    try:
        t = time.perf_counter()
        save_checkpoint(tmp / "last", model, setup.meta, setup.config_yaml, {"optimizer": optimizer.state_dict()})
        return time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if made and not any(out.iterdir()):
            out.rmdir()  # a folder this measurement made, left empty: a refused run leaves nothing


def plan_budget(cfg: TrainConfig, setup: Setup, data: DatasetSplits, compute: Compute, since: float) -> Plan:
    step_s, eval_s, ckpt_s, compile_s = calibrate(cfg, setup, data, compute)
    return budgets.plan(parse_duration(cfg.time_budget), step_s, eval_s, setup.steps_per_epoch, len(data.val),
                        len(data.train) + len(data.test) + (0 if data.val_is_test else len(data.val)),
                        val_passes=2 if cfg.ema_decay > 0 else 1, final_passes=2 if cfg.tta_flip else 1,
                        max_steps=1 << 40, since=since, checkpoint_seconds=ckpt_s, compile_seconds=compile_s)
