"""Shared fixtures. Real datasets come from ``../shared/data`` (beside the repository),
unpacked once per test session into the official on-disk layouts.

The suite runs in two pytest-xdist workers (pyproject's addopts) on the 2-core machine;
each worker, and every process a test starts, computes with one thread, so the two never
oversubscribe the cores (two processes that each use both run at a fraction of their
speed). Session fixtures that cost real training are built once, by whichever worker
asks first, under a file lock, and shared.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

# Kernel choices (vitlab.autotune) are cached per worker, never in the user's ~/.cache: within
# a worker, runs that a test compares time nothing twice and compute the same way.
os.environ["VITLAB_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"vitlab-cache-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
atexit.register(shutil.rmtree, os.environ["VITLAB_CACHE_DIR"], True)

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # for the subprocesses tests start
    import torch

    torch.set_num_threads(1)

from vitlab.cli import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VITLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


def _shared(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` once for the whole session, whichever xdist worker comes first."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder all workers share
    folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            result = build(folder)
            done.write_text(json.dumps(str(result)))
    return Path(json.loads(done.read_text()))


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> Path:
    """A data dir holding mnist/, fashion-mnist/, cifar-10-batches-py/ and cifar-100-python/."""
    unpack = SHARED_DATA / "unpack.py"
    if not unpack.is_file():
        pytest.skip(f"real datasets not available ({unpack} missing)")

    def build(out: Path) -> Path:
        subprocess.run([sys.executable, str(unpack), "--out", str(out)], check=True, capture_output=True)
        return out

    return _shared(tmp_path_factory, "real-data", build)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """`vitlab train` with no options (the embedded default), run once for the session."""
    def build(out: Path) -> Path:
        result = CliRunner().invoke(cli, ["train", "--out", str(out), "--quiet"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        (run,) = out.iterdir()
        return run

    return _shared(tmp_path_factory, "digits-run", build)
