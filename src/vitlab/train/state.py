"""Stage 5, the resumable state: everything that changes while a run trains, saved in a
checkpoint's ``state.pt`` with the optimizer, EMA, batch-generator and global random streams,
and restored as one object. Serialising it is local: the epoch's sums over the ranks are
gathered by the caller, where it is visible that every rank takes part."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..devices import accumulation_dtype
from ..errors import CheckpointError
from .setup import Setup

STATE_SCALARS = {"epoch": int, "batch": int, "step": int, "best_val_acc": float, "elapsed": float,
                 "lr_scale": float, "metrics_rows": int}


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
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
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
    if device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


@dataclass
class TrainState:
    """Everything that changes while a run trains. It is the same whatever the number of
    processes: counters count global batches, and the epoch's sums saved are all ranks'."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps taken
    best_val_acc: float = -1.0
    elapsed: float = 0.0  # training seconds of earlier sessions
    lr_scale: float = 1.0  # halved by every batch skipped for a non-finite loss
    metrics_rows: int = 0
    epoch_sums: torch.Tensor | None = None  # (loss sum, correct, seen) of this epoch, this rank's, on the device
    rows: list[dict] = field(default_factory=list)  # metrics.csv
    started: float = field(default_factory=time.perf_counter)  # this session's start of training
    # The first step whose loss was NaN/Inf, tracked on the device so the hot loop needs no host sync.
    bad_step: torch.Tensor | None = None

    def seconds(self) -> float:
        return self.elapsed + (time.perf_counter() - self.started)

    def to_dict(self, setup: Setup, device: torch.device, epoch_sums: torch.Tensor) -> dict:
        """What state.pt holds; ``epoch_sums``: this epoch's sums over every rank."""
        return {**{k: getattr(self, k) for k in STATE_SCALARS}, "elapsed": self.seconds(),
                "metrics_rows": len(self.rows), "epoch_sums": epoch_sums.cpu(),
                "device_type": device.type, "optimizer": setup.optimizer.state_dict(),
                "aug_generator": setup.batches.generator.get_state(), "rng": rng_state(device),
                "host_generator": json.dumps(setup.batches.host.bit_generator.state),
                **({"ema": setup.ema.model.state_dict()} if setup.ema is not None else {}),
                **({"scaler": setup.scaler.state_dict()} if setup.scaler is not None else {})}

    @classmethod
    def restore(cls, path: Path, d: dict, weights: dict, setup: Setup, device: torch.device, main: bool,
                rows: list[dict]) -> "TrainState":
        """The state ``d`` (read from ``path``) and ``weights`` put back into ``setup``; a foreign
        or other-device state is a CheckpointError naming the file. ``main``: whether this
        process keeps the saved sums (the other ranks start theirs from zero)."""
        try:
            state = cls(**{k: kind(d[k]) for k, kind in STATE_SCALARS.items()})
            if d["device_type"] != device.type:
                raise CheckpointError(f"{path}: this run trained on {d['device_type']}; its random streams cannot "
                                      f"continue on {device.type}: resume with --device {d['device_type']}")
            if (setup.ema is not None) != ("ema" in d):
                raise CheckpointError(f"{path}: the state {'lacks' if setup.ema else 'has'} EMA weights but the "
                                      f"config says ema_decay {'> 0' if setup.ema else '= 0'}")
            setup.model.load_state_dict(weights)
            setup.optimizer.load_state_dict(d["optimizer"])
            setup.batches.generator.set_state(d["aug_generator"])
            if "host_generator" in d:  # (a checkpoint of vitlab 0.2 drew mixing on the device)
                setup.batches.host.bit_generator.state = json.loads(d["host_generator"])
            if setup.ema is not None:
                setup.ema.model.load_state_dict(d["ema"])
            if setup.scaler is not None and "scaler" in d:  # (fp16; the scale a run had reached)
                setup.scaler.load_state_dict(d["scaler"])
            set_rng_state(d["rng"], device)
            sums = d["epoch_sums"].to(device=device, dtype=accumulation_dtype(device))
            state.epoch_sums = sums if main else torch.zeros_like(sums)  # the saved sums are all ranks'
            if state.epoch_sums.shape != (3,) or not 0 <= state.batch <= setup.batches_in(state.epoch):
                raise ValueError("counters out of range")
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{path}: not a training state of this run ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
        state.rows = rows[: state.metrics_rows]  # drop rows written after this checkpoint
        return state
