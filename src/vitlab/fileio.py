"""Writing files so that a crash never leaves half of one, and reading untrusted ones with a bound.

Every file vitlab writes goes through :func:`atomic_write_bytes` (or a folder through
:func:`private_temp_dir` + rename): written under a temporary name beside its target,
fsynced, renamed into place. Temporary files are created owner-only by ``tempfile``;
they get the permissions the user's umask gives any new file before they are renamed,
so a run folder is as readable as anything else the user creates.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once at import; os.umask can only be read by setting it


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_mode() -> int:
    return 0o666 & ~UMASK


def dir_mode() -> int:
    return 0o777 & ~UMASK


def write_synced(path: Path, data: bytes) -> None:
    """Plain write + fsync (for files inside a temporary folder that is renamed as a whole)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def append_synced(path: Path, data: bytes) -> None:
    """Append + fsync: for logs whose readers drop a torn last line."""
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder ``parent/<prefix>XXXX.tmp`` with the umask's permissions (mkdtemp's are 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    os.chmod(tmp, dir_mode())
    return tmp


def temp_file(parent: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """(fd, path) of a new temporary file in ``parent`` with the umask's permissions."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
    os.fchmod(fd, file_mode())
    return fd, Path(name)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file, read a MiB at a time."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, or ValueError when it holds more than ``limit`` (read no further)."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than the {limit:,}-byte limit for this kind of file")
    return data


def printable(name: str | os.PathLike) -> str:
    """A file name as it can always be printed: bytes that are not UTF-8 (kept by Python as
    lone surrogates, which any print or encode would crash on) shown as U+FFFD."""
    return os.fsencode(os.fspath(name)).decode("utf-8", "replace")
