"""Downloads of dataset files: streamed to a temporary file, bounded in time and size, the
MD5 verified, and only then renamed into place (each mirror tried, a bad file never kept)."""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .fileio import file_digest, temp_file


@dataclass(frozen=True)
class RemoteFile:
    filename: str
    md5: str
    urls: tuple[str, ...]
    size: int  # bytes: a download that announces or sends more is cut off


def md5sum(path: Path) -> str:
    return file_digest(path, "md5")


def download_deadline(size: int) -> float:
    """Seconds one download attempt may take in all: a minute, plus the file at 50 kB/s."""
    return 60.0 + size / 50e3


def download_file(remote: RemoteFile, folder: Path, attempts: int = 2, timeout: float = 30.0,
                  deadline: float | None = None) -> Path:
    """Fetch ``remote`` into ``folder``: stream to a temporary file, verify the
    MD5, and only then rename it into place. A bad or interrupted download is
    retried (each mirror, ``attempts`` times) and never left under its final name.

    Bounded three ways: ``timeout`` seconds per read; ``deadline`` seconds per attempt
    (default :func:`download_deadline`), so a server that trickles a byte at a time
    cannot hold the run forever; and the file's known size, so a server that announces
    or sends more is cut off."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / remote.filename
    budget = download_deadline(remote.size) if deadline is None else deadline
    errors: list[str] = []
    for url in remote.urls:
        for _ in range(attempts):
            fd, tmp = temp_file(folder, f".{remote.filename}.", ".part")
            try:
                give_up = time.monotonic() + budget
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                    announced = int(resp.headers.get("Content-Length") or 0) or None
                    if announced is not None and announced != remote.size:
                        raise ValueError(f"the server announces {announced:,} bytes; the file has {remote.size:,}")
                    got = 0
                    with tqdm(total=remote.size, unit="B", unit_scale=True, desc=f"download {remote.filename}",
                              leave=False) as bar:
                        # read1: whatever has arrived (read(n) would wait for all n bytes of a trickle)
                        for chunk in iter(lambda: resp.read1(1 << 16), b""):
                            got += len(chunk)
                            if got > remote.size:
                                raise ValueError(f"sent more than the file's {remote.size:,} bytes")
                            if time.monotonic() > give_up:
                                raise TimeoutError(f"not done within {budget:.0f} s ({got:,} of {remote.size:,} bytes)")
                            out.write(chunk)
                            bar.update(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
                digest = md5sum(tmp)
                if digest != remote.md5:
                    errors.append(f"{url}: checksum mismatch (md5 {digest}, expected {remote.md5})")
                    continue
                os.replace(tmp, final)
                return final
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:  # e.g. IncompleteRead
                errors.append(f"{url}: {getattr(e, 'reason', e)}")
            finally:
                tmp.unlink(missing_ok=True)
    raise DataError(
        f"could not download {remote.filename} into {folder} ({'; '.join(errors[-3:])}). "
        f"Download it yourself from {remote.urls[0]} (md5 {remote.md5}) and put it in {folder}"
    )
