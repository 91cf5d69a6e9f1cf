"""Data-parallel training with PyTorch's own engine: torch.distributed + DistributedDataParallel,
launched by torchrun (nanoGPT's recipe: RANK in the environment, rank 0 writes).

A run on N processes is the same run as on one: every rank draws the same epoch order
and augments the whole global batch with the same generator, then trains on its own
B/N rows; DDP averages the gradients (a mean loss, so N x B/N equals 1 x B). Metrics,
stop requests and non-finite losses are combined where the loop already syncs.

A process that is not part of a torchrun job is a job of one: the same :class:`Dist`, whose
collectives return what they are given, so the training code never asks "distributed or
not". Without torchrun's environment torch.distributed is never imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from dataclasses import dataclass
from datetime import timedelta

import torch

from .errors import ConfigError, VitlabError

TIMEOUT_ENV = "VITLAB_DIST_TIMEOUT"  # seconds a collective may wait for a rank (default 600)
LAUNCHER_ENV = "VITLAB_LAUNCHER"  # set by `vitlab train --nproc` for its ranks: the launcher reports failures


class PeerLost(VitlabError):
    """Another process of the job stopped (killed, crashed, or its machine went away)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (a job of one without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch."""
        per = batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    # ---- collectives (all ranks must call them at the same points; a job of one returns its own)
    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def all_min(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MIN)
        return out

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is True on any."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj):
        """``obj`` of rank 0, on every rank (pickled: plain data and CPU tensors)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _env_int(name: str, default: str | None = None) -> int:
    text = os.environ.get(name, default)
    try:
        value = int(str(text).strip())
    except ValueError:
        value = -1
    if not 0 <= value <= 1 << 20:
        raise ConfigError(f"{name}={str(text)[:40]!r} is not a process number (torchrun sets it: start vitlab with "
                          f"torchrun or `vitlab train --nproc N`)")
    return value


def from_env() -> Dist:
    """The torchrun job this process belongs to (a job of one without torchrun); a torchrun
    environment that does not make sense is a ConfigError naming the variable."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    d = Dist(_env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK", "0"),
             _env_int("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if not (d.rank < d.world and d.local_rank < d.local_world <= d.world):
        raise ConfigError(f"RANK {d.rank}, WORLD_SIZE {d.world}, LOCAL_RANK {d.local_rank} and LOCAL_WORLD_SIZE "
                          f"{d.local_world} do not describe a process of a job (rank < world size)")
    return d if d.world > 1 else Dist()


def timeout_seconds() -> float:
    """VITLAB_DIST_TIMEOUT: how long a collective waits for the other ranks (default 600 s)."""
    text = os.environ.get(TIMEOUT_ENV, "600")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 1 <= value <= 7 * 86400:  # also refuses NaN and infinities
        raise ConfigError(f"{TIMEOUT_ENV}={text[:40]!r} must be a number of seconds from 1 to 604800")
    return value


def check_rendezvous() -> None:
    """MASTER_ADDR and MASTER_PORT, which torch.distributed's env:// start reads, are there and sane."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not addr.strip():
        raise ConfigError("RANK and WORLD_SIZE are set but MASTER_ADDR is not: start vitlab with torchrun (or "
                          "`vitlab train --nproc N`), or set MASTER_ADDR and MASTER_PORT to rank 0's address")
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(f"MASTER_PORT={port[:40]!r} is not a port number (1 to 65535)")


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank went away: torch's
    DistError family, or the RuntimeError gloo raises for a closed connection."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("gloo" in text or "NCCL" in text or "Connection" in text
                                                 or "timed out" in text.lower())


def die_with_launcher(poll_seconds: float = 1.0) -> None:
    """torchrun starts each rank in a session of its own, so a launcher killed with SIGKILL
    (or its process group) would leave the ranks training on, holding the run folder. On
    Linux the kernel is told to kill this rank when its parent dies (PR_SET_PDEATHSIG);
    elsewhere (macOS, which has no such call) a daemon thread watches for the parent to
    change (an orphan is handed to launchd or init) and ends the rank within ``poll_seconds``.
    A launcher that is only asked to stop forwards the signal and waits for the ranks first."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the launcher died before the line above
            os._exit(1)
        return
    if sys.platform.startswith("win"):
        return  # Windows keeps a dead parent's pid: README says what holds there
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="vitlab-launcher-watch", daemon=True).start()


def start(d: Dist, device_name: str) -> torch.device:
    """Join the process group: NCCL with one GPU per rank (from LOCAL_RANK), or gloo on CPU."""
    import torch.distributed as dist

    check_rendezvous()
    timeout = timedelta(seconds=timeout_seconds())
    die_with_launcher()
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
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


def launch(nproc: int, argv: list[str], run_dir: str | None = None) -> int:
    """``vitlab train --nproc N``: torchrun's launcher (torch.distributed.run), run in this
    process, starting N copies of ``python -m vitlab <argv>`` on this machine. Returns the exit
    code, having said in one line what ended the job: a rank that failed (and how), or an
    interruption (each rank has saved; rank 0 said how to resume). ``run_dir``: the run
    folder, for the resume command."""
    import logging
    import signal

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its notes and tracebacks: vitlab says it in one line
    os.environ[LAUNCHER_ENV] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several processes, without its banner
    args = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "vitlab", *argv])
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        # a rank killed by a signal printed nothing: name it (the others then stopped with it, silently);
        # a rank that ended itself printed why (130: interrupted, and rank 0 said how to resume)
        # (SIGTERM last: it is how the launcher stops the survivors of a failure)
        killed = sorted((f.exitcode == -signal.SIGTERM, f.timestamp, rank, f.exitcode)
                        for rank, f in e.failures.items() if f.exitcode < 0)
        if not killed:
            codes = {f.exitcode for f in e.failures.values()}
            return 130 if codes == {130} else 1
        *_, rank, code = killed[0]
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        last = Path(run_dir, "last") if run_dir else None
        after = (f"its last checkpoint is intact; continue with: vitlab train --resume {run_dir}"
                 if last is not None and last.is_dir() else "no checkpoint had been written yet")
        print(f"error: process {rank} of {nproc} was killed by {name}; the job stopped, {after}", file=sys.stderr)
        return 1
    except SignalException:
        return 130  # the ranks were asked to stop: each saved, rank 0 said how to resume
    return 0
