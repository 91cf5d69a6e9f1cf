"""Writing files so that a crash never leaves half of one, and reading untrusted ones with a bound.

Every file vitlab writes goes through :func:`atomic_write_bytes` (or a folder through
:func:`temp_dir` + rename): written under a temporary name beside its target, fsynced,
renamed into place. A rename replaces a link at the target's name, never what it points
to; the one file vitlab appends to (:func:`append_synced`) and the run lock are opened
without following links and refused when they have another name (a hard link).
Temporary files are created owner-only by ``tempfile``; they get the permissions the
user's umask gives any new file before they are renamed, so a run folder is as readable
as anything else the user creates. Their names carry the creating process and machine, so
that the temporaries of a process that was killed are removed by the next one to write
there (:func:`sweep_stale`).

Every file vitlab reads goes through :func:`open_regular` (or :func:`read_bounded`,
:func:`read_json`): a named pipe, a device or a folder in a file's place is refused before
a byte is read (opening a pipe for reading would wait forever for a writer), and a file
larger than its kind's limit is refused before it is read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once at import; os.umask can only be read by setting it
# POSIX flags (0 where the platform has none: Windows has no FIFOs to block on, and no O_NOFOLLOW)
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


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


class NotRegularFile(OSError):
    """A path vitlab would read or write is not a plain file of its own (a named pipe, a
    device, a folder; for writing, also a symbolic or hard link)."""

    def __init__(self, path: Path | str, what: str):
        super().__init__(errno.EINVAL, f"{printable(path)} {what}")
        self.what = what

    def __str__(self) -> str:
        return self.strerror


def write_synced(path: Path, data: bytes) -> None:
    """Plain write + fsync, to a new file (for files inside a temporary folder that is renamed as a whole)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, file_mode())
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def open_own(path: Path, flags: int) -> int:
    """A descriptor of ``path`` opened with ``flags`` (O_CREAT allowed) without following a
    link, checked to be a regular file with no other name: the files vitlab changes in place
    (the run lock, an appended log). Raises NotRegularFile otherwise, having changed nothing."""
    if not O_NOFOLLOW and Path(path).is_symlink():  # where the flag is missing: checked (not atomically)
        raise NotRegularFile(path, "is a symbolic link; vitlab never writes through a link")
    try:
        fd = os.open(path, flags | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK, file_mode())
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFile(path, "is a symbolic link; vitlab never writes through a link") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "has another name (a hard link)" if stat.S_ISREG(st.st_mode) else "is not a regular file"
        raise NotRegularFile(path, f"{what}; vitlab never writes to a file that is not its own")
    return fd


def append_synced(path: Path, data: bytes) -> None:
    """Append + fsync: for logs whose readers drop a torn last line. NotRegularFile when
    ``path`` is a link or not a regular file (nothing is written then)."""
    fd = open_own(path, os.O_WRONLY | os.O_APPEND)
    with os.fdopen(fd, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it (a link at
    ``path`` is replaced, never followed)."""
    path = Path(path)
    fd, tmp = temp_file(path.parent, f".{path.name}.", ".tmp")
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


def remove(path: Path) -> None:
    """Delete ``path``: a folder with what it holds, a file, or a link (the link itself,
    never what it points to); nothing when it does not exist."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)  # never follows the links inside
    elif path.is_symlink() or path.exists():
        path.unlink()


# ------------------------------------------------------------ temporaries

HOST = hashlib.sha256(socket.gethostname().encode(errors="replace")).hexdigest()[:8]


def owner_tag() -> str:
    """'<pid>@<host hash>': who made a temporary, so that another process can tell a dead one's."""
    return f"{os.getpid()}@{HOST}"


def _alive(pid: int) -> bool:
    if os.name != "posix":  # (Windows' os.kill(pid, 0) would send that process a Ctrl-C): never swept there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def sweep_stale(parent: Path, prefix: str, suffix: str) -> list[Path]:
    """Remove ``parent/<prefix><pid>@<host>.*<suffix>``: the temporaries of processes of this
    machine that are no longer running (killed while writing). A link is removed, never
    followed; anything of another machine or a live process is left alone. Returns what went."""
    pattern = re.compile(re.escape(prefix) + r"(\d{1,10})@([0-9a-f]{8})\.[^/]*" + re.escape(suffix))
    gone = []
    try:
        names = os.listdir(parent)
    except OSError:
        return gone
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or m.group(2) != HOST or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        path = Path(parent) / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            gone.append(path)
        except OSError:
            pass
    return gone


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder ``parent/<prefix><pid>@<host>.XXXX.tmp`` with the umask's permissions
    (mkdtemp's are 0700); stale ones of the same prefix are removed first."""
    sweep_stale(parent, prefix, ".tmp")
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}.", suffix=".tmp", dir=parent))
    os.chmod(tmp, dir_mode())
    return tmp


def temp_file(parent: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """(fd, path) of a new temporary file ``parent/<prefix><pid>@<host>.XXXX<suffix>`` with the
    umask's permissions; stale ones of the same prefix are removed first."""
    sweep_stale(parent, prefix, suffix)
    fd, name = tempfile.mkstemp(prefix=f"{prefix}{owner_tag()}.", suffix=suffix, dir=parent)
    os.fchmod(fd, file_mode())
    return fd, Path(name)


# ------------------------------------------------------------------ reading

def open_regular(path: Path, limit: int | None = None) -> BinaryIO:
    """``path`` opened for reading, after checking that it is a regular file (links are
    followed: a user may link a dataset) of at most ``limit`` bytes. A named pipe, device or
    folder is NotRegularFile (opened without blocking, so a pipe with no writer cannot hang
    the reader); an oversized file is ValueError, before anything is read."""
    fd = os.open(path, os.O_RDONLY | O_NONBLOCK | O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a named pipe" if stat.S_ISFIFO(st.st_mode) else \
                "a device or socket"
            raise NotRegularFile(path, f"is {kind}, not a regular file")
        if limit is not None and st.st_size > limit:
            raise ValueError(f"larger than the {limit:,}-byte limit for this kind of file ({st.st_size:,} bytes)")
        if O_NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a regular file, read a MiB at a time."""
    h = hashlib.new(algorithm)
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path``; ValueError when it holds more than ``limit``
    (read no further), NotRegularFile (an OSError) for a pipe, device or folder."""
    with open_regular(path, limit) as f:
        data = f.read(limit + 1)  # the file may have grown since fstat
    if len(data) > limit:
        raise ValueError(f"larger than the {limit:,}-byte limit for this kind of file")
    return data


def parse_json(raw: bytes | str) -> Any:
    """JSON with NaN and Infinity refused (no vitlab file holds them) and a file nested past
    the parser's recursion limit refused too: ValueError for anything that is not plain JSON."""
    def refuse(name: str):
        raise ValueError(f"holds {name}, which is not a JSON number")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            refuse(text)
        return value

    try:
        return json.loads(raw, parse_constant=refuse, parse_float=finite)  # bytes: UTF-8 checked; UnicodeDecodeError is a ValueError
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(path: Path, limit: int) -> Any:
    """A JSON file, read as :func:`read_bounded` and parsed as :func:`parse_json`: OSError or
    ValueError (naming the problem) for anything that is not a bounded, plain JSON file."""
    return parse_json(read_bounded(path, limit))


def printable(name: str | os.PathLike) -> str:
    """A file name as it can always be printed: bytes that are not UTF-8 (kept by Python as
    lone surrogates, which any print or encode would crash on) shown as U+FFFD."""
    return os.fsencode(os.fspath(name)).decode("utf-8", "replace")
