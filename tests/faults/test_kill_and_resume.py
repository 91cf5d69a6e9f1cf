"""Real processes killed with real signals, then resumed: the result must be the run
that was never interrupted, bit for bit (CPU, fixed seed), whatever draws random numbers
(dropout, stochastic depth, mixing, augmentations) and whether progress is shown or not:
the run never interrupted is quiet, the killed and resumed ones show their progress."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.datafiles import metrics_but_the_clock


# Long enough (about 160 steps) that a random kill lands mid-run; checkpoints every 7 steps.
ARGS = ["--epochs", "3", "--depth", "2", "--dim", "48", "--heads", "2", "--mlp-dim", "96", "--batch-size", "24",
        "--dropout", "0.1", "--drop-path", "0.1", "--hflip", "0.5", "--checkpoint-every", "7", "--log-every", "5",
        "--device", "cpu"]  # bit-exact resume is promised on the CPU (README: what a GPU promises)
# (every other element that draws random numbers: tests/faults/test_resume_every_recipe.py, in one process)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The same command, never interrupted (same process setup, so the same arithmetic)."""
    out = tmp_path_factory.mktemp("straight")
    proc = _start(out, quiet=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out / "run"


def _start(out: Path, quiet: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vitlab.cli", "train", "--out", str(out), "--name", "run", *(["--quiet"] if quiet else []),
           "--threads", "1", *ARGS]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _resume(run: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vitlab.cli", "train", "--resume", str(run), "--threads", "1"]  # progress shown
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _assert_same_run(a: Path, b: Path) -> None:
    for ckpt in ("last", "best"):
        wa, wb = load_file(str(a / ckpt / "model.safetensors")), load_file(str(b / ckpt / "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), ckpt
    assert metrics_but_the_clock(a) == metrics_but_the_clock(b)


@pytest.mark.parametrize("seed", [1, 2])  # two moments (a third cost 25 s of the suite and found nothing new)
def test_sigkill_at_a_random_moment_then_resume(tmp_path, uninterrupted, seed):
    proc = _start(tmp_path)
    _wait_for(tmp_path / "run" / "last", proc)
    time.sleep(random.Random(seed).uniform(0.0, 2.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _resume(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(uninterrupted, tmp_path / "run")
    assert not list((tmp_path / "run").glob(".*.tmp")), "temporary files left behind"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_and_exit_cleanly(tmp_path, uninterrupted, sig):
    proc = _start(tmp_path)
    _wait_for(tmp_path / "run" / "last", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, err
    assert "interrupted:" in err and f"vitlab train --resume {tmp_path / 'run'}" in err and "Traceback" not in err
    resumed = _resume(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(uninterrupted, tmp_path / "run")


def test_damaged_last_checkpoint_falls_back_to_previous(tmp_path, uninterrupted):
    proc = _start(tmp_path)
    _wait_for(tmp_path / "run" / "last.prev", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    weights = tmp_path / "run" / "last" / "model.safetensors"
    if weights.exists():
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    resumed = _resume(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr
    if weights.exists():
        assert "missing or damaged; resuming from last.prev" in resumed.stderr + resumed.stdout
    _assert_same_run(uninterrupted, tmp_path / "run")


def test_killed_between_the_two_renames_of_a_save(tmp_path, uninterrupted):
    """Recreate the state a SIGKILL leaves inside save_checkpoint: the old folder already
    moved to .prev, the new one complete but still under its temporary name."""
    import shutil

    proc = _start(tmp_path)
    _wait_for(tmp_path / "run" / "best", proc)  # after epoch 1: both last/ and best/ exist
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = tmp_path / "run"
    for name in ("last", "best"):
        if (run / f"{name}.prev").exists():
            shutil.rmtree(run / f"{name}.prev")
        os.replace(run / name, run / f".{name}.x1y2.tmp")  # the newest save, never renamed into place
    (run / ".metrics.csv.zz.tmp").write_text("half a line")
    resumed = _resume(run)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(uninterrupted, run)
    assert not list(run.glob(".*.tmp")), "temporary files left behind"
