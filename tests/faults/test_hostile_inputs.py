"""Hostile and unlucky inputs, built for real: archives with links and escaping members,
a PostScript file named .png with a Ghostscript on PATH, decompression bombs, a second
process on a live run, edited configs and manifests, oversized headers, a server that
trickles, names that are not UTF-8. Each case shows the one-line error and that nothing
outside the intended folder changed.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
import http.server
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vitlab import data as vdata
from vitlab.checkpoint import load_checkpoint
from vitlab.cli import cli
from vitlab.config import TrainConfig, default_config
from vitlab.data import RemoteFile, download_file, extract_members, load_dataset, read_idx
from vitlab.errors import CheckpointError, ConfigError, DataError
from vitlab.train import train

from ..datafiles import forge_manifest, idx_bytes, trust_archive, write_cifar10, write_idx_dataset

TINY = dict(epochs=2, depth=1, dim=32, heads=2, mlp_dim=32)
QUIET = dict(progress=False, log=lambda s: None)


def cli_run(*args: str, env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`python -m vitlab ...` as a real process (so stdout encoding, PATH and signals are real)."""
    return subprocess.run([sys.executable, "-m", "vitlab", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw)


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under ``root`` with its content (files) or kind: to show nothing changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = p.read_bytes() if p.is_file() and not p.is_symlink() else ("link" if p.is_symlink() else "dir")
    return out


def rehash(folder: Path) -> None:
    """Forge a checkpoint manifest so the checksums match: what an attacker editing the folder does."""
    forge_manifest(folder)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return train(default_config().replace(out=str(out), name="r", **TINY), **QUIET).run_dir


# ------------------------------------------------------------- 1. archives

def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, body in members:
            tar.addfile(info, io.BytesIO(body) if body is not None else None)
    return path


def _file(name: str, body: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    return info, body


def _special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _cifar_members(tmp_path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    src = tmp_path / "src"
    write_cifar10(src)
    folder = src / "cifar-10-batches-py"
    return [_file(f"cifar-10-batches-py/{p.name}", p.read_bytes()) for p in sorted(folder.iterdir())]


@pytest.mark.parametrize("case", ["symlink", "hardlink", "device", "fifo"])
def test_archive_with_links_or_devices_is_refused(tmp_path, monkeypatch, case):
    """Even an archive whose checksum passes (as if the published MD5 matched a crafted file)
    writes no link, device or FIFO: the archive is refused and nothing is left behind."""
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "secret").write_text("outside")
    members = [m for m in _cifar_members(tmp_path) if not m[0].name.endswith("data_batch_1")]
    kind = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE,
            "fifo": tarfile.FIFOTYPE}[case]
    members.insert(0, _special("cifar-10-batches-py/data_batch_1", kind, str(tmp_path / "secret")))
    archive = _tar(data / "cifar-10-python.tar.gz", members)
    trust_archive(monkeypatch, "cifar10", archive)
    with pytest.raises(DataError, match=r"data_batch_1 is not a regular file .*refusing the archive"):
        load_dataset("cifar10", data, download=False)
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-python.tar.gz"]
    assert (tmp_path / "secret").read_text() == "outside"


def test_archive_members_that_escape_are_never_written(tmp_path, monkeypatch):
    """'..', absolute and nested paths beside the real files: none is written, anywhere;
    the dataset itself extracts (output paths come from vitlab's list, not the archive)."""
    data = tmp_path / "data"
    data.mkdir()
    evil = [_file("../escaped-1", b"x"), _file("/tmp/vitlab-escaped-2", b"x"),
            _file("cifar-10-batches-py/../../escaped-3", b"x"), _file("cifar-10-batches-py/sub/escaped-4", b"x"),
            _file("cifar-10-batches-py/run.sh", b"#!/bin/sh\n"), _special("cifar-10-batches-py/link", tarfile.SYMTYPE, "/etc")]
    archive = _tar(data / "cifar-10-python.tar.gz", evil + _cifar_members(tmp_path))
    trust_archive(monkeypatch, "cifar10", archive)
    before = snapshot(tmp_path.parent)
    d = load_dataset("cifar10", data, val_size=0, download=False)
    assert len(d.train) == 60
    assert sorted(p.name for p in (data / "cifar-10-batches-py").iterdir()) == sorted(vdata.CIFAR_FILES["cifar10"][1])
    assert not Path("/tmp/vitlab-escaped-2").exists()
    added = set(snapshot(tmp_path.parent)) - set(before)
    assert all(a.startswith(f"{tmp_path.name}/data/cifar-10-batches-py") for a in added), added
    assert all(stat.S_ISREG(p.lstat().st_mode) for p in (data / "cifar-10-batches-py").iterdir())


def test_archive_found_on_disk_is_checked_before_extraction(tmp_path):
    """An archive under the official name but with other content is refused by name, unread."""
    members = _cifar_members(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    archive = _tar(data / "cifar-10-python.tar.gz", members)
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz: md5 [0-9a-f]{32} is not the published "
                                         r"c58f30108f718f92721af3b95e74349a .*refusing to extract"):
        load_dataset("cifar10", data, download=False)
    assert sorted(p.name for p in data.iterdir()) == [archive.name]


class _Zeros(io.RawIOBase):
    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def test_archive_bomb_is_refused_by_the_byte_cap(tmp_path):
    """A 300 KiB archive holding 300 MiB of zeros as data_batch_1: refused from the member
    header, before a byte is written (the cap does not depend on tarfile's filters)."""
    big = 300 << 20
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = big
        tar.addfile(info, io.BufferedReader(_Zeros(big), 1 << 20))
    assert archive.stat().st_size < 2 << 20
    out = tmp_path / "out"
    out.mkdir()
    t = time.perf_counter()
    with pytest.raises(DataError, match="more than the 268,435,456-byte limit"):
        extract_members(archive, out, "cifar-10-batches-py", ("data_batch_1",))
    assert time.perf_counter() - t < 5
    assert [p.stat().st_size for p in (out / "cifar-10-batches-py").iterdir()] == []


_EXTRACT = """
import sys
from pathlib import Path
from vitlab import data as vdata
from vitlab.data import RemoteFile, load_dataset, md5sum
archive = Path(sys.argv[1]) / "cifar-10-python.tar.gz"
vdata.REMOTE["cifar10"] = [RemoteFile(archive.name, md5sum(archive), ("http://127.0.0.1:9/x",), archive.stat().st_size)]
d = load_dataset("cifar10", sys.argv[1], val_size=0, download=False)
print(len(d.train), int(d.train.images.sum()))
"""


def test_two_processes_extracting_at_once_both_get_one_whole_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _tar(data / "cifar-10-python.tar.gz", _cifar_members(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", _EXTRACT, str(data)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert len({o for o, _ in outs}) == 1  # the same images in every process
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]  # no temporaries


# ------------------------------------------------------------- 2. --overwrite

def test_overwrite_refuses_a_folder_that_is_not_a_vitlab_run(tmp_path):
    victim = tmp_path / "thesis"
    (victim / "chapters").mkdir(parents=True)
    (victim / "thesis.tex").write_text("years of work")
    (victim / "chapters" / "one.tex").write_text("more")
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, ["train", "--out", str(tmp_path), "--name", "thesis", "--overwrite", "--quiet",
                                      "--epochs", "1"])
    assert result.exit_code == 1
    assert "is not a vitlab run folder (it holds chapters/, thesis.tex, and no run config of vitlab's)" in result.output, result.output
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_vitlab_config_beside_other_files(tmp_path):
    """A config.yaml alone does not make a run: with the user's own files beside it, refused."""
    folder = tmp_path / "mine"
    folder.mkdir()
    default_config().save_yaml(folder / "config.yaml")
    (folder / "notes.md").write_text("keep me")
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, ["train", "--out", str(tmp_path), "--name", "mine", "--overwrite", "--quiet"])
    assert result.exit_code == 1 and "not a vitlab run folder" in result.output
    assert snapshot(tmp_path) == before


def test_overwrite_never_follows_a_symlink(tmp_path, small_run):
    link = tmp_path / "r"
    link.symlink_to(small_run)
    before = snapshot(small_run)
    result = CliRunner().invoke(cli, ["train", "--out", str(tmp_path), "--name", "r", "--overwrite", "--quiet"])
    assert result.exit_code == 1 and "is a symbolic link" in result.output
    assert snapshot(small_run) == before and link.is_symlink()


# ------------------------------------------------------------------ 3. images

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 8 8
0 0 moveto 8 8 lineto stroke
showpage
"""


@pytest.fixture
def fake_ghostscript(tmp_path):
    """A `gs` first on PATH that records that it ran: what an EPS file would start."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gs-ran"
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    gs.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, marker


def test_postscript_named_png_never_starts_ghostscript(tmp_path, fake_ghostscript, small_run):
    env, marker = fake_ghostscript
    image = tmp_path / "cat.png"
    image.write_bytes(EPS)
    # The hostile file is real: plain Pillow, asked to decode it, starts the program.
    probe = subprocess.run([sys.executable, "-c", f"from PIL import Image; Image.open({str(image)!r}).load()"],
                           capture_output=True, env={**os.environ, **env})
    assert marker.exists(), probe.stderr
    marker.unlink()
    result = cli_run("predict", str(small_run / "best"), str(image), env=env)
    assert result.returncode == 1 and "cat.png: error: cannot read as an image (not a PNG, JPEG" in result.stderr
    assert not marker.exists() and "Traceback" not in result.stderr
    # the folder dataset skips it the same way
    for cls in ("a", "b"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        (tmp_path / "tree" / cls / "evil.jpg").write_bytes(EPS)
        from PIL import Image
        for i in range(3):
            Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(tmp_path / "tree" / cls / f"{i}.png")
    code = (f"from vitlab.data import load_dataset; d = load_dataset('folder', {str(tmp_path / 'tree')!r}, "
            f"image_size=8, val_size=0, warn=print); print(len(d.train) + len(d.test))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("6") and "skipped 2 unreadable" in out.stdout and "evil.jpg" in out.stdout
    assert not marker.exists()


def _png_header(width: int, height: int) -> bytes:
    """A real PNG that declares width x height pixels and holds almost none."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [8_000, 30_000])  # above vitlab's limit; above Pillow's own error threshold
def test_decompression_bomb_is_refused_before_decoding(tmp_path, small_run, side):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(side, side))
    t = time.perf_counter()
    result = CliRunner().invoke(cli, ["predict", str(small_run / "best"), str(bomb)])
    assert result.exit_code == 1 and "bomb.png: error: refused:" in result.output
    assert "over the limit of 50,000,000 pixels" in result.output
    assert time.perf_counter() - t < 10


# ------------------------------------------------------- 4. one process per run

def _start_training(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vitlab", "train", "--out", str(out), "--name", "live", "--quiet", "--threads", "1",
           "--epochs", "300", "--depth", "1", "--dim", "32", "--heads", "2", "--mlp-dim", "32", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_live_run_cannot_be_resumed_or_overwritten_by_a_second_process(tmp_path):
    proc = _start_training(tmp_path)
    try:
        _wait_for(tmp_path / "live" / "last", proc)
        resume = cli_run("train", "--resume", str(tmp_path / "live"))
        assert resume.returncode == 1 and f"is in use by process {proc.pid}" in resume.stderr, resume.stderr
        over = cli_run("train", "--out", str(tmp_path), "--name", "live", "--overwrite", "--quiet")
        assert over.returncode == 1 and f"in use by process {proc.pid}" in over.stderr
        assert proc.poll() is None  # the live run went on undisturbed
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the kernel released the lock with the process: the folder can be locked (and so resumed) again
    from vitlab.rundir import RunLock

    RunLock(tmp_path / "live").acquire().release()


# ----------------------------------------------------- 5. resume checks what it resumes

def _stopped_run(tmp_path: Path, **changes) -> Path:
    cfg = default_config().replace(out=str(tmp_path), name="s", **{**TINY, "epochs": 3}, **changes)
    from vitlab.errors import TrainingInterrupted
    with pytest.raises(TrainingInterrupted):
        train(cfg, stop_when=lambda state: state.step >= 5, **QUIET)
    return tmp_path / "s"


def test_resume_refuses_an_edited_config(tmp_path):
    run = _stopped_run(tmp_path)
    text = (run / "config.yaml").read_text().replace("epochs: 3", "epochs: 9")
    (run / "config.yaml").write_text(text)
    result = CliRunner().invoke(cli, ["train", "--resume", str(run), "--quiet"])
    assert result.exit_code == 1 and "differs from the checksummed copy in last/ in epochs (9 vs 3)" in result.output


def test_resume_refuses_other_data(tmp_path):
    write_idx_dataset(tmp_path / "d" / "mnist", n_train=60, n_test=20, seed=0)
    run = _stopped_run(tmp_path, dataset="mnist", data_dir=str(tmp_path / "d"), val_size=10, patch_size=7, batch_size=10)
    write_idx_dataset(tmp_path / "d" / "mnist", n_train=60, n_test=20, seed=1)  # same shapes, other images and labels
    result = CliRunner().invoke(cli, ["train", "--resume", str(run), "--quiet"])
    assert result.exit_code == 1 and "the data is not what this run started on" in result.output
    assert "labels (different content)" in result.output and "images (different content)" in result.output


@pytest.mark.parametrize("forgery, message", [
    ({"foo": 1}, "not a training state of this run (KeyError"),
    ("device", "this run trained on cuda; its random streams cannot continue on cpu: resume with --device cuda"),
    ([1, 2, 3], "not a vitlab training state (a list"),
])
def test_resume_refuses_a_foreign_or_other_device_state(tmp_path, forgery, message):
    run = _stopped_run(tmp_path)
    state_path = run / "last" / "state.pt"
    if forgery == "device":  # what a run started on a GPU leaves: a CUDA generator state
        forgery = torch.load(state_path, weights_only=True)
        forgery.update(device_type="cuda", aug_generator=torch.zeros(16, dtype=torch.uint8))
    torch.save(forgery, state_path)
    rehash(run / "last")
    result = CliRunner().invoke(cli, ["train", "--resume", str(run), "--quiet"])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output


# ------------------------------------------------- 6. manifests and configs are bounded

@pytest.mark.parametrize("edit, message", [
    (lambda m: m["model"].update(dim=1_000_000), "--dim must be an integer from 1 to 4096"),
    (lambda m: m["model"].update(depth=3), "weights do not fit this model's architecture"),
    (lambda m: m.update(classes=m["classes"][:3]), "'classes' must list num_classes = 10 names"),
    (lambda m: m.update(classes=["x" * 10_000] * 10), "each class name must be a string of 1 to 200"),
    (lambda m: m.update(mean="zero"), "'mean' and 'std' must be 1 finite numbers each"),
    (lambda m: m["model"].update(heads=True), "bad value True for heads: expected an integer"),
])
def test_manifest_is_checked_before_any_model_is_allocated(small_run, tmp_path, monkeypatch, edit, message):
    import shutil

    ckpt = tmp_path / "best"
    shutil.copytree(small_run / "best", ckpt)
    forge_manifest(ckpt, edit)
    import vitlab.checkpoint as vck

    real, allocated = vck.ViT, []

    def watched(*a, **k):  # shapes may be computed on the meta device; nothing else may be built
        if torch.get_default_device().type != "meta":
            allocated.append(a)
        return real(*a, **k)

    monkeypatch.setattr(vck, "ViT", watched)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_checkpoint(ckpt)
    assert not allocated


def test_weights_header_that_claims_exabytes_is_refused(small_run, tmp_path):
    import shutil

    ckpt = tmp_path / "best"
    shutil.copytree(small_run / "best", ckpt)
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    rehash(ckpt)
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read weights \(header of"):
        load_checkpoint(ckpt)


def test_config_files_are_bounded_and_have_no_aliases(tmp_path):
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    (tmp_path / "laughs.yaml").write_text(laughs)
    with pytest.raises(ConfigError, match="aliases .* are not allowed"):
        TrainConfig.load_yaml(tmp_path / "laughs.yaml")
    (tmp_path / "big.yaml").write_text("dataset: digits\n" + "# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="larger than the 1,048,576-byte limit"):
        TrainConfig.load_yaml(tmp_path / "big.yaml")


def test_evaluate_never_creates_or_downloads_into_a_path_from_a_checkpoint(small_run, tmp_path):
    import shutil

    ckpt = tmp_path / "best"
    shutil.copytree(small_run / "best", ckpt)
    planted = tmp_path / "planted" / "deep"
    cfg = TrainConfig.load_yaml(ckpt / "config.yaml").replace(dataset="cifar10", data_dir=str(planted), download=True)
    cfg.save_yaml(ckpt / "config.yaml")
    rehash(ckpt)
    result = CliRunner().invoke(cli, ["evaluate", str(ckpt)])
    assert result.exit_code == 1 and "does not exist here; pass --data-dir" in result.output
    result = CliRunner().invoke(cli, ["evaluate", str(ckpt), "--download"])
    assert result.exit_code == 1 and "--download needs --data-dir" in result.output
    assert not (tmp_path / "planted").exists()


# ---------------------------------------------------------- 7. memory is bounded

def test_idx_header_that_claims_terabytes_is_refused_before_allocation(tmp_path):
    write_idx_dataset(tmp_path / "mnist")
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (60000, 100000, 100000))
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(1000)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: the header says \(60000, 100000, 100000\) = "
                                         r"600,000,000,000,000 bytes of data, over the 1,073,741,824-byte limit"):
        load_dataset("mnist", tmp_path, download=False)


def test_idx_gzip_bomb_is_read_no_further_than_its_header_says(tmp_path):
    """10 images of 28x28 announced, then a gigabyte of zeros in a 1 MB file: refused after
    reading one byte past the announced data, in well under a second."""
    header = idx_bytes(np.zeros((10, 28, 28), np.uint8), 2051)
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = comp.compress(header) + b"".join(comp.compress(bytes(1 << 20)) for _ in range(1024)) + comp.flush()
    path = tmp_path / "bomb-idx3-ubyte.gz"
    path.write_bytes(body)
    t = time.perf_counter()
    with pytest.raises(DataError, match=r"bomb-idx3-ubyte.gz: header says \(10, 28, 28\) = 7,840 bytes of data, "
                                         r"file has more than 7,840"):
        read_idx(path, 2051)
    assert time.perf_counter() - t < 1.0


def test_folder_that_will_not_fit_in_memory_is_refused_before_decoding(tmp_path):
    """Enough 1-pixel PNGs that, at --image-size 512, the dataset outgrows this machine's memory."""
    from vitlab.data import available_memory

    free = available_memory()
    per_image = 2 * 3 * 512 * 512
    count = int(free / per_image * 1.3) + 1
    if count > 80_000:
        pytest.skip(f"this machine has {free / 2**30:.0f} GiB available; the test would need {count:,} files")
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(count // 2 + 1):
            (tmp_path / cls / f"{i}.png").write_bytes(buf.getvalue())
    t = time.perf_counter()
    with pytest.raises(DataError, match=r"images at 3x512x512 need about [\d.]+ GiB of memory and [\d.]+ GiB is available"):
        load_dataset("folder", tmp_path, image_size=512)
    assert time.perf_counter() - t < 30


def test_image_size_has_an_upper_bound():
    with pytest.raises(ConfigError, match="--image-size must be an integer from 1 to 512"):
        default_config().replace(image_size=100_000).validate()


# ------------------------------------------- 8. files that parse but are wrong fail at load

@pytest.mark.parametrize("case, message", [
    ("zero_images", "the header says the file holds 0 images"),
    ("overflow", "over the 1,073,741,824-byte limit"),
])
def test_idx_files_that_parse_but_are_wrong(tmp_path, case, message):
    write_idx_dataset(tmp_path / "mnist")
    dims = (0, 28, 28) if case == "zero_images" else (2**32 - 1, 2**32 - 1, 2**32 - 1)
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header))
    out = tmp_path / "runs"
    result = CliRunner().invoke(cli, ["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-download",
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 1 and "train-images-idx3-ubyte.gz" in result.output and message in result.output
    assert not out.exists()  # no run folder for data that fails to load


@pytest.mark.parametrize("labels, message", [
    ([0.5] * 12, "must hold whole class indices, found float64"),
    ([float("nan")] * 12, "must hold whole class indices, found float64"),
    ([True] * 12, "must hold whole class indices, found bool"),
    (["1"] * 12, "must hold whole class indices, found <U1"),
])
def test_cifar_labels_that_are_not_class_indices(tmp_path, labels, message):
    import pickle

    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(pickle.dumps({b"data": np.zeros((12, 3072), np.uint8), b"labels": labels}, protocol=2))
    with pytest.raises(DataError, match=f"data_batch_2: 'labels' {message}"):
        load_dataset("cifar10", tmp_path, download=False)


def test_cifar_batch_with_no_images(tmp_path):
    import pickle

    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="test_batch: holds 0 images"):
        load_dataset("cifar10", tmp_path, download=False)


# ------------------------------------------------------------------ 9. downloads

class _Server(http.server.BaseHTTPRequestHandler):
    body = b"z" * 50_000

    def do_GET(self):
        self.send_response(200)
        if self.path == "/trickle":
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            for i in range(len(self.body)):  # a byte every 50 ms: each read is quick, the whole is not
                try:
                    self.wfile.write(self.body[i: i + 1])
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.05)
        elif self.path == "/announces-more":
            self.send_header("Content-Length", str(10 * len(self.body)))
            self.end_headers()
        elif self.path == "/sends-more":  # no Content-Length: bytes until the connection closes
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(self.body)
            except OSError:
                pass
        self.close_connection = True

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.mark.parametrize("path, message", [
    ("/trickle", "not done within 1 s"),
    ("/announces-more", "announces 500,000 bytes; the file has 50,000"),
    ("/sends-more", "sent more than the file's 50,000 bytes"),
])
def test_downloads_are_bounded_in_time_and_size(tmp_path, server, path, message):
    import hashlib

    remote = RemoteFile("f.bin", hashlib.md5(_Server.body).hexdigest(), (server + path,), len(_Server.body))
    t = time.perf_counter()
    with pytest.raises(DataError, match=message):
        download_file(remote, tmp_path, attempts=1, timeout=5, deadline=1.0)
    assert time.perf_counter() - t < 10
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ 10. the end of a run

def test_report_falls_back_to_last_when_best_is_damaged(tmp_path):
    messages = []

    def log(line: str) -> None:
        messages.append(line)
        if line.startswith("epoch   2/2"):  # after the final checkpoint, before the report: best/ gets damaged
            weights = tmp_path / "r" / "best" / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:-10])

    result = train(default_config().replace(out=str(tmp_path), name="r", **TINY), progress=False, log=log)
    assert any("best/model.safetensors: damaged" in m and "the report uses" in m and m.endswith("last instead")
               for m in messages), messages
    assert "the table uses last/" in (result.run_dir / "results.md").read_text()


def test_a_finished_run_leaves_no_crash_safety_copies(small_run):
    assert sorted(p.name for p in small_run.iterdir()) == [".lock", "attention.png", "best", "config.yaml",
                                                            "confusion.png", "last", "loss_curve.png", "metrics.csv",
                                                            "predictions.png", "results.json", "results.md", "tb"]


def test_killed_before_its_first_checkpoint_restarts_cleanly(tmp_path):
    proc = _start_training(tmp_path, "--epochs", "1", "--batch-size", "8")
    _wait_for(tmp_path / "live" / "config.yaml", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "live" / "last").exists()
    resumed = cli_run("train", "--resume", str(tmp_path / "live"), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "no checkpoint yet" in resumed.stderr + resumed.stdout and (tmp_path / "live" / "results.md").is_file()
    # and a run killed that early may be replaced by a rerun with the same --name, without --overwrite
    proc = _start_training(tmp_path / "again", "--epochs", "1", "--batch-size", "8")
    _wait_for(tmp_path / "again" / "live" / "config.yaml", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "again"), "--name", "live", "--epochs", "1",
                                     "--depth", "1", "--dim", "32", "--heads", "2", "--mlp-dim", "32", "--quiet"])
    assert rerun.exit_code == 0, rerun.output


# --------------------------------------------------- 11. names, permissions

def test_names_that_are_not_utf8_never_crash_output(tmp_path):
    from PIL import Image

    root = os.fsencode(tmp_path / "tree")
    for cls in (b"caf\xe9", b"na\xefve"):  # Latin-1 bytes: not UTF-8
        os.makedirs(os.path.join(root, cls))
        for i in range(5):
            Image.new("RGB", (10, 10), (50 * i, 20, 0)).save(os.fsdecode(os.path.join(root, cls, b"%d.png" % i)))
        with open(os.path.join(root, cls, b"bro\xffken.png"), "wb") as f:
            f.write(b"not an image")
    result = cli_run("train", "--dataset", "folder", "--data-dir", str(tmp_path / "tree"), "--image-size", "8",
                     "--out", str(tmp_path / "runs"), "--name", "n", "--epochs", "1", "--depth", "1", "--dim", "32",
                     "--heads", "2", "--mlp-dim", "32", "--val-size", "2", env={"PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert "bro\ufffdken.png" in result.stdout + result.stderr and "Traceback" not in result.stderr
    classes = json.loads((tmp_path / "runs" / "n" / "best" / "model.json").read_text())["classes"]
    assert classes == ["caf\ufffd", "na\ufffdve"]


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    result = subprocess.run([sys.executable, "-m", "vitlab", "train", "--out", str(tmp_path), "--name", "p", "--epochs",
                             "1", "--depth", "1", "--dim", "32", "--heads", "2", "--mlp-dim", "32", "--quiet"],
                            capture_output=True, text=True, preexec_fn=lambda: os.umask(umask))
    assert result.returncode == 0, result.stderr
    paths = [tmp_path / "p", *(tmp_path / "p").rglob("*")]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert all(m == (dir_mode if (tmp_path / k).is_dir() else file_mode) for k, m in modes.items()), modes
