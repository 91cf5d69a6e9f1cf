"""``vitlab export``: a checkpoint as ONNX, a timm model folder or a Hugging Face transformers
folder, each checked against the original before it is kept.

Every export runs the exported model in its own runtime (onnxruntime, timm, transformers)
on test images of the run's dataset (random images when the data is not found, saying
so), compares its logits with vitlab's in fp32, writes the comparison beside the export,
and removes the export again when the top-1 predictions disagree on any image or the
largest logit difference exceeds the format's tolerance (:data:`TOLERANCE`).
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
from .checkpoint import check_weights_header, load_weights, read_meta
from .errors import DataError, VitlabError
from .fileio import atomic_write_text, printable, read_bounded, temp_dir
from .interop import ExportError, check_exportable, hf_channels, timm_model_args, timm_state_dict, to_hf
from .model import MAX_IMAGE_SIZE, Kernels, ViT
from .options import is_whole
from .report import code_version

FORMATS = ("onnx", "timm", "hf")
EXTRAS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "timm": ("timm",), "hf": ("transformers",)}
# The largest |logit difference| each format may show against vitlab in fp32, on real test
# images. Measured (benchmarks/RESULTS.md, "Export parity"): ONNX up to ~2e-5 on the
# checkpoints tested, timm and transformers ~1e-5; timm's own ONNX check allows 1.5e-3.
TOLERANCE = {"onnx": 1e-3, "timm": 1e-4, "hf": 1e-4}
CHECK_IMAGES = 512
SIDECAR_BYTES = 8 << 20


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
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + (".onnx" if fmt == "onnx" else f"-{fmt}"))


def export(checkpoint: Path, fmt: str, out: Path | None = None, float_input: bool = False,
           data_dir: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Export ``checkpoint`` as ``fmt`` to ``out`` and check it; returns the check's report
    (also written to ``out.json`` for ONNX, ``out/vitlab-export.json`` for the folders)."""
    if fmt not in FORMATS:
        raise VitlabError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)  # every checksum: a damaged checkpoint is refused before anything is written
    check_weights_header(checkpoint, meta.model)
    if fmt != "onnx":
        check_exportable(meta.model, "timm-folder" if fmt == "timm" else fmt)
    require(fmt)
    out = Path(out) if out is not None else default_out(checkpoint, fmt)
    model = ViT(meta.model, Kernels(attention="explicit"))  # explicit attention: every runtime has matmul + softmax
    load_weights(checkpoint, model)
    model.eval()
    imgs = check_images(checkpoint, meta, data_dir, log)
    reference = _reference_logits(model, imgs.images, meta.mean, meta.std)
    if fmt == "onnx":
        return _export_onnx(model, meta, out, float_input, imgs, reference)
    return (_export_timm if fmt == "timm" else _export_hf)(model, meta, out, imgs, reference)


def _sidecar(meta, fmt: str, report: dict, float_input: bool = False) -> dict:
    return {"format": f"vitlab-{fmt}", "version": 1, "classes": list(meta.classes), "image_size": meta.model.image_size,
            "channels": meta.model.channels, "mean": list(meta.mean), "std": list(meta.std),
            "input": "float32 normalised" if float_input else "uint8", "check": report, "vitlab": code_version()}


def _refuse(report: dict, remove: list[Path]) -> None:
    for path in remove:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    raise ExportError(f"the exported model does not match vitlab's (top-1 agreement {report['top1_agreement']:.4f}, "
                      f"max |logit difference| {report['max_abs_logit_diff']:.2e}, tolerance "
                      f"{report['tolerance']:.0e}); nothing was kept")


def _export_onnx(model: ViT, meta, out: Path, float_input: bool, imgs: CheckImages, reference: torch.Tensor) -> dict:
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
            _refuse(report, [tmp])
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(_sidecar(meta, "onnx", report, float_input), indent=2))
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


def _export_timm(model: ViT, meta, out: Path, imgs: CheckImages, reference: torch.Tensor) -> dict:
    import timm
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, f".{out.name}.")
    try:
        save_file(timm_state_dict(model), str(tmp / "model.safetensors"))
        atomic_write_text(tmp / "config.json", json.dumps(_timm_config(meta), indent=2))
        loaded = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()
        got = _timm_logits(loaded, imgs.images, meta)
        report = _keep_if_equal(tmp, out, meta, "timm", reference, got, imgs.source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _timm_logits(model, images: torch.Tensor, meta) -> torch.Tensor:
    norm = Normalize(meta.mean, meta.std)
    with torch.inference_mode():
        return torch.cat([model(norm(images[i: i + 256])) for i in range(0, len(images), 256)]).float()


def _export_hf(model: ViT, meta, out: Path, imgs: CheckImages, reference: torch.Tensor) -> dict:
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
        report = _keep_if_equal(tmp, out, meta, "hf", reference, got, imgs.source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _keep_if_equal(tmp: Path, out: Path, meta, fmt: str, reference: torch.Tensor, got: torch.Tensor,
                   source: str) -> dict:
    """A written folder's parity check: refused (and removed) or given its report and moved into place."""
    report = compare(reference, got, fmt, source)
    if not report["passed"]:
        _refuse(report, [tmp])
    atomic_write_text(tmp / "vitlab-export.json", json.dumps(_sidecar(meta, fmt, report), indent=2))
    _replace_folder(tmp, out)
    return report


def _replace_folder(tmp: Path, out: Path) -> None:
    """Put the checked export in place; an earlier export of vitlab's there is replaced, anything else refused."""
    if out.exists():
        if not (out / "vitlab-export.json").is_file() or out.is_symlink():
            raise ExportError(f"{printable(out)} exists and is not a vitlab export; choose another --out")
        shutil.rmtree(out)
    os.replace(tmp, out)


# ------------------------------------------------------------- loading back

@dataclass
class OnnxModel:
    """An exported ONNX file with its sidecar, run in onnxruntime."""

    session: object
    classes: list[str]
    image_size: int
    channels: int
    float_input: bool
    normalize: Normalize

    @classmethod
    def load(cls, path: Path) -> "OnnxModel":
        require("onnx")
        import onnxruntime as ort

        side = Path(str(path) + ".json")
        try:
            meta = json.loads(read_bounded(side, SIDECAR_BYTES))
        except (OSError, ValueError) as e:
            raise DataError(f"{printable(path)}: cannot read its description {printable(side)} ({e}); export again "
                            f"with vitlab export") from None
        ok = (isinstance(meta, dict) and meta.get("format") == "vitlab-onnx" and isinstance(meta.get("classes"), list)
              and all(isinstance(c, str) and len(c) <= 200 for c in meta["classes"])
              and is_whole(meta.get("image_size")) and 1 <= meta["image_size"] <= MAX_IMAGE_SIZE
              and is_whole(meta.get("channels")) and meta["channels"] in (1, 2, 3, 4)
              and meta.get("input") in ("uint8", "float32 normalised")
              and all(isinstance(meta.get(k), list) and len(meta[k]) == meta["channels"] for k in ("mean", "std")))
        if not ok:
            raise DataError(f"{printable(side)}: not the description vitlab export writes")
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise DataError(f"{printable(path)}: onnxruntime cannot load it ({type(e).__name__})") from None
        return cls(session, meta["classes"], meta["image_size"], meta["channels"], meta["input"] != "uint8",
                   Normalize(meta["mean"], meta["std"]))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        feed = self.normalize(images) if self.float_input else images
        return torch.from_numpy(self.session.run(None, {"images": feed.numpy()})[0]).float()
