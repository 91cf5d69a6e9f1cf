"""Shared fixtures. Real datasets come from ``../shared/data`` (beside the repository),
unpacked once per test session into the official on-disk layouts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vitlab.cli import cli

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VITLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> Path:
    """A data dir holding mnist/, fashion-mnist/, cifar-10-batches-py/ and cifar-100-python/."""
    unpack = SHARED_DATA / "unpack.py"
    if not unpack.is_file():
        pytest.skip(f"real datasets not available ({unpack} missing)")
    out = tmp_path_factory.mktemp("real-data")
    subprocess.run([sys.executable, str(unpack), "--out", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """`vitlab train` with no options (the embedded default), run once for the session."""
    out = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(cli, ["train", "--out", str(out), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = out.iterdir()
    return run
