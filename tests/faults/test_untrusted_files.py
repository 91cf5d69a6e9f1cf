"""Nothing loaded from a file may run code; damaged files are refused by name."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from vitlab import TrainConfig, load_checkpoint
from vitlab.checkpoint import load_state, read_meta
from vitlab.cli import cli
from vitlab.config import default_config
from vitlab.errors import CheckpointError, ConfigError
from vitlab.train import train

from ..datafiles import forge_manifest

MARKER = Path("/tmp/vitlab-fault-payload-ran")


class Payload:
    """Unpickling this would create MARKER."""

    def __reduce__(self):
        return (Path.touch, (MARKER,))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cfg = default_config().replace(out=str(out), name="r", epochs=2, depth=1, dim=32, heads=2, mlp_dim=32)
    return train(cfg, progress=False, log=lambda s: None).run_dir


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "r"
    shutil.copytree(run, dst)
    return dst


def _rehash(folder: Path) -> None:
    """Forge the manifest so the checksums match: what an attacker who edits the folder would do."""
    forge_manifest(folder)


@pytest.fixture(autouse=True)
def _no_marker():
    MARKER.unlink(missing_ok=True)
    yield
    assert not MARKER.exists(), "a payload ran"


def test_malicious_state_pickle_is_refused_and_never_runs(run, tmp_path):
    r = _copy(run, tmp_path)
    torch.save({"optimizer": Payload()}, r / "last" / "state.pt")  # a real torch pickle with a __reduce__ payload
    _rehash(r / "last")
    with pytest.raises(CheckpointError, match=r"state.pt: cannot load training state"):
        load_state(r / "last")
    result = CliRunner().invoke(cli, ["train", "--resume", str(r)])
    assert result.exit_code == 1 and "state.pt" in result.output and "Traceback" not in result.output


def test_pickle_in_place_of_safetensors_is_refused(run, tmp_path):
    r = _copy(run, tmp_path)
    (r / "best" / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(r / "best")
    _rehash(r / "best")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read weights"):
        load_checkpoint(r / "best")


def test_yaml_with_python_tags_is_refused(tmp_path):
    evil = tmp_path / "config.yaml"
    evil.write_text(f"dataset: !!python/object/apply:pathlib.Path.touch ['{MARKER}']\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        TrainConfig.load_yaml(evil)


def test_unknown_or_bad_config_keys(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("dataset: digits\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        TrainConfig.load_yaml(path)
    path.write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="bad value 'many' for epochs"):
        TrainConfig.load_yaml(path)


def test_damaged_checkpoint_is_named(run, tmp_path):
    r = _copy(run, tmp_path)
    target = r / "best" / "model.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    result = CliRunner().invoke(cli, ["evaluate", str(r / "best")])
    assert result.exit_code == 1 and f"{target}: damaged (checksum mismatch)" in result.output
    (r / "last" / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.json: damaged"):
        read_meta(r / "last")


def test_checkpoint_from_another_architecture_or_dataset(run, tmp_path):
    from vitlab.checkpoint import load_weights
    from vitlab.model import ViT, ViTConfig

    other = ViT(ViTConfig(image_size=8, channels=1, num_classes=10, patch_size=2, depth=2, heads=2, dim=32, mlp_dim=32))
    with pytest.raises(CheckpointError, match="weights do not fit this model"):
        load_weights(run / "best", other)
    # Same architecture, but the config now points at a 100-class dataset.
    r = _copy(run, tmp_path)
    cfg = TrainConfig.load_yaml(r / "best" / "config.yaml").replace(dataset="cifar100", data_dir=str(tmp_path / "c100"))
    from ..datafiles import write_cifar100

    write_cifar100(tmp_path / "c100")
    (r / "best" / "config.yaml").write_text(__import__("yaml").safe_dump(cfg.to_dict()))
    _rehash(r / "best")
    result = CliRunner().invoke(cli, ["evaluate", str(r / "best")])
    assert result.exit_code == 1 and "trained for 10 classes" in result.output and "100 classes" in result.output


def test_predict_converts_odd_images_and_refuses_broken_ones(run, tmp_path):
    from PIL import Image

    Image.new("RGBA", (50, 30), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    Image.new("P", (8, 8)).save(tmp_path / "palette.gif")
    (tmp_path / "empty.png").write_bytes(b"")
    result = CliRunner().invoke(cli, ["predict", str(run / "best"), str(tmp_path / "rgba.png"),
                                      str(tmp_path / "palette.gif"), str(tmp_path / "empty.png"), str(tmp_path / "nope.png")])
    assert result.exit_code == 1
    assert "rgba.png: " in result.output and "palette.gif: " in result.output
    assert "empty.png: error: cannot read as an image" in result.output
    assert "nope.png: error: no such file" in result.output
