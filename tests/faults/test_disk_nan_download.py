"""A full disk, a NaN loss, and a flaky download server."""

from __future__ import annotations

import errno
import hashlib
import http.server
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from vitlab import load_checkpoint
from vitlab import checkpoint as vckpt
from vitlab.cli import cli
from vitlab.config import default_config
from vitlab.data import RemoteFile, download_file
from vitlab.errors import DataError
from vitlab.train import NonFiniteLoss, train

TINY = ["--epochs", "3", "--depth", "1", "--dim", "32", "--heads", "2", "--mlp-dim", "32", "--quiet"]


# ---------------------------------------------------------------- full disk

def test_enospc_while_checkpointing_keeps_the_last_good_one(tmp_path, monkeypatch):
    real_save = torch.save  # state.pt is serialised with torch.save before it is written
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second 'last' checkpoint: the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(vckpt.torch, "save", failing_save)
    result = CliRunner().invoke(cli, ["train", "--out", str(tmp_path), "--name", "r", *TINY])
    assert result.exit_code == 1
    assert "No space left on device" in result.output and "disk is full" in result.output
    assert "Traceback" not in result.output
    model, _ = load_checkpoint(tmp_path / "r" / "last")  # the epoch-1 checkpoint is intact
    assert vckpt.read_meta(tmp_path / "r" / "last").extra["epoch"] == 1
    assert not list((tmp_path / "r").glob(".*.tmp")), "temporary files left behind"


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_really_full_disk(tiny_disk):
    result = CliRunner().invoke(cli, ["train", "--out", str(tiny_disk), "--name", "r", *TINY, "--dim", "128", "--mlp-dim", "256"])
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and "Traceback" not in result.output
    assert not list((tiny_disk / "r").glob(".*.tmp"))


def test_read_only_output(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro"))

    monkeypatch.setattr(Path, "mkdir", refuse)
    result = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "ro"), *TINY])
    assert result.exit_code == 1 and "Read-only file system" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------------- NaN

def _poison_loss_at(monkeypatch, bad_call: int | None) -> None:
    """The training loss becomes NaN at call ``bad_call`` (None: at every call)."""
    import vitlab.train as vtrain

    real = vtrain.F.cross_entropy
    calls = {"n": 0}

    def ce(logits, y, **kw):
        loss = real(logits, y, **kw)
        if kw.get("label_smoothing") is not None:  # training calls only
            calls["n"] += 1
            if bad_call is None or calls["n"] == bad_call:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(vtrain.F, "cross_entropy", ce)


def test_nan_loss_stops_and_names_the_step(tmp_path, monkeypatch):
    _poison_loss_at(monkeypatch, 30)  # epoch 2 of 22-step epochs
    cfg = default_config().replace(out=str(tmp_path), name="r", epochs=3, depth=1, dim=32, heads=2, mlp_dim=32,
                                checkpoint_every=4, log_every=50)
    with pytest.raises(NonFiniteLoss, match=r"at step 30 .*Last good checkpoint: .*last \(step 28\)"):
        train(cfg, progress=False, log=lambda s: None)
    model, _ = load_checkpoint(tmp_path / "r" / "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_loss_can_be_skipped(tmp_path, monkeypatch):
    _poison_loss_at(monkeypatch, 5)
    messages = []
    cfg = default_config().replace(out=str(tmp_path), name="r", epochs=2, depth=1, dim=32, heads=2, mlp_dim=32,
                                on_nonfinite="skip")
    result = train(cfg, progress=False, log=messages.append)
    assert sum("skipped the batch, learning rate now x0.5" in m for m in messages) == 1
    rows = [line.split(",") for line in (result.run_dir / "metrics.csv").read_text().splitlines()[1:]]
    steps_per_epoch = 1294 // cfg.batch_size  # digits: 1,294 training images
    assert [int(r[1]) for r in rows] == [steps_per_epoch - 1, 2 * steps_per_epoch - 1]  # one step skipped
    assert all(float(v) == float(v) for r in rows for v in r)  # no NaN anywhere
    model, _ = load_checkpoint(result.run_dir / "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_epoch_with_every_batch_skipped_stops_clearly(tmp_path, monkeypatch):
    """Every loss non-finite under --on-nonfinite skip: nothing was trained, so the run stops
    with one line (it used to divide by zero writing the epoch's row)."""
    _poison_loss_at(monkeypatch, None)
    cfg = default_config().replace(out=str(tmp_path), name="r", epochs=2, depth=1, dim=32, heads=2, mlp_dim=32,
                                   on_nonfinite="skip")
    with pytest.raises(NonFiniteLoss, match="every batch of epoch 1 had a non-finite loss and was skipped"):
        train(cfg, progress=False, log=lambda s: None)
    assert not (tmp_path / "r" / "metrics.csv").exists()


# ----------------------------------------------------------------- download

class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    """/good: the file; /wrong: other bytes; /truncated: promises the full length, sends half."""

    body = b"x" * 200_000

    def do_GET(self):
        data = {"/good": self.body, "/wrong": b"y" * len(self.body), "/truncated": self.body}.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if self.path == "/truncated" else data)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


MD5 = hashlib.md5(_FlakyHandler.body).hexdigest()
SIZE = len(_FlakyHandler.body)


@pytest.mark.parametrize("path, message", [("/wrong", "checksum mismatch"), ("/truncated", "could not download")])
def test_bad_downloads_are_refused(tmp_path, server, path, message):
    with pytest.raises(DataError, match=message):
        download_file(RemoteFile("f.bin", MD5, (server + path,), SIZE), tmp_path, attempts=2, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_falls_back_to_a_good_mirror(tmp_path, server):
    got = download_file(RemoteFile("f.bin", MD5, (server + "/truncated", server + "/wrong", server + "/good"), SIZE),
                        tmp_path)
    assert got.read_bytes() == _FlakyHandler.body and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def _fill(disk: Path) -> None:
    """Fill a tmpfs to the last byte."""
    try:
        with open(disk / "filler", "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC


def test_a_full_disk_for_commands_that_are_not_train_says_run_it_again(tiny_disk, tmp_path):
    run = tmp_path / "runs" / "r"
    assert CliRunner().invoke(cli, ["train", "--out", str(run.parent), "--name", "r", *TINY]).exit_code == 0
    _fill(tiny_disk)
    for args in (["compare", str(run), "--out", str(tiny_disk / "c")],
                 ["explain", str(run / "best"), "--split", "test", "--count", "4", "--out", str(tiny_disk / "e")]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "No space left on device" in result.output, (args, result.output)
        assert "run the command again" in result.output and "--resume" not in result.output, result.output
        assert "Traceback" not in result.output
