"""Exports to ONNX, timm and transformers: each checked against vitlab on real test images,
each loaded back by its own library, refused when it cannot be expressed or does not match."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from vitlab import Kernels, ViT
from vitlab import export as vexport
from vitlab.augment import Normalize
from vitlab.checkpoint import CheckpointMeta, save_checkpoint
from vitlab.cli import cli
from vitlab.config import default_config
from vitlab.data import load_dataset
from vitlab.errors import VitlabError
from vitlab.interop import ExportError, to_hf, to_timm
from vitlab.train import build_model_config


def make_checkpoint(folder: Path, data=None, cfg=None, seed: int = 0, **arch) -> Path:
    """A checkpoint of a randomly initialised model (every weight non-trivial, the head too)
    whose config names a real dataset: the export checks then run on its real test images."""
    cfg = (cfg or default_config()).replace(**arch)
    data = data if data is not None else load_dataset(cfg.dataset, cfg.data_dir, val_size=cfg.val_size, download=False)
    model_cfg = build_model_config(cfg, data)
    torch.manual_seed(seed)
    model = ViT(model_cfg)
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.15)
    meta = CheckpointMeta(model_cfg, data.classes, data.mean, data.std, cfg.dataset, data=data.fingerprint())
    return save_checkpoint(folder, model, meta, cfg.to_yaml())


def _images(data, n=64):
    return data.test.images[:n]


def _vitlab_logits(model: ViT, images, data, reps: int = 1) -> torch.Tensor:
    """``reps``: the model takes the grey images as that many equal channels."""
    with torch.inference_mode():
        return model.eval()(Normalize(tuple(data.mean) * reps, tuple(data.std) * reps)(images))


def onnx_description(path: Path) -> dict:
    """The description vitlab keeps inside an exported ONNX file."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props[vexport.DESCRIPTION_KEY])


def set_onnx_description(path: Path, description: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {vexport.DESCRIPTION_KEY: json.dumps(description)})
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "unused", val_size=0.1)


# ---------------------------------------------------------------- ONNX

@pytest.mark.parametrize("arch", [dict(patch_embed="spt", lsa=True), dict(patch_embed="conv-pool", pool="mean"),
                                  dict(patch_embed="conv-stem", layer_scale=0.1), dict(patch_embed="linear"),
                                  dict(qk_norm=True, mlp_act="relu2")],
                         ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_onnx_exports_every_tokenizer_and_lsa(tmp_path, digits, arch):
    ckpt = make_checkpoint(tmp_path / "best", digits, **arch)
    report = vexport.export(ckpt, "onnx", log=lambda s: None)
    assert report["passed"] and report["top1_agreement"] == 1.0 and report["max_abs_logit_diff"] < 1e-4
    assert report["source"] == "the first 359 test images of digits"
    side = onnx_description(tmp_path / "best.onnx")  # in the model file itself: one unit
    assert side["check"] == report and side["input"] == "uint8" and side["classes"] == digits.classes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "best.onnx"]  # no second file


def test_onnx_graph_has_a_dynamic_batch_and_explicit_attention(tmp_path, digits):
    import onnx
    import onnxruntime as ort

    ckpt = make_checkpoint(tmp_path / "best", digits)
    vexport.export(ckpt, "onnx", log=lambda s: None)
    graph = onnx.load(str(tmp_path / "best.onnx")).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    ops = {n.op_type for n in graph.node}
    assert "Softmax" in ops and "MatMul" in ops and not ops & {"Attention", "MultiHeadAttention"}
    session = ort.InferenceSession(str(tmp_path / "best.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 300):  # any batch size
        out = session.run(None, {"images": digits.test.images[:batch].numpy()})[0]
        assert out.shape == (batch, 10)


def test_onnx_float_input(tmp_path, digits):
    ckpt = make_checkpoint(tmp_path / "best", digits)
    report = vexport.export(ckpt, "onnx", tmp_path / "f.onnx", float_input=True, log=lambda s: None)
    assert report["passed"] and onnx_description(tmp_path / "f.onnx")["input"] == "float32 normalised"
    import onnx

    card = {p.key: p.value for p in onnx.load(str(tmp_path / "f.onnx")).metadata_props}["model_card"]
    assert "takes these normalised float32 images" in card and "uint8" not in card  # its card says what it takes


def test_a_failed_check_keeps_nothing(tmp_path, digits, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "best", digits)
    monkeypatch.setitem(vexport.TOLERANCE, "onnx", 1e-12)  # no real export is that close: the check must fail
    result = CliRunner().invoke(cli, ["export", str(ckpt), "--format", "onnx"])
    assert result.exit_code == 1 and "does not match vitlab's" in result.output and "nothing was kept" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


# ------------------------------------------------------- timm and transformers

@pytest.mark.parametrize("arch", [dict(), dict(patch_embed="linear"), dict(pool="mean"), dict(layer_scale=0.1),
                                  dict(qk_norm=True)],
                         ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()) or "plain")
def test_timm_and_hf_compute_the_same_function(tmp_path, digits, arch):
    from vitlab.checkpoint import load_checkpoint

    ckpt = make_checkpoint(tmp_path / "best", digits, **arch)
    model, _ = load_checkpoint(ckpt, kernels=Kernels(attention="explicit"))
    images = _images(digits, 128)
    ours = _vitlab_logits(model, images, digits)
    x = Normalize(digits.mean, digits.std)(images)
    with torch.inference_mode():
        timm_out = to_timm(model)(x)
    assert (timm_out - ours).abs().max() < 1e-5 and torch.equal(timm_out.argmax(1), ours.argmax(1))
    if arch.get("pool") == "mean" or arch.get("layer_scale") or arch.get("qk_norm"):
        with pytest.raises(ExportError, match="cannot be exported to Hugging Face transformers"):
            to_hf(model)
        return
    hf = to_hf(model, digits.classes)
    with torch.inference_mode():
        hf_out = hf(pixel_values=Normalize(digits.mean * 3, digits.std * 3)(images.repeat(1, 3, 1, 1))).logits
    assert (hf_out - ours).abs().max() < 1e-5 and torch.equal(hf_out.argmax(1), ours.argmax(1))


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_every_format_on_real_mnist_and_cifar10(tmp_path, real_data, dataset):
    cfg = default_config().replace(dataset=dataset, data_dir=str(real_data), val_size=0.1, patch_size=7 if dataset == "mnist" else 4,
                                   depth=2, dim=48, heads=3, mlp_dim=96)
    data = load_dataset(dataset, real_data, val_size=0.1, download=False)
    ckpt = make_checkpoint(tmp_path / "best", data, cfg)
    for fmt in ("onnx", "timm", "hf"):
        report = vexport.export(ckpt, fmt, log=lambda s: None)
        assert report["passed"] and report["images"] == 512 and dataset in report["source"], report


def test_exported_folders_load_back_in_their_libraries(digits_run, tmp_path, caplog):
    """timm.create_model('local-dir:...') and transformers' from_pretrained and pipeline load the
    exports with no warning, and the pipeline picks vitlab's class for image files."""
    import timm
    from transformers import ViTForImageClassification, pipeline

    from vitlab.checkpoint import load_checkpoint
    from vitlab.data import load_digits

    runner = CliRunner()
    for fmt in ("timm", "hf", "onnx"):
        out = tmp_path / ("m.onnx" if fmt == "onnx" else fmt)
        result = runner.invoke(cli, ["export", str(digits_run / "best"), "--format", fmt, "--out", str(out)])
        assert result.exit_code == 0 and "top-1 agreement 1.0000" in result.output, result.output
    model, _ = load_checkpoint(digits_run / "best")
    data = load_dataset("digits", "unused", val_size=0.1)
    ours = _vitlab_logits(model, _images(data), data)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.inference_mode():
        assert torch.allclose(loaded(Normalize(data.mean, data.std)(_images(data))), ours, atol=1e-4)
    assert loaded.pretrained_cfg["label_names"] == data.classes
    with caplog.at_level(logging.WARNING):
        hf, info = ViTForImageClassification.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not [r for r in caplog.records if "weights" in r.getMessage().lower()]
    classify = pipeline("image-classification", model=str(tmp_path / "hf"))
    digits, _ = load_digits()
    paths = []
    for i in range(6):
        Image.fromarray(digits.images[i, 0].numpy()).resize((24, 24)).save(tmp_path / f"d{i}.png")  # another size
        paths.append(str(tmp_path / f"d{i}.png"))
    ours_cli = runner.invoke(cli, ["predict", str(digits_run / "best"), *paths, "--top-k", "1", "--precision", "fp32"]
                             ).output.splitlines()
    onnx_cli = runner.invoke(cli, ["predict", str(tmp_path / "m.onnx"), *paths, "--top-k", "1"])
    assert onnx_cli.exit_code == 0, onnx_cli.output
    assert onnx_cli.output.splitlines() == ours_cli and len(ours_cli) == 6  # both fp32: the same print
    for path, line in zip(paths, ours_cli):
        assert classify(path)[0]["label"] == line.split(": ")[1].split()[0]

    # each export carries its model card, as the hub's folders do (the ONNX file in its metadata)
    import onnx

    cards = [(tmp_path / fmt / "README.md").read_text() for fmt in ("timm", "hf")]
    cards.append({p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}["model_card"])
    for card in cards:
        assert "## Classes" in card and "0: 0" in card and "9: 9" in card
        assert "| Test |" in card and "## Intended use and limits" in card and "images sha256 `" in card
        assert "- epochs: `80`" in card and "top-1 agreement 1.0000" in card

    # and vitlab starts from what it exported: the same function again, from timm's and transformers' folders
    from vitlab import load_pretrained

    for fmt in ("timm", "hf"):
        again, cfg = load_pretrained(tmp_path / fmt)
        assert cfg.num_classes == 10 and cfg.depth == model.cfg.depth
        grey = _images(data).repeat(1, 3, 1, 1) if fmt == "hf" else _images(data)  # (the hf export takes RGB)
        assert torch.allclose(_vitlab_logits(again, grey, data, reps=3 if fmt == "hf" else 1), ours, atol=1e-4)
        back, _ = load_pretrained(tmp_path / fmt, channels=1)  # RGB weights summed over the colours: the grey model
        assert torch.allclose(_vitlab_logits(back, _images(data), data), ours, atol=1e-4)


# -------------------------------------------------------------- refusals

@pytest.mark.parametrize("edit", [
    lambda m: m.update(channels=True),  # True == 1 to Python, and one mean/std each would have matched it
    lambda m: m.update(image_size=True),
    lambda m: m.update(image_size=10**9),
    lambda m: m.update(format="something else"),
], ids=["channels-bool", "image-size-bool", "image-size-huge", "format"])
def test_a_forged_onnx_description_is_refused_in_one_line(tmp_path, digits, edit):
    ckpt = make_checkpoint(tmp_path / "best", digits)
    vexport.export(ckpt, "onnx", log=lambda s: None)
    image = tmp_path / "d.png"
    Image.fromarray(digits.test.images[0, 0].numpy()).save(image)
    good = CliRunner().invoke(cli, ["predict", str(tmp_path / "best.onnx"), str(image)])
    assert good.exit_code == 0, good.output  # the untouched export predicts
    meta = onnx_description(tmp_path / "best.onnx")
    edit(meta)
    set_onnx_description(tmp_path / "best.onnx", meta)
    result = CliRunner().invoke(cli, ["predict", str(tmp_path / "best.onnx"), str(image)])
    assert result.exit_code == 1 and "not the one vitlab export writes" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("arch, fmt, message", [
    (dict(patch_embed="spt"), "timm", "the spt tokenizer"),
    (dict(lsa=True), "hf", "locality self-attention"),
    (dict(pool="mean"), "hf", "mean pooling (ViTForImageClassification classifies the class token)"),
    (dict(qk_norm=True), "hf", "QK-norm (transformers' ViT has none)"),
    (dict(mlp_act="relu2"), "timm", "the relu2 MLP activation"),
])
def test_options_a_format_cannot_express_get_one_line(tmp_path, digits, arch, fmt, message):
    ckpt = make_checkpoint(tmp_path / "best", digits, **arch)
    result = CliRunner().invoke(cli, ["export", str(ckpt), "--format", fmt])
    assert result.exit_code == 1 and message in result.output and "ONNX (--format onnx) exports every" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_vitlab_01_checkpoint_cannot_go_to_a_timm_folder(tmp_path, digits):
    ckpt = make_checkpoint(tmp_path / "best", digits)
    def as_01(m):  # as vitlab 0.1 wrote it: format 1, LayerNorm eps 1e-5, no digest of its own
        del m["model"]["norm_eps"], m["manifest_sha256"]
        m["format_version"] = 1

    manifest = json.loads((ckpt / "model.json").read_text())
    as_01(manifest)
    (ckpt / "model.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, ["export", str(ckpt), "--format", "timm"])
    assert result.exit_code == 1 and "LayerNorm epsilon 1e-05" in result.output


def test_a_damaged_checkpoint_is_refused_before_export(tmp_path, digits):
    ckpt = make_checkpoint(tmp_path / "best", digits)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    result = CliRunner().invoke(cli, ["export", str(ckpt), "--format", "onnx"])
    assert result.exit_code == 1 and "damaged (checksum mismatch)" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_missing_export_libraries_name_the_extra(tmp_path, digits, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "best", digits)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    result = CliRunner().invoke(cli, ["export", str(ckpt), "--format", "onnx"])
    assert result.exit_code == 1 and "pip install 'vitlab[export]'" in result.output
    with pytest.raises(VitlabError, match="vitlab\\[export\\]"):
        vexport.require("onnx")
