"""Starting from someone else's weights (vitlab.load_pretrained, `vitlab train --init-from`):
timm and transformers folders saved by those libraries' own functions, with random weights,
offline; each loads at its own size with the source's logits, adapts to other sizes as timm
adapts its models, and what cannot map is one line. Then a run started from weights, end to
end: layer-wise decay, frozen blocks, a few images per class, balanced class weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from vitlab import load_pretrained
from vitlab.cli import cli
from vitlab.errors import CheckpointError, ConfigError
from vitlab.model import resample_positions
from vitlab.pretrained import resample_patch

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory):
    import timm
    from timm.models import _hub

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10,
                              depth=2).eval()
    folder = tmp_path_factory.mktemp("timm")
    _hub.save_for_hf(model, str(folder), safe_serialization=True)  # timm's own hub layout
    return folder, model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=128, image_size=32, patch_size=4,
                                                num_labels=5)).eval()
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(str(folder))
    return folder, model


def test_each_source_loads_at_its_own_size_with_its_logits(timm_folder, hf_folder, digits_run):
    folder, timm_model = timm_folder
    ours, cfg = load_pretrained(folder)
    assert (cfg.depth, cfg.dim, cfg.heads, cfg.mlp_dim, cfg.patch_size, cfg.num_classes) == (2, 192, 3, 768, 4, 10)
    with torch.no_grad():
        assert _relative(timm_model(X), ours(X)) < 1e-5
    folder, hf_model = hf_folder
    ours, cfg = load_pretrained(folder)
    assert cfg.norm_eps == 1e-12 and cfg.num_classes == 5  # transformers' epsilon kept: the same function
    with torch.no_grad():
        assert _relative(hf_model(pixel_values=X).logits, ours(X)) < 1e-5
    from vitlab import load_checkpoint

    reference, _ = load_checkpoint(digits_run / "best", kernels=None)
    ours, cfg = load_pretrained(digits_run / "best")
    grey = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert _relative(reference(grey), ours(grey)) < 1e-5 and cfg == reference.cfg


def test_a_timm_vit_with_qk_norm_loads_with_its_logits_and_goes_back_to_timm(tmp_path):
    import timm
    from timm.models import _hub

    from vitlab.interop import to_timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=3,
                              depth=2, qk_norm=True).eval()
    for name, p in model.named_parameters():  # the norms' affine weights away from 1 and 0: they must be read
        if "q_norm" in name or "k_norm" in name:
            torch.nn.init.normal_(p, mean=1.0 if name.endswith("weight") else 0.0, std=0.5)
    _hub.save_for_hf(model, str(tmp_path), safe_serialization=True)
    ours, cfg = load_pretrained(tmp_path)
    assert cfg.qk_norm and cfg.depth == 2
    with torch.no_grad():
        assert _relative(model(X), ours(X)) < 1e-5
        assert _relative(model(X), to_timm(ours)(X)) < 1e-5


def test_a_bare_transformers_vit_needs_a_head_and_gets_a_new_one(tmp_path):
    from transformers import ViTConfig, ViTModel

    bare = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                              image_size=32, patch_size=4)).eval()
    bare.save_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="has no classification head: give num_classes"):
        load_pretrained(tmp_path)
    ours, cfg = load_pretrained(tmp_path, num_classes=7)
    with torch.no_grad():
        features = ours.forward_head(ours.forward_features(X), pre_logits=True)
        assert _relative(bare(pixel_values=X).last_hidden_state[:, 0], features) < 1e-5
        assert cfg.num_classes == 7 and torch.equal(ours(X), torch.zeros(4, 7))  # a new head starts at zero


def test_other_sizes_adapt_as_timm_does(hf_folder):
    folder, _ = hf_folder
    model, cfg = load_pretrained(folder, image_size=64, patch_size=8, num_classes=3, channels=1)
    assert (cfg.image_size, cfg.patch_size, cfg.num_classes, cfg.channels, cfg.grid) == (64, 8, 3, 1, 8)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)
    rgb, _ = load_pretrained(folder)
    # one channel from RGB weights: a grey image computes what it computed as three equal colours
    grey_model, _ = load_pretrained(folder, channels=1)
    grey = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert _relative(rgb(grey.repeat(1, 3, 1, 1)), grey_model(grey)) < 1e-5
    # 96-px images: the patch still tiles them, so it stays and the position grid grows (timm's rule)
    bigger, cfg = load_pretrained(folder, image_size=96)
    assert (cfg.patch_size, cfg.grid) == (4, 24) and bigger.pos_embed.shape == (1, 1 + 24 * 24, 64)
    assert torch.equal(bigger.patch_embed.proj.weight, rgb.patch_embed.proj.weight)
    # 30-px images: 4 does not tile them; the nearest patch that does (5), its kernel resampled
    odd, cfg = load_pretrained(folder, image_size=30)
    assert (cfg.patch_size, cfg.grid) == (5, 6) and odd.patch_embed.proj.weight.shape[-1] == 5
    # the same grid at another patch size: the positions stay, the kernel is resampled
    same_grid, cfg = load_pretrained(folder, image_size=64, patch_size=8)
    assert cfg.grid == 8 and torch.equal(same_grid.pos_embed, rgb.pos_embed)


def test_patch_resampling_keeps_what_the_projection_computes():
    """FlexiViT's rule: the new kernel applied to a bicubically enlarged patch gives what the old
    kernel gave on the patch (exactly, for enlarging: the resize keeps all information)."""
    w = torch.randn(16, 3, 4, 4, dtype=torch.float64)
    patch = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    big = F.interpolate(patch, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    w8 = resample_patch(w, 8)
    assert torch.allclose(F.conv2d(big, w8), F.conv2d(patch, w), atol=1e-8)
    assert torch.equal(resample_patch(w, 4), w)
    pos = torch.randn(1, 1 + 16, 8)
    assert torch.allclose(resample_positions(pos, 1, 4, 4), pos, atol=1e-6)  # the same grid: itself
    assert torch.equal(resample_positions(pos, 1, 4, 8)[:, 0], pos[:, 0])  # the class token's is kept
    smooth = torch.linspace(0, 1, 4).repeat(4, 1).reshape(1, 16, 1)
    up = resample_positions(smooth, 0, 4, 8).reshape(8, 8)
    assert torch.all(up[:, 1:] >= up[:, :-1] - 1e-6)  # an ordered field stays ordered


@pytest.mark.parametrize("config, files, message", [
    ({"architecture": "vit_base_r50_s16_224", "model_args": {}}, ["model.safetensors"], "hybrid"),
    ({"architecture": "convnext_tiny"}, ["model.safetensors"], "not a plain ViT vitlab knows"),
    ({"architecture": "vit_tiny_patch16_224", "model_args": {"reg_tokens": 4}}, ["model.safetensors"], "reg_tokens=4"),
    ({"architecture": "vit_tiny_patch16_224", "model_args": {"qk_norm": "yes"}}, ["model.safetensors"], "--qk-norm"),
    ({"architecture": "vit_tiny_patch16_224", "model_args": {"global_pool": "map"}}, ["model.safetensors"],
     "global_pool 'map'"),
    ({"model_type": "vit", "hidden_act": "relu"}, ["model.safetensors"], "hidden_act 'relu'"),
    ({"model_type": "swin"}, ["model.safetensors"], "not a timm model"),
    ({"model_type": "vit"}, ["pytorch_model.bin"], "only as a pickle \\(pytorch_model.bin\\).*save_file"),
    ({"architecture": "vit_tiny_patch16_224"}, [], "no model.safetensors"),
], ids=["hybrid", "convnext", "registers", "qk-norm-not-bool", "map-pool", "relu", "swin", "pickle", "no-weights"])
def test_what_cannot_map_is_one_line(tmp_path, config, files, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in files:
        (tmp_path / name).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # an empty safetensors file
    with pytest.raises((CheckpointError, ConfigError), match=message):
        load_pretrained(tmp_path)


def test_weights_that_do_not_fit_their_config_are_refused_before_reading(timm_folder, tmp_path):
    folder, _ = timm_folder
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["depth"] = 3  # a block the file does not have
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no tensor 'blocks.2.norm1.weight'"):
        load_pretrained(tmp_path)
    config["model_args"]["depth"] = 2
    config["model_args"]["embed_dim"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"cls_token is F32 \[1, 1, 192\], expected .* \[1, 1, 96\]"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()
    with pytest.raises(CheckpointError):
        load_pretrained(tmp_path)


def test_a_run_starts_from_weights_and_finetunes_a_few_images_per_class(digits_run, tmp_path):
    """--init-from with --layer-decay, --freeze-blocks, --train-per-class and --class-weights, end to
    end: the architecture is the source's, the frozen part stays the source's, the manifest and the
    report say where the weights came from, and the run resumes without the source folder."""
    source = tmp_path / "source"
    shutil.copytree(digits_run / "best", source)
    args = ["train", "--out", str(tmp_path), "--init-from", str(source), "--depth", "1", "--dim", "32", "--heads", "2",
            "--epochs", "3", "--layer-decay", "0.7", "--freeze-blocks", "1", "--train-per-class", "10",
            "--class-weights", "balanced", "--lr", "1e-3", "--batch-size", "16", "--quiet", "--checkpoint-every", "3", "--threads", "1"]
    runner = CliRunner()
    straight = runner.invoke(cli, [*args, "--name", "ft"])
    assert straight.exit_code == 0, straight.output
    run = tmp_path / "ft"
    src_cfg = json.loads((source / "model.json").read_text())["model"]
    manifest = json.loads((run / "best" / "model.json").read_text())
    assert manifest["model"]["depth"] == src_cfg["depth"] and manifest["model"]["dim"] == src_cfg["dim"]
    origin = manifest["extra"]["init_from"]
    import hashlib

    assert origin["kind"] == "vitlab" and origin["sha256"] == hashlib.sha256(
        (source / "model.safetensors").read_bytes()).hexdigest()
    before, after = load_file(str(source / "model.safetensors")), load_file(str(run / "last" / "model.safetensors"))
    frozen = [k for k in before if k.startswith(("patch_embed", "pos_embed", "cls_token", "blocks.0."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["head.weight"], after["head.weight"])
    results = json.loads((run / "results.json").read_text())
    assert results["init_from"]["sha256"] == origin["sha256"] and 0 <= results["balanced_test_acc"] <= 1
    assert len(results["per_class_recall"]) == 10
    report = (run / "results.md").read_text()
    assert "**started from**: the vitlab weights of" in report and "**balanced accuracy (test)**" in report
    assert results["results"]["Test"]["accuracy"] > 0.8  # a trained model fine-tuned on 100 images stays good

    # the same config stopped mid-run, and resumed once the source folder is gone: the same run
    from vitlab.config import TrainConfig
    from vitlab.errors import TrainingInterrupted
    from vitlab.train import train

    cfg = TrainConfig.load_yaml(run / "config.yaml").replace(name="r")
    assert cfg.init_from == str(source) and cfg.depth == src_cfg["depth"]  # config.yaml: the source's architecture
    with pytest.raises(TrainingInterrupted):
        train(cfg, progress=False, log=lambda s: None, stop_when=lambda s: s.step >= 4)
    shutil.rmtree(source)
    resumed = train(resume=tmp_path / "r", progress=False, log=lambda s: None)
    assert json.loads((resumed.run_dir / "results.json").read_text())["results"] == results["results"]


def test_layer_decay_scales_each_depth_and_freezing_leaves_the_optimizer_out(digits_run):
    from vitlab.train.setup import build_optimizer

    model, _ = load_pretrained(digits_run / "best")
    depth = model.cfg.depth
    groups = build_optimizer(model, 1e-3, 0.05, layer_decay=0.5).param_groups
    by_name = {id(p): n for n, p in model.named_parameters()}
    scale = {by_name[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["head.weight"] == 1 and scale["norm.weight"] == 1
    assert scale[f"blocks.{depth - 1}.mlp.fc1.weight"] == 0.5 and scale["blocks.0.attn.qkv.weight"] == 0.5 ** depth
    assert scale["pos_embed"] == scale["patch_embed.proj.weight"] == 0.5 ** (depth + 1)
    model.freeze(1)
    left = {by_name[id(p)] for g in build_optimizer(model, 1e-3, 0.05, kind="muon").param_groups for p in g["params"]}
    assert "blocks.0.attn.qkv.weight" not in left and "pos_embed" not in left and "blocks.1.attn.qkv.weight" in left


def test_a_run_takes_every_field_of_its_sources_function(tmp_path):
    """--init-from takes the source's whole function (QK-norm and the MLP's activation
    included: a ViT built without them could not hold the weights), not its regularisation."""
    from safetensors.torch import load_file

    from vitlab.config import default_config
    from vitlab.train import train

    tiny = dict(epochs=1, max_steps=2, tensorboard=False, threads=1, device="cpu", precision="fp32", ema_decay=0)
    source = train(default_config().replace(out=str(tmp_path), name="src", depth=2, dim=32, heads=2, mlp_dim=48,
                                            qk_norm=True, mlp_act="relu2", lsa=True, dropout=0.2, **tiny),
                   progress=False, log=lambda s: None).run_dir
    tuned = train(default_config().replace(out=str(tmp_path), name="tuned", init_from=str(source / "best"), **tiny),
                  progress=False, log=lambda s: None).run_dir
    config = (tuned / "config.yaml").read_text()
    for line in ("qk_norm: true", "mlp_act: relu2", "lsa: true", "depth: 2", "mlp_dim: 48", "dropout: 0.0"):
        assert f"\n{line}\n" in config, line
    start = load_file(str(source / "best" / "model.safetensors"))
    assert "blocks.0.attn.q_norm.weight" in load_file(str(tuned / "best" / "model.safetensors"))
    assert start["blocks.0.attn.q_norm.weight"].shape == (16,)


@pytest.mark.parametrize("weights", ["balanced", "none"])
def test_balanced_class_weights_select_by_balanced_accuracy(tmp_path, weights):
    """On imbalanced data, --class-weights balanced makes validation score (and pick best/ by)
    the mean per-class recall, the quantity it trains for; without it, plain accuracy."""
    import csv

    import numpy as np

    from vitlab.config import default_config
    from vitlab.data import DatasetSplits, load_dataset
    from vitlab.inference import load_predictor
    from vitlab.train import train

    digits = load_dataset("digits", tmp_path, val_size=0.2, download=False)

    def imbalanced(split):  # classes 5-9 keep one image in ten
        keep = (split.labels < 5) | (torch.arange(len(split)) % 10 == 0)
        return split.subset(keep.nonzero().flatten())

    data = DatasetSplits("digits", digits.classes, imbalanced(digits.train), imbalanced(digits.val), digits.test,
                         False, digits.mean, digits.std)
    cfg = default_config().replace(dataset="folder", out=str(tmp_path), name=weights, epochs=1, depth=1, dim=32,
                                   heads=2, mlp_dim=32, ema_decay=0, tensorboard=False, threads=1, device="cpu",
                                   precision="fp32", class_weights=weights)
    run = train(cfg, data=data, progress=False, log=lambda s: None).run_dir
    [row] = list(csv.DictReader(open(run / "metrics.csv")))
    predictor = load_predictor(run / "last", "cpu", precision="fp32")
    preds = predictor.logits(data.val.images).argmax(1).numpy()
    labels = data.val.labels.numpy()
    recalls = [np.mean(preds[labels == c] == c) for c in range(10) if (labels == c).any()]
    accuracy = float(np.mean(preds == labels))
    expected = float(np.mean(recalls)) if weights == "balanced" else accuracy
    assert abs(float(row["val_acc"]) - expected) < 1e-6
    assert abs(np.mean(recalls) - accuracy) > 1e-3  # the two differ here: the test can tell them apart
