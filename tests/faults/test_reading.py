"""Every file vitlab reads is opened as a regular file and bounded in size, depth, type and
value before it is used; images are decoded faithfully or refused; what vitlab draws is
bounded whatever is asked.

Built for real: named pipes in place of each kind of file vitlab reads (under a watchdog that
ends the test process after 60 s, so a read that blocks fails instead of hanging the suite), a 6 KB config of nested brackets, a
kernel cache holding a number no float can hold, run folders whose metrics and results
are hostile or damaged, 16-bit, 32-bit, float and transparent images, an ONNX model for
4-channel images, and an explanation request for thousands of images.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vitlab import autotune, report
from vitlab.checkpoint import CheckpointMeta, save_checkpoint
from vitlab.cli import cli
from vitlab.compare import PLOTTED, read_results
from vitlab.config import default_config
from vitlab.errors import DataError
from vitlab.fileio import NotRegularFile, read_bounded, read_json
from vitlab.images import TRANSPARENCY_NOTE, ImageRefused, read_image
from vitlab.model import ViT, ViTConfig
from vitlab.train import train

TINY = dict(epochs=2, depth=1, dim=32, heads=2, mlp_dim=32, tensorboard=False)
QUIET = dict(progress=False, log=lambda s: None)
DEEP_YAML = "a: " + "[" * 3000 + "]" * 3000 + "\n"  # 6 KB


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return train(default_config().replace(out=str(out), name="r", **TINY), **QUIET).run_dir


def _copy(run: Path, tmp_path: Path, name: str = "r") -> Path:
    dst = tmp_path / "runs" / name
    shutil.copytree(run, dst)
    return dst


def _fifo(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.mkfifo(path)


# ------------------------------------------------------------- named pipes

def test_the_file_readers_refuse_a_named_pipe_at_once(tmp_path):
    _fifo(tmp_path / "p")
    for read in (lambda p: read_bounded(p, 100), lambda p: read_json(p, 100), lambda p: read_image(p, "L", 8),
                 lambda p: report.read_metrics(p)):
        with pytest.raises((NotRegularFile, DataError), match="named pipe"):
            read(tmp_path / "p")
    assert autotune.read_cache(tmp_path / "p") == {}  # a cache is only a hint: ignored


@pytest.fixture
def watchdog():
    """In-process commands that must not block: a test that would hang fails after 60 s instead."""
    import faulthandler

    faulthandler.dump_traceback_later(60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize("where", ["model.json", "model.safetensors", "config.yaml", "kernel cache", "image"])
def test_predict_with_a_named_pipe_in_place_of_a_file_never_hangs(finished, tmp_path, watchdog, monkeypatch, where):
    run = _copy(finished, tmp_path)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("VITLAB_CACHE_DIR", str(cache))
    target = {"model.json": run / "best" / "model.json", "model.safetensors": run / "best" / "model.safetensors",
              "config.yaml": run / "best" / "config.yaml", "kernel cache": cache / "kernels.json", "image": image}[where]
    _fifo(target)
    done = CliRunner().invoke(cli, ["predict", str(run / "best"), str(image), "--precision", "auto"])
    assert "Traceback" not in done.output, done.output
    if where == "kernel cache":  # ignored, and replaced by a real cache
        assert done.exit_code == 0 and (cache / "kernels.json").is_file() and not target.is_fifo()
    else:
        assert done.exit_code == 1 and ("named pipe" in done.output or "missing" in done.output), done.output


def test_an_onnx_file_that_is_a_named_pipe_is_refused(tmp_path, watchdog):
    pytest.importorskip("onnxruntime")
    _fifo(tmp_path / "m.onnx")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    done = CliRunner().invoke(cli, ["predict", str(tmp_path / "m.onnx"), str(tmp_path / "x.png")])
    assert done.exit_code == 1 and "named pipe" in done.output and "Traceback" not in done.output, done.output


@pytest.mark.parametrize("where", ["metrics.csv", "results.json", "config.yaml"])
def test_compare_and_resume_with_a_named_pipe_in_a_run_folder(finished, tmp_path, watchdog, where):
    run = _copy(finished, tmp_path)
    _fifo(run / where)
    done = CliRunner().invoke(cli, ["compare", str(run), "--out", str(tmp_path / "c")])
    assert "Traceback" not in done.output, done.output
    if where == "results.json":  # the run is still shown, as unfinished
        assert done.exit_code == 0 and "not a vitlab results file" in done.output and "unfinished" in done.output
    else:
        assert done.exit_code == 1 and "named pipe" in done.output and "no vitlab run folders" in done.output
    if where != "results.json":  # (a finished run would only write its report again)
        resumed = CliRunner().invoke(cli, ["train", "--resume", str(run), "--quiet"])
        assert resumed.exit_code == 1 and "Traceback" not in resumed.output, resumed.output


# ------------------------------------------------------- nesting and numbers

def test_a_config_of_nested_brackets_is_one_line_everywhere(finished, tmp_path):
    run = _copy(finished, tmp_path)
    (run / "config.yaml").write_text(DEEP_YAML)
    for args in (["compare", str(run), "--out", str(tmp_path / "c")], ["train", "--resume", str(run), "--quiet"],
                 ["train", "--out", str(run.parent), "--name", "r", "--quiet", "--epochs", "1"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "Traceback" not in result.output and "RecursionError" not in result.output, \
            (args, result.output)
        assert "nested too deeply" in result.output.splitlines()[0], result.output


def test_a_kernel_cache_entry_no_float_can_hold_is_ignored_and_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE_DIR", str(tmp_path))
    cfg = ViTConfig(depth=1, dim=32, heads=2, mlp_dim=32, patch_size=2, image_size=8, channels=1, num_classes=10)
    device = torch.device("cpu")
    first = autotune.choose(cfg, device, batch=16, training=False, attention="auto", precision="fp32")
    path = tmp_path / autotune.CACHE_FILE
    cache = json.loads(path.read_text())
    for entry in cache["entries"].values():
        entry["ms"] = {k: 10**400 for k in entry["ms"]}  # valid JSON: an integer of 401 digits
    path.write_text(json.dumps(cache))
    again = autotune.choose(cfg, device, batch=16, training=False, attention="auto", precision="fp32")
    assert again.attention == first.attention and again.source == "cached" and again.ms == {}
    result = CliRunner().invoke(cli, ["presets"])  # any command that starts still starts
    assert result.exit_code == 0


# ---------------------------------------------------------- vitlab compare

HEADER = "epoch,step,lr,train_loss,train_acc,val_loss,val_acc\n"


@pytest.mark.parametrize("metrics, results, note", [
    (HEADER + "inf,10,0.1,1,0.5,1,0.5\n", None, "epoch is inf"),
    ("epoch,step,lr\n1,2,0.1\n", None, "not a vitlab metrics file"),
    (HEADER + "1,10,0.1,1,0.5,1,0.5\n2,20,0.1,1,0.5,1,nan\n", None, "val_acc is nan"),
    (HEADER + "1,10,0.1,1,0.5,1,7\n", None, "val_acc 7.0 is not an accuracy"),
    (None, {"best_val_acc": "high", "results": {"Test": {"accuracy": 0.5}}}, "best_val_acc is 'high'"),
    (None, {"train_seconds": [1, 2], "results": {"Test": {"accuracy": 0.5}}}, "train_seconds is '[1, 2]'"),
    (None, {"results": {"Test": {"accuracy": float("nan")}}}, "holds NaN"),
    (None, {"results": "all good"}, None),
], ids=["infinite epoch", "missing columns", "nan accuracy", "accuracy 7", "string best", "list seconds",
        "nan test", "results a string"])
def test_compare_on_hostile_run_folders_says_what_and_goes_on(finished, tmp_path, metrics, results, note):
    good = _copy(finished, tmp_path, "good")
    bad = _copy(finished, tmp_path, "bad")
    if metrics is not None:
        (bad / "metrics.csv").write_text(metrics)
    if results is not None:
        (bad / "results.json").write_text(json.dumps(results))
    result = CliRunner().invoke(cli, ["compare", str(good), str(bad), "--out", str(tmp_path / "c")])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    if note:
        assert note in result.output, result.output
    table = result.output.split("| run |")[1]
    assert "nan" not in table.lower().replace("unfinished", "") and "| good |" in table


def test_compare_refuses_an_oversized_metrics_file_without_reading_it(finished, tmp_path):
    bad = _copy(finished, tmp_path, "big")
    row = "1,10,0.1,1.0,0.5,1.0,0.5\n"
    with open(bad / "metrics.csv", "w") as f:
        f.write(HEADER)
        f.write(row * (18_000_000 // len(row)))  # 18 MB: took about 1 GB to read before
    result = CliRunner().invoke(cli, ["compare", str(bad), "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "limit" in result.output and "Traceback" not in result.output, result.output


def test_compare_draws_at_most_a_bounded_number_of_runs(finished, tmp_path):
    for i in range(PLOTTED + 5):
        _copy(finished, tmp_path, f"r{i:02d}")
    result = CliRunner().invoke(cli, ["compare", str(tmp_path / "runs" / "*"), "--out", str(tmp_path / "c")])
    assert result.exit_code == 0 and result.output.count("| r") == 1 + PLOTTED + 5  # the header, and every run
    with Image.open(tmp_path / "c" / "comparison.png") as im:
        assert im.width * im.height < 4_000_000


@settings(max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2000), st.booleans())
def test_metrics_and_results_readers_on_random_bytes(tmp_path_factory, raw, header):
    folder = tmp_path_factory.mktemp("m")
    (folder / "metrics.csv").write_bytes((HEADER.encode() if header else b"") + raw)
    (folder / "results.json").write_bytes(raw)
    try:
        rows = report.read_metrics(folder / "metrics.csv", [])
        assert all(0 <= r["val_acc"] <= 1 and r["epoch"] == i + 1 for i, r in enumerate(rows))
    except DataError as e:
        assert "\n" not in str(e)
    try:
        checked = read_results(folder / "results.json")
        assert all(v is None or np.isfinite(v) for v in checked.values())
    except (OSError, ValueError):
        pass


# ------------------------------------------------------------------ images

def _png(path: Path, array: np.ndarray, color_type: int, bits: int) -> Path:
    """A PNG written byte by byte (Pillow cannot write 16-bit colour)."""
    h, w = array.shape[:2]
    raw = b"".join(b"\0" + array[y].astype(">u2" if bits == 16 else "u1").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


RAMP16 = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))


@pytest.mark.parametrize("kind", ["16-bit grey PNG", "16-bit colour PNG", "16-bit PGM", "16-bit TIFF", "float TIFF"])
def test_deep_images_are_scaled_not_clipped(tmp_path, kind):
    path = tmp_path / "im"
    if kind == "16-bit grey PNG":
        _png(path, RAMP16, 0, 16)
    elif kind == "16-bit colour PNG":
        _png(path, np.stack([RAMP16] * 3, -1), 2, 16)
    elif kind == "16-bit PGM":
        path.write_bytes(b"P5\n32 32\n65535\n" + RAMP16.astype(">u2").tobytes())
    elif kind == "16-bit TIFF":
        Image.fromarray(RAMP16).save(path, format="TIFF")
    else:
        Image.fromarray((RAMP16 / 65535).astype(np.float32)).save(path, format="TIFF")
    grey = read_image(path, "L", 32)
    want = np.round(np.linspace(0, 255, 32)).astype(int)
    assert np.abs(grey[0].astype(int) - want).max() <= 1, grey[0]  # a full-range ramp stays one (was 240-255, or black)
    assert (np.diff(grey[0].astype(int)) >= 0).all()


@pytest.mark.parametrize("kind, message", [
    ("float outside 0..1", "float samples outside 0..1"),
    ("32-bit integer", "32-bit integer samples"),
])
def test_samples_with_no_8_bit_meaning_are_refused(tmp_path, kind, message):
    path = tmp_path / "im.tif"
    if kind.startswith("float"):
        Image.fromarray(np.linspace(-5, 300, 64, dtype=np.float32).reshape(8, 8)).save(path)
    else:
        Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8) * 10**7).save(path)
    with pytest.raises(ImageRefused, match=message):
        read_image(path, "RGB", 8)


def test_transparency_is_composited_and_said(finished, tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :4, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    notes: list[str] = []
    grey = read_image(tmp_path / "half.png", "L", 8, notes)
    assert notes == [TRANSPARENCY_NOTE] and (grey[:, :4] == 200).all() and (grey[:, 4:] == 0).all()
    Image.fromarray(rgba[..., :3]).save(tmp_path / "opaque.png")
    notes.clear()
    read_image(tmp_path / "opaque.png", "L", 8, notes)
    assert notes == []
    result = CliRunner().invoke(cli, ["predict", str(finished / "best"), str(tmp_path / "half.png"),
                                      str(tmp_path / "opaque.png")])
    assert result.exit_code == 0 and result.output.count(TRANSPARENCY_NOTE) == 1, result.output


def test_a_folder_dataset_says_how_many_images_had_transparency(tmp_path):
    from vitlab.data import load_image_tree

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            rgba = np.full((8, 8, 4), 255, np.uint8)
            rgba[..., 3] = 0 if i == 0 else 255
            Image.fromarray(rgba, "RGBA").save(tmp_path / cls / f"{i}.png")
    said = []
    images, classes = load_image_tree(tmp_path, 8, warn=said.append)
    assert len(images) == 6 and said == [f"note: 2 image(s) under {tmp_path}: {TRANSPARENCY_NOTE}"]


def test_a_model_of_4_channels_is_refused_once_for_image_files(tmp_path):
    pytest.importorskip("onnxruntime")
    cfg = ViTConfig(depth=1, dim=32, heads=2, mlp_dim=32, patch_size=2, image_size=8, channels=4, num_classes=3)
    meta = CheckpointMeta(cfg, ["a", "b", "c"], (0.5,) * 4, (0.25,) * 4, "digits")
    ckpt = save_checkpoint(tmp_path / "best", ViT(cfg), meta, default_config().to_yaml())
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    for model in (ckpt, tmp_path / "best.onnx"):
        if model.suffix == ".onnx":
            assert CliRunner().invoke(cli, ["export", str(ckpt), "--format", "onnx"]).exit_code == 0
        result = CliRunner().invoke(cli, ["predict", str(model), str(tmp_path / "x.png"), str(tmp_path / "x.png")])
        assert result.exit_code == 1 and "takes 4-channel images; image files give 1 (grey) or 3 (colour)" in \
            result.output and "cannot read as an image" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


# ------------------------------------------------------ what vitlab draws

def test_explain_split_is_bounded_and_paged(finished, tmp_path):
    from vitlab.explain_figures import MAX_COUNT, PAGE

    result = CliRunner().invoke(cli, ["explain", str(finished / "best"), "--split", "train", "--count",
                                      str(MAX_COUNT + 1), "--out", str(tmp_path)])
    assert result.exit_code == 1 and f"limit of {MAX_COUNT:,} images" in result.output, result.output
    result = CliRunner().invoke(cli, ["explain", str(finished / "best"), "--split", "train", "--count",
                                      str(2 * PAGE + 10), "--out", str(tmp_path), "--method", "attention"])
    assert result.exit_code == 0, result.output
    pages = sorted(tmp_path.glob("train-*.png"))
    assert len(pages) >= 3  # 138 images are at least 3 pages of 64
    for page in pages:
        with Image.open(page) as im:
            assert im.width * im.height < 6_000_000, (page.name, im.size)
