"""Data-parallel training under torchrun (real processes, gloo on CPU): the same run as one
process, stopped and resumed on another number of processes, refused when the batch does
not split."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.datafiles import metrics_but_the_clock

# fp32, no dropout: the only differences between 1 and 2 processes are the order of float
# sums (batch-size-dependent kernels, the gradient all-reduce). Measured on digits, 2 and 3 epochs:
# per-epoch metrics agree to 7e-8, final weights to 3.6e-4 (benchmarks/distributed.py, RESULTS.md).
METRIC_TOL = 2e-4
WEIGHT_TOL = 2e-3

ARGS = ["--epochs", "2", "--depth", "2", "--dim", "32", "--heads", "2", "--mlp-dim", "32", "--batch-size", "64",
        "--precision", "fp32", "--quiet", "--log-every", "5", "--checkpoint-every", "5", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "VITLAB_DIST_TIMEOUT": "120"}


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "vitlab", "train", *args]


def single(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitlab", "train", "--threads", "1", *args]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def assert_same_run(a: Path, b: Path) -> None:
    ma, mb = metrics_but_the_clock(a), metrics_but_the_clock(b)
    assert len(ma) == len(mb) == 2
    for ra, rb in zip(ma, mb):
        for key in ra:
            assert abs(ra[key] - rb[key]) <= METRIC_TOL * max(1.0, abs(ra[key])), (key, ra, rb)
    wa, wb = load_file(str(a / "last" / "model.safetensors")), load_file(str(b / "last" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= WEIGHT_TOL, worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same config trained by one process and by two under torchrun."""
    out = tmp_path_factory.mktemp("dist")
    one = run(single("--out", str(out), "--name", "one", *ARGS))
    assert one.returncode == 0, one.stderr
    two = run(torchrun(2, "--out", str(out), "--name", "two", *ARGS))
    assert two.returncode == 0, two.stderr + two.stdout
    return {"one": out / "one", "two": out / "two", "out": out, "log": two.stdout + two.stderr}


def test_two_processes_train_the_same_run_as_one(runs):
    assert_same_run(runs["one"], runs["two"])
    assert "x 2 processes" in runs["log"]  # the run says how it computes
    assert sorted(p.name for p in runs["two"].iterdir()) == sorted(p.name for p in runs["one"].iterdir())
    results = (runs["two"] / "results.md").read_text()
    assert "x 2 processes" in results and "| Test |" in results
    keys = load_file(str(runs["two"] / "best" / "model.safetensors")).keys()
    assert not any(k.startswith("module.") for k in keys)  # the unwrapped model is saved


@pytest.mark.parametrize("resume_with", [1, 2])
def test_killed_job_resumes_on_one_or_two_processes(runs, tmp_path, resume_with):
    proc = subprocess.Popen(torchrun(2, "--out", str(tmp_path), "--name", "r", *ARGS), env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "r" / "last" / "state.pt").exists():  # mid-epoch 1: checkpoints every 5 steps
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank at once
    proc.wait()
    if (tmp_path / "r" / "results.md").exists():
        pytest.skip("the job finished before the kill (an idle machine trains 2 tiny epochs in a second)")
    if resume_with == 1:
        resumed = run(single("--resume", str(tmp_path / "r")))
    else:  # as on two machines: the run folder is rank 0's only (rank 1 runs where a relative "r" is not)
        elsewhere = tmp_path / "rank1"
        elsewhere.mkdir()
        script = tmp_path / "in_rank_folder.py"
        script.write_text("import os\nos.chdir(os.environ['CWD_' + os.environ['RANK']])\nfrom vitlab.cli import main\nmain()\n")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
               "train", "--resume", "r"]
        resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                 env={**ENV, "CWD_0": str(tmp_path), "CWD_1": str(elsewhere)})
        assert not list(elsewhere.iterdir())  # rank 1 wrote nothing
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert_same_run(runs["two"], tmp_path / "r")


def nproc(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitlab", "train", "--nproc", "2", *args]


def test_sigterm_to_an_nproc_job_saves_and_says_once_how_to_resume(tmp_path):
    proc = subprocess.Popen(nproc("--out", str(tmp_path), "--name", "t", *ARGS, "--epochs", "50"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "t" / "last" / "state.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which asks each rank to stop
    out, err = proc.communicate(timeout=120)
    text = out + err
    assert proc.returncode == 130, text
    assert text.count(f"continue with: vitlab train --resume {tmp_path / 't'}") == 1, text  # rank 0 speaks for all
    assert text.count("interrupted:") == 1 and "Traceback" not in text, text
    from vitlab.checkpoint import read_meta

    read_meta(tmp_path / "t" / "last")  # intact: every checksum verifies


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through /proc")
def test_a_rank_that_dies_ends_the_job_in_one_line_with_its_checkpoint_intact(tmp_path):
    proc = subprocess.Popen(nproc("--out", str(tmp_path), "--name", "d", *ARGS, "--epochs", "50"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "d" / "last" / "state.pt").exists() or len(_children(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        ranks = _children(proc.pid)
        os.kill(ranks[-1], signal.SIGKILL)  # one rank dies; the launcher and the other rank live on
        t = time.monotonic()
        out, err = proc.communicate(timeout=90)  # the launcher stops the survivor; VITLAB_DIST_TIMEOUT bounds a collective
        assert proc.returncode == 1 and time.monotonic() - t < 90
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = err.strip().splitlines()  # (stdout has the run's header line)
    assert "Traceback" not in out + err and len(lines) == 1, out + err
    assert "of 2 was killed by SIGKILL" in lines[0] and f"continue with: vitlab train --resume {tmp_path / 'd'}" in lines[0]
    from vitlab.checkpoint import read_meta

    read_meta(tmp_path / "d" / "last")  # still intact: every checksum verifies


def test_a_batch_the_processes_cannot_share_is_refused_before_any_work(tmp_path):
    result = run(torchrun(2, "--out", str(tmp_path), *ARGS, "--batch-size", "63"))
    assert result.returncode != 0
    assert "--batch-size 63 (the global batch) is not divisible by the 2 processes" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args", [["--batch-size", "63"], ["--heads", "5"], ["--resume", "nowhere"]])
def test_nproc_checks_the_whole_config_before_any_process_starts(tmp_path, monkeypatch, args):
    from click.testing import CliRunner

    from vitlab import distributed
    from vitlab.cli import cli

    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("a process was started"))
    result = CliRunner().invoke(cli, ["train", "--nproc", "2", "--out", str(tmp_path), "--quiet", *args])
    assert result.exit_code == 1 and "Traceback" not in result.output and len(result.output.splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "http"}, "MASTER_PORT='http' is not a port"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "70000"}, "is not a port"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29999", "VITLAB_DIST_TIMEOUT": "-5"},
     "VITLAB_DIST_TIMEOUT='-5' must be a number of seconds"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29999", "VITLAB_DIST_TIMEOUT": "nan"},
     "VITLAB_DIST_TIMEOUT='nan'"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, "do not describe a process of a job"),
    ({"RANK": "zero", "WORLD_SIZE": "2"}, "RANK='zero' is not a process number"),
], ids=["no-addr", "port-word", "port-big", "timeout-negative", "timeout-nan", "rank-past-world", "rank-word"])
def test_a_bad_torchrun_environment_is_one_line(tmp_path, monkeypatch, env, message):
    from click.testing import CliRunner

    from vitlab.cli import cli

    for key in ("MASTER_ADDR", "MASTER_PORT", "VITLAB_DIST_TIMEOUT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(cli, ["train", "--out", str(tmp_path), "--quiet", "--epochs", "1"])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.splitlines()) == 1 and not list(tmp_path.iterdir())


def test_nproc_starts_torchrun_itself(tmp_path, runs):
    result = run([sys.executable, "-m", "vitlab", "train", "--nproc", "2", "--out", str(tmp_path), "--name", "n", *ARGS])
    assert result.returncode == 0, result.stderr
    assert_same_run(runs["two"], tmp_path / "n")


def test_without_torchrun_one_plain_process_trains(tmp_path, monkeypatch):
    """No torchrun environment: no process group, no DDP wrapper, one process (torch itself
    imports torch.distributed, so there is no import to save; vitlab adds no work)."""
    from vitlab.config import default_config
    from vitlab.train import train

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    seen = []
    cfg = default_config().replace(out=str(tmp_path), epochs=1, depth=1, dim=32, heads=2, mlp_dim=32)
    result = train(cfg, progress=False, log=seen.append, stop_when=lambda s: seen.append(torch.distributed.is_initialized()))
    assert result.epochs == 1 and True not in seen and not any("processes" in str(m) for m in seen)
