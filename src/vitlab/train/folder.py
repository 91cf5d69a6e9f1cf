"""Stage 1, the run folder: open a new run or the one to resume (its config checked against its
checkpoint and its data against the checkpoint's fingerprint), hold its lock and its
TensorBoard writer, and put the state it continues from back in place."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch

from .. import report, rundir
from ..checkpoint import CONFIG, STATE, load_state, load_weights, open_checkpoint, read_meta, recover
from ..config import RUNTIME_FIELDS, TrainConfig, check_resume_changes, default_config
from ..data import DatasetSplits, fingerprint_changes
from ..devices import accumulation_dtype
from ..distributed import LAUNCHER_ENV, PeerLost, from_env
from ..errors import CheckpointError, DataError
from ..fileio import printable
from ..tblog import Board
from .compute import Compute
from .setup import Setup
from .state import TrainState


@dataclass
class RunFolder:
    """The run folder, its configuration and, when resuming, the checkpoint to continue."""

    cfg: TrainConfig
    dir: Path | None = None  # None until the data has loaded: a bad dataset leaves no folder behind
    lock: rundir.RunLock | None = None
    checkpoint: Path | None = None
    board: Board | None = None  # TensorBoard (rank 0)
    resuming: bool = False  # opened to continue (from its checkpoint, or from the start when it has none)

    @staticmethod
    def initial_config(cfg: TrainConfig | None, resume: str | Path | None, changes: dict) -> TrainConfig:
        """The configuration the compute is set up with. A resumed run's own, read-only; but
        under torchrun, where the run folder may live on rank 0's machine only, every rank
        starts from ``cfg`` or the defaults (plus ``changes``: the same device and threads on
        every rank) and is handed the run's config by rank 0 once the process group exists."""
        if resume is None:
            return (cfg or default_config()).validate()
        check_resume_changes(changes)
        if cfg is None and from_env().world > 1:
            cfg = default_config().replace(**changes)
        elif cfg is None:
            run_dir = Path(resume).expanduser()
            rundir.open_existing(run_dir).release()  # a clear error for a folder that is not a run, before reading it
            cfg = TrainConfig.load_yaml(run_dir / CONFIG).replace(**changes)
        return cfg.validate()

    @classmethod
    def open(cls, cfg: TrainConfig | None, resume: str | Path | None, log: Callable[[str], None],
             started: TrainConfig, changes: dict) -> "RunFolder":
        """A new run (``cfg``), or the run folder ``resume``, checked against its checkpoint;
        ``cfg`` None resumes with the saved config plus ``changes``. The device and threads
        are ``started``'s, the ones the process group started with."""
        if resume is None:
            return cls(cfg)
        run_dir = Path(resume).expanduser()
        lock = rundir.open_existing(run_dir)  # refuses a run another process is training
        try:
            saved = TrainConfig.load_yaml(run_dir / CONFIG)
            cfg = (cfg or saved.replace(**changes)).replace(device=started.device, threads=started.threads)
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
                cfg = _continued(cfg, saved, ckpt, run_dir)
        except BaseException:
            lock.release()
            raise
        return cls(cfg, run_dir, lock, ckpt, resuming=True)

    def create(self, overwrite: bool, note: str | None) -> None:
        name = self.cfg.name or f"{self.cfg.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        self.dir, self.lock = rundir.create(self.cfg, name, overwrite)
        self.save_config(note)

    def save_config(self, note: str | None) -> None:
        """config.yaml; ``note``: comment lines above the fields (the time budget's decisions)."""
        self.cfg.save_yaml(self.dir / CONFIG, note=note)

    def open_board(self) -> None:
        """The TensorBoard writer. A resumed run drops the events the killed process wrote after
        its checkpoint; a run restarted from its beginning drops all of them."""
        step = int(read_meta(self.checkpoint, verify=False).extra.get("step", 0)) + 1 if self.checkpoint else 0
        self.board = Board(self.dir, self.cfg.tensorboard, purge_step=step if self.resuming else None)

    def resume_command(self) -> str:
        return f"vitlab train --resume {printable(self.dir)}"

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        if self.lock is not None:
            self.lock.release()


def _continued(cfg: TrainConfig, saved: TrainConfig, ckpt: Path, run_dir: Path) -> TrainConfig:
    """The config a resumed run continues with: its checkpoint's (checksummed) own, of which only
    where and how fast it computes may change; a resumed run never downloads."""
    checked = TrainConfig.load_yaml(ckpt / CONFIG)
    # a --time-budget run re-plans its length as it goes: the checkpoint's is the one it continues
    ignore = RUNTIME_FIELDS + (("max_steps", "epochs") if checked.time_budget else ())
    for what, other in ((f"{run_dir / CONFIG} differs from", saved), ("this config differs from", cfg)):
        changed = other.differences(checked, ignore)
        if changed:
            raise CheckpointError(f"{what} the checksummed copy in {ckpt.name}/ in {', '.join(changed)}; "
                                  f"--resume continues the run as it started (start a new run to change it)")
    return checked.replace(**{k: getattr(cfg, k) for k in RUNTIME_FIELDS}).replace(download=False).validate()


def check_same_data(folder: RunFolder, data: DatasetSplits, compute: Compute) -> None:
    """Every rank has the same data, and when resuming it is what the run started on (its
    fingerprint in the checkpoint)."""
    mine = data.fingerprint()
    if len({json.dumps(f, sort_keys=True) for f in compute.dist.gather(mine)}) > 1:
        raise DataError(f"rank {compute.dist.rank}: the processes of this job see different data under "
                        f"{printable(folder.cfg.data_dir)}; every machine needs the same dataset files")
    if folder.checkpoint is None:
        return
    saved = compute.by_main(lambda: read_meta(folder.checkpoint, verify=False).data)
    if saved is not None:
        changed = fingerprint_changes(saved, mine)
        if changed:
            raise CheckpointError(f"{printable(folder.dir)}: the data is not what this run started on: "
                                  f"{', '.join(changed)} changed; resume with the original files (--data-dir)")


def prepare_state(folder: RunFolder, setup: Setup, compute: Compute, log: Callable[[str], None]) -> TrainState:
    """A fresh state, or the one in the checkpoint being resumed (metrics.csv cut back to it).
    The writing process reads the checkpoint and hands it to the others."""
    if folder.checkpoint is None:
        state = TrainState(epoch_sums=torch.zeros(3, device=compute.device, dtype=accumulation_dtype(compute.device)))
    else:
        def read() -> tuple:
            load_weights(folder.checkpoint, setup.model)  # checks the header first
            weights = {k: v.cpu() for k, v in setup.model.state_dict().items()}
            return load_state(folder.checkpoint), weights, report.read_metrics(folder.dir / rundir.METRICS)

        d, weights, rows = compute.by_main(read)
        state = TrainState.restore(folder.checkpoint / STATE, d, weights, setup, compute.device, compute.main, rows)
        if compute.main:
            report.write_metrics(folder.dir / rundir.METRICS, state.rows)
        log(f"resuming {printable(folder.dir)} at epoch {state.epoch + 1}, step {state.step}")
    state.bad_step = torch.full((), -1, dtype=torch.long, device=compute.device)
    state.started = time.perf_counter()
    return state


def final_checkpoint(folder: RunFolder, log: Callable[[str], None]) -> Path:
    """best/, verified; last/ (with a note) when best/ is missing or damaged."""
    for name in ("best", "last"):
        checkpoint = folder.dir / name
        try:
            open_checkpoint(checkpoint)
        except CheckpointError as e:
            if name == "best":
                log(f"note: {e}; the report uses {printable(folder.dir / 'last')} instead")
            continue
        return checkpoint
    raise CheckpointError(f"{printable(folder.dir)}: neither best/ nor last/ is intact; nothing to report")


def peer_lost(folder: RunFolder | None, compute: Compute, error: BaseException) -> PeerLost:
    """One line for a collective that failed because another rank went away. Under `vitlab
    train --nproc` the launcher names the rank that died and says how to resume; a rank other
    than 0 says nothing of its own (rank 0, or the launcher, speaks for the job)."""
    last = folder.dir / "last" if folder is not None and folder.dir is not None else None
    resume = (f"; its last checkpoint is intact, continue with: {folder.resume_command()}"
              if last is not None and last.is_dir() else "")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    e = PeerLost(f"rank {compute.dist.rank}: another process of this job stopped ({first[:160]}){resume}")
    e.from_main = bool(os.environ.get(LAUNCHER_ENV)) or not compute.main
    return e
