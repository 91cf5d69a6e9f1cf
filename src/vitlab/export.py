"""``vitlab export``: a checkpoint as ONNX, a timm model folder or a Hugging Face transformers
folder, each checked against the original before it is kept.

Every export runs the exported model in its own runtime (onnxruntime, timm, transformers)
on test images of the run's dataset (random images when the data is not found, saying
so), compares its logits with vitlab's in fp32, and keeps the export only when the top-1
predictions agree on every image and the largest logit difference is within the format's
tolerance (:data:`TOLERANCE`).

An export is one unit: an ONNX file carries its description (classes, input, normalisation,
the check) in its own metadata, so model and description cannot part; a timm or Hugging
Face folder is written whole under a temporary name and renamed into place. An existing
``--out`` is replaced only when it is an export of vitlab's (an ONNX file with vitlab's
description; a folder holding only the files an export writes); a link, or anything else,
is refused before any work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .augment import Normalize
from .checkpoint import build_model, open_checkpoint
from .errors import DataError, VitlabError
from .fileio import (atomic_write_text, fsync_dir, owner_tag, parse_json, printable, read_bounded, read_json, temp_dir,
                     write_synced)
from .interop import ExportError, check_exportable, hf_channels, timm_model_args, timm_state_dict, to_hf
from .model import MAX_IMAGE_SIZE, Kernels, ViT
from .model_card import CARD, model_card
from .options import is_whole
from .report import code_version

FORMATS = ("onnx", "timm", "hf")
EXTRAS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "timm": ("timm",), "hf": ("transformers",)}
# The largest |logit difference| each format may show against vitlab in fp32, on real test
# images. Measured (benchmarks/RESULTS.md, "Export parity"): ONNX up to ~2e-5 on the
# checkpoints tested, timm and transformers ~1e-5; timm's own ONNX check allows 1.5e-3.
TOLERANCE = {"onnx": 1e-3, "timm": 1e-4, "hf": 1e-4}
CHECK_IMAGES = 512
DESCRIPTION_KEY = "vitlab"  # the ONNX metadata_props entry holding the description (JSON)
DESCRIPTION_BYTES = 1 << 20
MAX_ONNX_BYTES = 2 << 30  # protobuf's own limit for one file
REPORT = "vitlab-export.json"  # in a timm or hf export folder
# What an export folder holds (save_pretrained's and timm's files, and vitlab's report).
FOLDER_FILES = {"timm": {"config.json", "model.safetensors", REPORT, CARD},
                "hf": {"config.json", "model.safetensors", "preprocessor_config.json", REPORT, CARD}}
CARD_KEY = "model_card"  # the ONNX metadata_props entry holding the model card (markdown)


def require(fmt: str) -> None:
    """Import the libraries ``fmt`` needs, or say which extra installs them."""
    import importlib

    for module in EXTRAS[fmt]:
        try:
            importlib.import_module(module)
        except ImportError:
            raise VitlabError(f"--format {fmt} needs {', '.join(EXTRAS[fmt])}: pip install 'vitlab[export]'") from None


class UInt8Classifier(torch.nn.Module):
    """What an ONNX user feeds: uint8 images (B, C, H, W); the normalisation is in the graph."""

    def __init__(self, model: ViT, mean, std):
        super().__init__()
        self.model = model
        norm = Normalize(mean, std)
        self.register_buffer("scale", norm.scale)
        self.register_buffer("shift", norm.shift)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.float() * self.scale + self.shift)


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """Raise these loggers to ERROR for the duration (export libraries log progress as warnings)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@dataclass
class CheckImages:
    images: torch.Tensor  # uint8 (N, C, H, W)
    source: str


def check_images(checkpoint: Path, meta, data_dir: str | None, log: Callable[[str], None]) -> CheckImages:
    """Test images of the run's dataset, or random ones when the data is not at hand."""
    from .inference import checkpoint_data

    try:
        _, data = checkpoint_data(checkpoint, meta, data_dir)
        return CheckImages(data.test.images[:CHECK_IMAGES], f"the first {min(CHECK_IMAGES, len(data.test))} test "
                                                          f"images of {meta.dataset}")
    except VitlabError as e:
        log(f"note: the run's data is not at hand ({e}); checking on {CHECK_IMAGES} random images instead")
        g = torch.Generator().manual_seed(0)
        m = meta.model
        return CheckImages(torch.randint(0, 256, (CHECK_IMAGES, m.channels, m.image_size, m.image_size), generator=g,
                                         dtype=torch.uint8), f"{CHECK_IMAGES} random images (the run's data was not found)")


def compare(reference: torch.Tensor, exported: torch.Tensor, fmt: str, source: str) -> dict:
    diff = float((reference - exported).abs().max())
    agree = float((reference.argmax(1) == exported.argmax(1)).float().mean())
    return {"format": fmt, "images": len(reference), "source": source, "max_abs_logit_diff": diff,
            "top1_agreement": agree, "tolerance": TOLERANCE[fmt],
            "passed": agree == 1.0 and diff <= TOLERANCE[fmt]}


def _reference_logits(model: ViT, images: torch.Tensor, mean, std) -> torch.Tensor:
    wrapper = UInt8Classifier(model, mean, std).eval()
    with torch.inference_mode():
        return torch.cat([wrapper(images[i: i + 256]) for i in range(0, len(images), 256)])


def default_out(checkpoint: Path, fmt: str) -> Path:
    """Beside the checkpoint: best.onnx, best-timm/, best-hf/ (``vitlab export .`` inside the
    checkpoint folder writes beside it too)."""
    checkpoint = Path(checkpoint)
    if checkpoint.name in ("", ".", ".."):
        checkpoint = checkpoint.resolve()
    return checkpoint.with_name(checkpoint.name + (".onnx" if fmt == "onnx" else f"-{fmt}"))


def check_out(out: Path, fmt: str) -> None:
    """``out`` may be written: it does not exist, or it is an export of vitlab's in ``fmt``
    (which the new one replaces). Anything else, a link above all, is refused."""
    if out.is_symlink():
        raise ExportError(f"{printable(out)} is a symbolic link; vitlab never writes through a link: choose another --out")
    if not out.exists():
        return
    if fmt == "onnx":
        if out.is_dir() or not _is_onnx_export(out):
            raise ExportError(f"{printable(out)} exists and is not an ONNX file vitlab exported; choose another --out")
        return
    odd = sorted(p.name for p in out.iterdir() if p.name not in FOLDER_FILES[fmt] or p.is_symlink()
                 or not p.is_file()) if out.is_dir() else None
    if odd is None or odd or not _is_folder_export(out, fmt):
        what = "is not a folder" if odd is None else (f"holds {', '.join(map(printable, odd[:4]))}, which an export "
                                                      f"does not write" if odd else f"is not a {fmt} export of vitlab's")
        raise ExportError(f"{printable(out)} exists and {what}; choose another --out")


def _is_onnx_export(path: Path) -> bool:
    import onnx

    try:
        model = onnx.load_model_from_string(read_bounded(path, MAX_ONNX_BYTES))
    except Exception:  # not a file, not protobuf, not ONNX: not vitlab's
        return False
    return any(p.key == DESCRIPTION_KEY for p in model.metadata_props)


def _is_folder_export(folder: Path, fmt: str) -> bool:
    try:
        report = read_json(folder / REPORT, DESCRIPTION_BYTES)
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("format") == f"vitlab-{fmt}"


def export(checkpoint: Path, fmt: str, out: Path | None = None, float_input: bool = False,
           data_dir: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Export ``checkpoint`` as ``fmt`` to ``out`` and check it; returns the check's report
    (also kept in the ONNX file's description, or in ``out/vitlab-export.json`` for the folders)."""
    if fmt not in FORMATS:
        raise VitlabError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    checkpoint = Path(checkpoint)
    meta = open_checkpoint(checkpoint)  # every checksum: a damaged checkpoint is refused before anything is written
    if fmt != "onnx":
        check_exportable(meta.model, "timm-folder" if fmt == "timm" else fmt)
    require(fmt)
    out = Path(out) if out is not None else default_out(checkpoint, fmt)
    check_out(out, fmt)  # before any work
    model = build_model(checkpoint, meta, Kernels(attention="explicit")).eval()  # every runtime has matmul + softmax
    imgs = check_images(checkpoint, meta, data_dir, log)
    reference = _reference_logits(model, imgs.images, meta.mean, meta.std)
    card = lambda report: model_card(checkpoint, meta, fmt, report, float_input)  # noqa: E731 (written with the check)
    if fmt == "onnx":
        return _export_onnx(model, meta, out, float_input, imgs, reference, card)
    return (_export_timm if fmt == "timm" else _export_hf)(model, meta, out, imgs, reference, card)


def _description(meta, fmt: str, report: dict, float_input: bool = False) -> dict:
    return {"format": f"vitlab-{fmt}", "version": 1, "classes": list(meta.classes), "image_size": meta.model.image_size,
            "channels": meta.model.channels, "mean": list(meta.mean), "std": list(meta.std),
            "input": "float32 normalised" if float_input else "uint8", "check": report, "vitlab": code_version()}


def _refuse(report: dict) -> None:
    raise ExportError(f"the exported model does not match vitlab's (top-1 agreement {report['top1_agreement']:.4f}, "
                      f"max |logit difference| {report['max_abs_logit_diff']:.2e}, tolerance "
                      f"{report['tolerance']:.0e}); nothing was kept")


def _export_onnx(model: ViT, meta, out: Path, float_input: bool, imgs: CheckImages, reference: torch.Tensor,
                 card: Callable[[dict], str]) -> dict:
    import onnx
    import onnxruntime as ort

    out.parent.mkdir(parents=True, exist_ok=True)
    module = model if float_input else UInt8Classifier(model, meta.mean, meta.std).eval()
    c, s = meta.model.channels, meta.model.image_size
    example = torch.randn(2, c, s, s) if float_input else torch.randint(0, 256, (2, c, s, s), dtype=torch.uint8)
    tmp = temp_dir(out.parent, f".{out.name}.")
    try:
        staged = tmp / out.name
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        with quiet_loggers("onnxscript", "onnx_ir", "torch.onnx"):  # the exporter's progress notes
            torch.onnx.export(module, (example,), str(staged), input_names=["images"], output_names=["logits"],
                              dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
        session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        if float_input:
            feed = Normalize(meta.mean, meta.std)(imgs.images).numpy()
        else:
            feed = imgs.images.numpy()
        got = torch.cat([torch.from_numpy(session.run(None, {"images": feed[i: i + 256]})[0])
                         for i in range(0, len(feed), 256)])
        report = compare(reference, got, "onnx", imgs.source)
        if not report["passed"]:
            _refuse(report)
        graph = onnx.load(str(staged))  # the description goes into the model file itself: one unit
        onnx.helper.set_model_props(graph, {DESCRIPTION_KEY: json.dumps(_description(meta, "onnx", report, float_input)),
                                            CARD_KEY: card(report)})
        write_synced(tmp / "described.onnx", graph.SerializeToString())
        OnnxModel.load(tmp / "described.onnx")  # what predict will read: it loads and agrees with itself
        check_out(out, "onnx")  # still nothing else there
        os.replace(tmp / "described.onnx", out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _timm_config(meta) -> dict:
    cfg = meta.model
    args = timm_model_args(cfg)
    pretrained = {"input_size": [cfg.channels, cfg.image_size, cfg.image_size], "interpolation": "bilinear",
                  "crop_pct": 1.0, "crop_mode": "center", "mean": list(meta.mean), "std": list(meta.std),
                  "num_classes": cfg.num_classes, "first_conv": "patch_embed.proj", "classifier": "head",
                  "label_names": list(meta.classes), "fixed_input_size": True}
    return {"architecture": "vit_tiny_patch16_224", "num_classes": cfg.num_classes, "num_features": cfg.dim,
            "global_pool": args["global_pool"], "model_args": args, "pretrained_cfg": pretrained,
            "label_names": list(meta.classes)}


def _export_timm(model: ViT, meta, out: Path, imgs: CheckImages, reference: torch.Tensor,
                 card: Callable[[dict], str]) -> dict:
    import timm
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, f".{out.name}.")
    try:
        save_file(timm_state_dict(model), str(tmp / "model.safetensors"))
        atomic_write_text(tmp / "config.json", json.dumps(_timm_config(meta), indent=2))
        loaded = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()
        got = _timm_logits(loaded, imgs.images, meta)
        report = _keep_if_equal(tmp, out, meta, "timm", reference, got, imgs.source, card)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _timm_logits(model, images: torch.Tensor, meta) -> torch.Tensor:
    norm = Normalize(meta.mean, meta.std)
    with torch.inference_mode():
        return torch.cat([model(norm(images[i: i + 256])) for i in range(0, len(images), 256)]).float()


def _export_hf(model: ViT, meta, out: Path, imgs: CheckImages, reference: torch.Tensor,
               card: Callable[[dict], str]) -> dict:
    from transformers import ViTForImageClassification, ViTImageProcessor
    from transformers.utils import logging as hf_logging

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, f".{out.name}.")
    try:
        s = meta.model.image_size
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            to_hf(model, list(meta.classes)).save_pretrained(str(tmp), safe_serialization=True)
            reps = hf_channels(meta.model) // meta.model.channels  # a grey model takes RGB (interop.hf_channels)
            ViTImageProcessor(do_resize=True, size={"height": s, "width": s}, resample=2, do_rescale=True,
                              rescale_factor=1 / 255, do_normalize=True, image_mean=list(meta.mean) * reps,
                              image_std=list(meta.std) * reps).save_pretrained(str(tmp))
            loaded, info = ViTForImageClassification.from_pretrained(str(tmp), output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        leftover = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if leftover:
            raise ExportError(f"transformers did not load every weight back: {leftover}")
        norm = Normalize(meta.mean * reps, meta.std * reps)
        rgb = imgs.images.repeat(1, reps, 1, 1)  # a grey image as RGB: three equal channels
        with torch.inference_mode():
            got = torch.cat([loaded.eval()(pixel_values=norm(rgb[i: i + 256])).logits
                             for i in range(0, len(rgb), 256)]).float()
        report = _keep_if_equal(tmp, out, meta, "hf", reference, got, imgs.source, card)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _keep_if_equal(tmp: Path, out: Path, meta, fmt: str, reference: torch.Tensor, got: torch.Tensor,
                   source: str, card: Callable[[dict], str]) -> dict:
    """A written folder's parity check: refused (and removed) or given its report and model card
    and moved into place."""
    report = compare(reference, got, fmt, source)
    if not report["passed"]:
        _refuse(report)
    atomic_write_text(tmp / REPORT, json.dumps(_description(meta, fmt, report), indent=2))
    atomic_write_text(tmp / CARD, card(report))
    _replace_folder(tmp, out, fmt)
    return report


def _replace_folder(tmp: Path, out: Path, fmt: str) -> None:
    """Put the checked export in place; an earlier export of vitlab's there is moved aside
    first and deleted after, so a kill at any moment leaves one whole export (or the old one)."""
    check_out(out, fmt)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{owner_tag()}.replaced.tmp")
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------- loading back

@dataclass
class OnnxModel:
    """An exported ONNX file (its description inside), run in onnxruntime."""

    session: object
    classes: list[str]
    image_size: int
    channels: int
    float_input: bool
    normalize: Normalize

    @classmethod
    def load(cls, path: Path) -> "OnnxModel":
        """An ONNX file of vitlab's, read whole (bounded, a regular file) and run from memory; its
        description is checked, and checked against the graph's own input and output."""
        require("onnx")
        import onnxruntime as ort

        try:
            raw = read_bounded(path, MAX_ONNX_BYTES)
        except (OSError, ValueError) as e:
            raise DataError(f"{printable(path)}: cannot read ({e.strerror if isinstance(e, OSError) and e.strerror else e})") from None
        try:
            session = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise DataError(f"{printable(path)}: onnxruntime cannot load it ({type(e).__name__})") from None
        text = session.get_modelmeta().custom_metadata_map.get(DESCRIPTION_KEY)
        if text is None:
            raise DataError(f"{printable(path)}: holds no vitlab description (an export of another tool, or of vitlab "
                            f"before 0.3, whose description was a separate file); export it again with vitlab export")
        try:
            meta = parse_json(text) if len(text) <= DESCRIPTION_BYTES else None
        except ValueError:
            meta = None
        ok = (isinstance(meta, dict) and meta.get("format") == "vitlab-onnx" and isinstance(meta.get("classes"), list)
              and 2 <= len(meta["classes"]) <= 100_000
              and all(isinstance(c, str) and len(c) <= 200 for c in meta["classes"])
              and is_whole(meta.get("image_size")) and 1 <= meta["image_size"] <= MAX_IMAGE_SIZE
              and is_whole(meta.get("channels")) and 1 <= meta["channels"] <= 4
              and meta.get("input") in ("uint8", "float32 normalised")
              and all(isinstance(meta.get(k), list) and len(meta[k]) == meta["channels"]
                      and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in meta[k])
                      for k in ("mean", "std"))
              and all(0 < v <= 10 for v in meta["std"]) and all(-10 <= v <= 10 for v in meta["mean"]))
        if not ok:
            raise DataError(f"{printable(path)}: its description is not the one vitlab export writes")
        inputs, outputs = session.get_inputs(), session.get_outputs()
        want_type = "tensor(uint8)" if meta["input"] == "uint8" else "tensor(float)"
        shape_ok = (len(inputs) == 1 and len(outputs) == 1 and inputs[0].type == want_type
                    and list(inputs[0].shape[1:]) == [meta["channels"], meta["image_size"], meta["image_size"]]
                    and list(outputs[0].shape[1:]) == [len(meta["classes"])])
        if not shape_ok:
            raise DataError(f"{printable(path)}: its description does not match its graph (input {inputs[0].type} "
                            f"{inputs[0].shape}, output {outputs[0].shape}); export it again with vitlab export")
        return cls(session, meta["classes"], meta["image_size"], meta["channels"], meta["input"] != "uint8",
                   Normalize(meta["mean"], meta["std"]))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        feed = self.normalize(images) if self.float_input else images
        return torch.from_numpy(self.session.run(None, {"images": feed.numpy()})[0]).float()
