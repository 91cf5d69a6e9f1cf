"""Run folders: what counts as one, who may write in it, and what may replace it.

A run folder is vitlab's own when it holds vitlab's ``config.yaml`` and checkpoints or
metrics; ``--overwrite`` replaces nothing else, and nothing outside the run folder is
ever deleted. While a process trains in a run folder it holds an OS lock on
``<run>/.lock`` (``fcntl.flock``: released by the kernel on any exit, SIGKILL
included); a second process that would resume or overwrite that run is refused,
naming the first.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

from .checkpoint import MANIFEST
from .config import TrainConfig
from .errors import ConfigError, VitlabError
from .fileio import file_mode, fsync_dir, printable

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one process per run folder is then the user's to keep
    fcntl = None

LOCK = ".lock"
CHECKPOINTS = ("last", "best", "last.prev", "best.prev")


class RunInUse(VitlabError):
    """Another live process holds the run folder."""


class RunLock:
    """An exclusive lock on a run folder, held from ``acquire`` until ``release`` or process exit."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        path = self.run_dir / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise RunInUse(f"{printable(self.run_dir)} is in use by {holder}; wait for it to finish, "
                               f"or stop it (its checkpoints resume with --resume)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _listing(folder: Path, limit: int = 4) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not entries:
        return "nothing"
    shown = ", ".join(printable(e) for e in entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def kind_of(folder: Path) -> str:
    """'run' (vitlab's config.yaml plus checkpoints or metrics), 'unstarted' (vitlab's
    config.yaml and nothing of value: killed before its first checkpoint), or 'other'."""
    try:
        TrainConfig.load_yaml(folder / "config.yaml")
    except VitlabError:
        return "other"
    if (folder / "metrics.csv").is_file() or any((folder / c / MANIFEST).is_file() for c in CHECKPOINTS):
        return "run"
    extras = {p.name for p in folder.iterdir()} - {"config.yaml", LOCK}
    return "unstarted" if all(e.startswith(".") and e.endswith(".tmp") for e in extras) else "other"


def create(cfg: TrainConfig, name: str, overwrite: bool) -> tuple[Path, RunLock]:
    """``<cfg.out>/<name>``, new and locked. An existing vitlab run is replaced only with
    ``overwrite`` (and only when no process holds it); a run killed before its first
    checkpoint is replaced without; anything else is refused, saying what is there."""
    out = Path(cfg.out).expanduser()
    run_dir = out / name
    old_lock = None
    if run_dir.is_symlink():
        raise ConfigError(f"run folder {run_dir} is a symbolic link; refusing to write through it (choose another --name)")
    if run_dir.exists():
        if not run_dir.is_dir():
            raise ConfigError(f"{run_dir} exists and is not a folder; choose another --name or --out")
        kind = kind_of(run_dir)
        if kind == "other":
            raise ConfigError(f"{run_dir} exists and is not a vitlab run folder (it holds {_listing(run_dir)}); "
                              f"vitlab replaces only its own run folders: choose another --name or --out")
        if kind == "run" and not overwrite:
            raise ConfigError(f"run folder {run_dir} already exists; pass --overwrite to replace it or --name to choose another")
        old_lock = RunLock(run_dir).acquire()  # refuses a live run
        doomed = out / f".{name}.replaced-{os.getpid()}.tmp"
        os.rename(run_dir, doomed)  # out of the way at once; deleted below, where nothing else can reach it
        shutil.rmtree(doomed)
        old_lock.release()
    try:
        run_dir.mkdir(parents=True)
    except FileExistsError:
        raise ConfigError(f"run folder {run_dir} was created by another process just now; choose another --name") from None
    except OSError as e:
        raise ConfigError(f"cannot create run folder {run_dir}: {e.strerror}") from None
    fsync_dir(out)
    return run_dir, RunLock(run_dir).acquire()


def open_existing(run_dir: Path) -> RunLock:
    """Lock the run folder ``run_dir`` for resuming it; refuses what is not a vitlab run."""
    if not run_dir.is_dir() or not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml); pass the folder `vitlab train` created")
    if kind_of(run_dir) == "other":
        raise ConfigError(f"{run_dir}: not a vitlab run folder (it holds {_listing(run_dir)})")
    return RunLock(run_dir).acquire()


def remove_stale(run_dir: Path) -> None:
    """Delete the temporary files and folders (``.*.tmp``) a killed process left in the run folder."""
    for stale in run_dir.glob(".*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def tidy(run_dir: Path) -> None:
    """After the final report: the crash-safety copies are no longer needed."""
    for name in ("best.prev", "last.prev"):
        if (run_dir / name).is_dir() and not (run_dir / name).is_symlink():
            shutil.rmtree(run_dir / name)
    remove_stale(run_dir)
