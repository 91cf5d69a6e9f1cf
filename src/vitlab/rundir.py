"""Run folders: what counts as one, who may write in it, and what may replace it.

A run folder is vitlab's own when its ``config.yaml`` is a vitlab run config and everything
in it is something the trainer writes (:data:`ENTRIES`, checkpoint folders holding only
checkpoint files, ``tb/`` holding only event files, and vitlab's temporaries);
``--overwrite`` replaces nothing else, and nothing outside the run folder is ever deleted.
While a process trains in a run folder it holds an OS lock on ``<run>/.lock`` (``fcntl.flock``
on Linux and macOS, ``msvcrt.locking`` of one byte past the text on Windows: released by the
system on any exit, a kill included); a second process that would resume or overwrite that
run is refused, naming the first. The lock file is
opened without following links and refused when it is a link of any kind: a run folder
copied or unpacked from elsewhere may carry one, and truncating it would write outside.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

from .checkpoint import CONFIG, MANIFEST, STATE, WEIGHTS
from .config import TrainConfig, load_yaml_file
from .errors import ConfigError, VitlabError
from .tblog import FOLDER as TENSORBOARD
from .fileio import NotRegularFile, fsync_dir, open_own, owner_tag, printable, remove, sweep_stale

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # everywhere else
    msvcrt = None

# What the trainer writes in a run folder, and nothing else.
LOCK = ".lock"
METRICS = "metrics.csv"
RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
FIGURES = ("loss_curve.png", "predictions.png", "attention.png", "confusion.png")
CHECKPOINTS = ("last", "best", "last.prev", "best.prev")
# `vitlab export` writes beside a checkpoint by default: best.onnx, best-timm/, best-hf/
EXPORTS = tuple(f"{c}{suffix}" for c in ("best", "last") for suffix in (".onnx", "-timm", "-hf"))
ENTRIES = frozenset({CONFIG, LOCK, METRICS, RESULTS_MD, RESULTS_JSON, TENSORBOARD, *FIGURES, *CHECKPOINTS, *EXPORTS})
CHECKPOINT_FILES = frozenset({CONFIG, MANIFEST, WEIGHTS, STATE})
WINDOWS_LOCK_OFFSET = 1 << 20  # the byte msvcrt locks: past the holder's text, which others must read


def try_lock(fd: int) -> bool:
    """Lock the open file ``fd`` for this process, without waiting: whether it was free. The
    platform's own lock, held until the descriptor closes or the process ends however it ends."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True
    if msvcrt is not None:
        os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)  # Windows locks byte ranges; one past the end is allowed
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
        return True
    raise ConfigError("this platform has no file lock vitlab knows (fcntl or msvcrt); two processes could share "
                      "a run folder")


# Fields every config.yaml vitlab has written holds (the others were added over time): an
# empty or foreign YAML file parses as the defaults, and is not a run's config.
CORE_FIELDS = ("dataset", "depth", "dim", "heads", "epochs", "batch_size", "lr", "seed")


class RunInUse(VitlabError):
    """Another live process holds the run folder."""


class RunLock:
    """An exclusive lock on a run folder, held from ``acquire`` until ``release`` or process exit."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        path = self.run_dir / LOCK
        try:
            fd = open_own(path, os.O_RDWR | os.O_CREAT)
        except NotRegularFile as e:
            raise ConfigError(f"{e}; if this run folder is yours, delete {printable(path)} and try again") from None
        try:
            free = try_lock(fd)
        except BaseException:
            os.close(fd)
            raise
        if not free:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunInUse(f"{printable(self.run_dir)} is in use by {holder}; wait for it to finish, "
                           f"or stop it (its checkpoints resume with --resume)")
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


def _listing(names: list[str], limit: int = 4) -> str:
    if not names:
        return "nothing"
    shown = ", ".join(printable(e) for e in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` the trainer does not write (sorted; folders end in '/'): a link where
    vitlab writes a folder, a checkpoint folder with other files, anything else at all."""
    odd = []
    for p in sorted(folder.iterdir()):
        name = p.name
        if _is_temp(name):
            continue
        if name not in ENTRIES:
            odd.append(name + ("/" if p.is_dir() and not p.is_symlink() else ""))
        elif name in CHECKPOINTS or name == TENSORBOARD:
            if p.is_symlink() or not p.is_dir():
                odd.append(f"{name} (not a folder of vitlab's)")
                continue
            for q in sorted(p.iterdir()):
                if _is_temp(q.name):
                    continue
                known = q.name in CHECKPOINT_FILES if name in CHECKPOINTS else "tfevents" in q.name
                if not known or q.is_symlink() or not q.is_file():
                    odd.append(f"{name}/{q.name}")
    return odd


def run_config_problem(path: Path) -> str | None:
    """Why ``path`` is not a regular file holding a vitlab run configuration (None: it is one)."""
    if path.is_symlink():
        return f"{printable(path)} is a symbolic link"
    if not path.exists():
        return f"no {path.name}"
    try:
        raw = load_yaml_file(path)
        if not isinstance(raw, dict) or not all(k in raw for k in CORE_FIELDS):
            return f"{printable(path)} is not a vitlab run config"
        TrainConfig.from_dict(raw, source=str(path))
    except VitlabError as e:
        return str(e)
    return None


def is_run_config(path: Path) -> bool:
    """Whether ``path`` is a regular file holding a vitlab run configuration."""
    return run_config_problem(path) is None


def kind_of(folder: Path) -> str:
    """'run' (vitlab's config.yaml plus checkpoints or metrics), 'unstarted' (vitlab's config.yaml
    and nothing of value: killed before its first checkpoint), or 'other' (anything that is not
    a run config, or anything in the folder the trainer does not write)."""
    if not is_run_config(folder / CONFIG) or foreign_entries(folder):
        return "other"
    if (folder / METRICS).is_file() or any((folder / c / MANIFEST).is_file() for c in CHECKPOINTS):
        return "run"
    return "unstarted"


def _not_a_run(folder: Path) -> str:
    problem = run_config_problem(folder / CONFIG)
    if problem is not None:
        names = [p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in sorted(folder.iterdir())]
        return (f"it holds {_listing(names)}, and no run config of vitlab's" if problem == f"no {CONFIG}"
                or "not a vitlab run config" in problem else problem)
    return f"it holds {_listing(foreign_entries(folder))}, which vitlab does not write"


def create(cfg: TrainConfig, name: str, overwrite: bool) -> tuple[Path, RunLock]:
    """``<cfg.out>/<name>``, new and locked. An existing vitlab run is replaced only with
    ``overwrite`` (and only when no process holds it); a run killed before its first
    checkpoint is replaced without; anything else is refused, saying what is there."""
    out = Path(cfg.out).expanduser()
    run_dir = out / name
    sweep_stale(out, f".{name}.", ".tmp")  # a replaced run a killed process had not finished deleting
    if run_dir.is_symlink():
        raise ConfigError(f"run folder {run_dir} is a symbolic link; refusing to write through it (choose another --name)")
    if run_dir.exists():
        if not run_dir.is_dir():
            raise ConfigError(f"{run_dir} exists and is not a folder; choose another --name or --out")
        kind = kind_of(run_dir)
        if kind == "other":
            raise ConfigError(f"{run_dir} exists and is not a vitlab run folder ({_not_a_run(run_dir)}); "
                              f"vitlab replaces only its own run folders: choose another --name or --out")
        if kind == "run" and not overwrite:
            raise ConfigError(f"run folder {run_dir} already exists; pass --overwrite to replace it or --name to choose another")
        old_lock = RunLock(run_dir).acquire()  # refuses a live run
        doomed = out / f".{name}.{owner_tag()}.replaced.tmp"
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
    if not run_dir.is_dir() or not (run_dir / CONFIG).is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no {CONFIG}); pass the folder `vitlab train` created")
    if kind_of(run_dir) == "other":
        raise ConfigError(f"{run_dir}: not a vitlab run folder ({_not_a_run(run_dir)})")
    return RunLock(run_dir).acquire()


def remove_stale(run_dir: Path) -> None:
    """Delete the temporary files and folders (``.*.tmp``) a killed process left in the run
    folder and in its TensorBoard folder (links are removed, never followed)."""
    for folder in (run_dir, run_dir / TENSORBOARD):
        if folder.is_symlink() or not folder.is_dir():
            continue
        for stale in folder.glob(".*.tmp"):
            try:
                remove(stale)
            except OSError:
                pass


def tidy(run_dir: Path) -> None:
    """After the final report: the crash-safety copies are no longer needed."""
    for name in ("best.prev", "last.prev"):
        remove(run_dir / name)
    remove_stale(run_dir)
