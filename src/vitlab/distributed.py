"""Data-parallel training with PyTorch's own engine: torch.distributed + DistributedDataParallel,
launched by torchrun (nanoGPT's recipe: RANK in the environment, rank 0 writes).

A run on N processes is the same run as on one: every rank draws the same epoch order
and augments the whole global batch with the same generator, then trains on its own
B/N rows; DDP averages the gradients (a mean loss, so N x B/N equals 1 x B). Metrics,
stop requests and non-finite losses are combined where the loop already syncs. Without
torchrun's environment nothing here runs, and torch.distributed is never imported.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

from .errors import ConfigError

TIMEOUT_ENV = "VITLAB_DIST_TIMEOUT"  # seconds a collective may wait for a rank (default 600)


@dataclass
class Dist:
    """This process's place in a torchrun job."""

    rank: int
    world: int
    local_rank: int
    local_world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch."""
        per = batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    # ---- collectives (all ranks must call them at the same points)
    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def all_min(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MIN)
        return out

    def any(self, flag: bool, device: torch.device) -> bool:
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj):
        """``obj`` of rank 0, on every rank (pickled: plain data and CPU tensors)."""
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def from_env() -> Dist | None:
    """The torchrun job this process belongs to, or None (no torchrun, or a job of one)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE, LOCAL_RANK must be integers (they are torchrun's to set)") from None
    return d if d.world > 1 else None


def die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a launcher killed with SIGKILL
    (or its process group) would leave the ranks training on, holding the run folder. On
    Linux the kernel is told to kill this rank when its parent dies (PR_SET_PDEATHSIG); a
    launcher that is only asked to stop forwards the signal and waits for the ranks first."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the line above
        os._exit(1)


def start(d: Dist, device_name: str) -> torch.device:
    """Join the process group: NCCL with one GPU per rank (from LOCAL_RANK), or gloo on CPU."""
    import torch.distributed as dist

    die_with_launcher()
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 600)))
    if cuda:
        if d.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"rank {d.rank}: LOCAL_RANK {d.local_rank} but only {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return device


def threads_per_rank(requested: int, d: Dist) -> int:
    """CPU threads for each of the ranks on this machine: never more than the cores in all
    (two processes on two cores that each use both run at a tenth of their speed)."""
    total = requested or torch.get_num_threads()
    return max(1, total // d.local_world)


def stop() -> None:
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> None:
    """``vitlab train --nproc N ...``: replace this process with torchrun's launcher running
    N copies of ``python -m vitlab train ...`` on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "vitlab", *argv]
    os.execv(sys.executable, cmd)
