import csv
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vitlab import TrainConfig, ViT, load_checkpoint
from vitlab.config import default_config
from vitlab.errors import ConfigError
from vitlab.evaluate import evaluate_checkpoint
from vitlab.report import read_metrics
from vitlab.train import TrainingInterrupted, lr_at, train
from tests.datafiles import metrics_but_the_clock


def _results(run: Path) -> dict[str, tuple[float, float]]:
    rows = re.findall(r"^\| (Train|Val|Test) \| ([\d.]+) \| ([\d.]+) \|$", (run / "results.md").read_text(), re.M)
    return {name: (float(loss), float(acc)) for name, loss, acc in rows}


def test_default_run_reaches_90_percent_and_writes_its_report(digits_run):
    assert re.fullmatch(r"digits-\d{8}-\d{6}", digits_run.name)
    results = _results(digits_run)
    assert set(results) == {"Train", "Val", "Test"}
    assert results["Test"][1] >= 0.90, results
    for ckpt in ("best", "last"):
        assert (digits_run / ckpt / "model.safetensors").is_file() and (digits_run / ckpt / "config.yaml").is_file()
    with open(digits_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == default_config().epochs and rows[-1]["epoch"] == str(default_config().epochs)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert max(float(r["val_acc"]) for r in rows) == pytest.approx(results["Val"][1], abs=5e-5)
    for png in ("loss_curve.png", "predictions.png"):
        with Image.open(digits_run / png) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 200
    cfg = TrainConfig.load_yaml(digits_run / "config.yaml")
    assert cfg == default_config().replace(out=cfg.out)


def test_saved_checkpoint_reproduces_the_reported_results(digits_run):
    from vitlab.checkpoint import read_meta

    reported = _results(digits_run)
    # The kernels the run computed its table with (its manifest): under "auto" the evaluation
    # may time another, and in bf16 one image in a thousand can then change its answer.
    kernels = read_meta(digits_run / "best").extra["kernels"]
    again = evaluate_checkpoint(digits_run / "best", device="cpu", precision=kernels["precision"],
                                attention=kernels["attention"])
    for split in ("Train", "Val", "Test"):
        assert again[split][1] == pytest.approx(reported[split][1], abs=1e-4)
        assert again[split][0] == pytest.approx(reported[split][0], abs=1e-3)


def test_load_save_load_gives_identical_predictions(digits_run, tmp_path):
    from vitlab.checkpoint import read_meta, save_checkpoint

    model, cfg = load_checkpoint(digits_run / "best")
    assert isinstance(model, ViT) and cfg.num_classes == 10 and not model.training
    x = torch.randn(16, cfg.channels, cfg.image_size, cfg.image_size)
    with torch.inference_mode():
        first = model(x)
    meta = read_meta(digits_run / "best")
    save_checkpoint(tmp_path / "copy", model, meta, (digits_run / "best" / "config.yaml").read_text())
    model2, cfg2 = load_checkpoint(tmp_path / "copy")
    with torch.inference_mode():
        assert torch.equal(first, model2(x))
    assert cfg2 == cfg


def test_learning_rate_schedule():
    lrs = [lr_at(s, 100, 10, 1e-3, 1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warmup
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)
    assert lr_at(55, 100, 10, 1e-3, 0.0) == pytest.approx(0.5e-3)


def _tiny(tmp_path: Path, name: str) -> TrainConfig:
    # Dropout, crop and flip make the run depend on every RNG the resume must restore.
    return TrainConfig(out=str(tmp_path), name=name, epochs=3, depth=2, dim=32, heads=2, mlp_dim=64, batch_size=128, patch_size=2,
                       dropout=0.1, hflip=0.5, log_every=3, checkpoint_every=4, device="cpu")  # bit-exact: the CPU


@pytest.mark.parametrize("stop_after", [5, 10])  # mid-epoch, and exactly at the end of epoch 1
def test_resume_is_bit_exact(tmp_path, stop_after):
    log = lambda s: None  # noqa: E731
    straight = train(_tiny(tmp_path, "straight"), progress=False, log=log)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(_tiny(tmp_path, "resumed"), progress=False, log=log, stop_when=lambda state: state.step >= stop_after)
    with pytest.raises(ConfigError, match="continues a run with its saved config; drop --epochs "):
        train(resume=tmp_path / "resumed", progress=False, log=log, changes={"epochs": 9})
    # where and how it reports may change (what the CLI passes for --log-every and the like)
    resumed = train(resume=tmp_path / "resumed", progress=False, log=log, changes={"log_every": 2})
    a = load_file(str(straight.run_dir / "last" / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_but_the_clock(straight.run_dir) == metrics_but_the_clock(resumed.run_dir)
    assert straight.results == resumed.results


def test_max_steps_ends_the_schedule_in_a_partial_epoch_and_resumes_bit_exact(tmp_path):
    log = lambda s: None  # noqa: E731
    straight = train(_tiny(tmp_path, "straight").replace(max_steps=25), progress=False, log=log)
    rows = read_metrics(straight.run_dir / "metrics.csv")
    per_epoch = rows[0]["step"]
    assert 25 % per_epoch and [r["step"] for r in rows] == [per_epoch * (i + 1) for i in range(len(rows) - 1)] + [25]
    warmup = round(2 * per_epoch)  # the default two epochs
    assert rows[-1]["lr"] == pytest.approx(lr_at(24, 25, warmup, 2e-3, 1e-5), rel=1e-6)  # the schedule ends at 25
    assert rows[-1]["lr"] != pytest.approx(lr_at(24, len(rows) * per_epoch, warmup, 2e-3, 1e-5), rel=1e-3)
    saved = default_config().load_yaml(straight.run_dir / "config.yaml")
    assert saved.max_steps == 25 and saved.epochs == len(rows) == math.ceil(25 / per_epoch)
    with pytest.raises(TrainingInterrupted):  # stopped inside the partial epoch
        train(_tiny(tmp_path, "resumed").replace(max_steps=25), progress=False, log=log,
              stop_when=lambda state: state.step >= 25 - per_epoch // 2)
    resumed = train(resume=tmp_path / "resumed", progress=False, log=log)
    a = load_file(str(straight.run_dir / "last" / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_but_the_clock(straight.run_dir) == metrics_but_the_clock(resumed.run_dir)


def test_existing_run_folder_is_never_overwritten(tmp_path):
    cfg = _tiny(tmp_path, "same").replace(epochs=1)
    train(cfg, progress=False, log=lambda s: None)
    marker = tmp_path / "same" / "metrics.csv"
    before = marker.read_text()
    from vitlab.errors import ConfigError
    with pytest.raises(ConfigError, match="already exists"):
        train(cfg, progress=False, log=lambda s: None)
    assert marker.read_text() == before
    train(cfg, overwrite=True, progress=False, log=lambda s: None)
    assert math.isfinite(float(marker.read_text().splitlines()[1].split(",")[3]))


def test_metrics_rows_are_appended_and_a_torn_last_line_is_dropped(tmp_path):
    from vitlab.report import append_metrics

    path, rows = tmp_path / "metrics.csv", []
    for e in range(1, 4):
        rows.append({"epoch": e, "step": 10 * e, "lr": 1e-3 / e, "train_loss": 1.0 / e, "train_acc": 0.5,
                     "val_loss": 0.9 / e, "val_acc": 0.6, "val_ema_loss": 0.8, "val_ema_acc": 0.7})
        before = path.read_bytes() if path.exists() else b""
        append_metrics(path, rows)
        assert path.read_bytes().startswith(before)  # appended, not rewritten
    assert read_metrics(path) == rows
    with open(path, "a") as f:
        f.write("4,40,0.00025,0.2")  # killed while the fourth row was being written
    assert read_metrics(path) == rows
