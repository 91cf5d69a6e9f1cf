"""Checkpoints: folders that load without unpickling code, written atomically, checked
before anything is allocated.

A checkpoint folder holds
  ``model.safetensors``  the weights;
  ``model.json``         format version, the ViTConfig, class names, normalisation
                         statistics, the data's fingerprint, the SHA-256 of every
                         other file in the folder, and the SHA-256 of its own other
                         fields (an edited field that changes no weight's shape, such as
                         the number of heads, would otherwise compute another function);
  ``config.yaml``        the full run configuration;
  ``state.pt``           (optional) optimizer state, step counters and RNG states,
                         loaded with ``torch.load(weights_only=True)``.

A folder is written under a temporary name, fsynced, and renamed into place; the
previous version is kept as ``<name>.prev`` until the next save, so a process
killed at any moment leaves an intact checkpoint behind.

Reading trusts nothing: ``model.json`` is read with a size limit and checked against a
strict schema with bounds, and the safetensors header's names, shapes and dtypes are
checked against the architecture it describes before a model is built.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .autotune import choose
from .config import DEFAULT_EVAL_BATCH
from .devices import resolve_device
from .errors import CheckpointError, ConfigError
from .fileio import fsync_dir, open_regular, remove, read_bounded, read_json, sha256_file, temp_dir, write_synced
from .model import Kernels, ViT, ViTConfig
from .options import is_whole
from .options import need as require

FORMAT_VERSION = 3  # 2: no attention kernel in the model config; the data's fingerprint. 3: the manifest's own digest
READS = (1, 2, 3)
SELF_DIGEST = "manifest_sha256"
MANIFEST = "model.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
CONFIG = "config.yaml"
MAX_MANIFEST_BYTES = 8 << 20
MAX_HEADER_BYTES = 16 << 20
MAX_STATE_BYTES = 4 << 30


@dataclass
class CheckpointMeta:
    model: ViTConfig
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str
    extra: dict[str, Any] = field(default_factory=dict)  # epoch, step, val_acc, weights ...
    data: dict | None = None  # DatasetSplits.fingerprint() of the data the run trains on


def save_checkpoint(folder: Path, model: torch.nn.Module, meta: CheckpointMeta, config_yaml: str,
                    state: dict | None = None) -> Path:
    """Write a complete checkpoint folder atomically (see module docstring)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(folder.parent, f".{folder.name}.")
    try:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
        # Serialise in memory and write with plain file I/O, so a full disk is an OSError like any other.
        write_synced(tmp / WEIGHTS, save(weights, metadata={"format": "vitlab", "version": str(FORMAT_VERSION)}))
        write_synced(tmp / CONFIG, config_yaml.encode())
        if state is not None:
            buf = io.BytesIO()
            torch.save(state, buf)
            write_synced(tmp / STATE, buf.getvalue())
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": meta.model.to_dict(),
            "classes": list(meta.classes),
            "mean": list(meta.mean),
            "std": list(meta.std),
            "dataset": meta.dataset,
            "extra": meta.extra,
            "data": meta.data,
            "files": files,
        }
        manifest[SELF_DIGEST] = manifest_digest(manifest)
        write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        fsync_dir(tmp)
        prev = folder.with_name(folder.name + ".prev")
        if folder.exists() or folder.is_symlink():
            remove(prev)
            os.replace(folder, prev)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, inside torch.compile's and DistributedDataParallel's wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def manifest_digest(manifest: dict) -> str:
    """The SHA-256 of a manifest's fields other than this digest, in a canonical JSON form."""
    body = {k: v for k, v in manifest.items() if k != SELF_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ------------------------------------------------------------------- reading

def _schema(manifest: Any, where: Path) -> CheckpointMeta:
    """The manifest checked field by field; every size bounded before it is used."""
    def need(cond: bool, what: str) -> None:
        require(cond, f"{where}: malformed manifest ({what})", CheckpointError)

    need(isinstance(manifest, dict), "not a JSON object")
    need(isinstance(manifest.get("model"), dict), "'model' must be an object")
    try:
        cfg = ViTConfig.from_dict(manifest["model"], source="'model'")
    except ConfigError as e:
        raise CheckpointError(f"{where}: malformed manifest ({e})") from None
    classes = manifest.get("classes")
    need(isinstance(classes, list) and len(classes) == cfg.num_classes, f"'classes' must list num_classes = {cfg.num_classes} names")
    need(all(isinstance(c, str) and 0 < len(c) <= 200 for c in classes), "each class name must be a string of 1 to 200 characters")
    stats = [manifest.get("mean"), manifest.get("std")]
    need(all(isinstance(s, list) and len(s) == cfg.channels and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                      and math.isfinite(v) for v in s) for s in stats),
         f"'mean' and 'std' must be {cfg.channels} finite numbers each")
    need(all(0 < v <= 10 for v in stats[1]) and all(-10 <= v <= 10 for v in stats[0]), "'std' must be positive, 'mean' and 'std' at most 10")
    need(isinstance(manifest.get("dataset"), str) and len(manifest["dataset"]) <= 64, "'dataset' must be a short string")
    extra = manifest.get("extra", {})
    need(isinstance(extra, dict) and len(extra) <= 32, "'extra' must be a small object")
    for key in ("epoch", "batch", "step"):
        need(key not in extra or (is_whole(extra[key]) and extra[key] >= 0),
             f"'extra.{key}' must be a whole number >= 0")
    acc = extra.get("val_acc")
    need(acc is None or (isinstance(acc, (int, float)) and not isinstance(acc, bool) and 0 <= acc <= 1),
         "'extra.val_acc' must be an accuracy from 0 to 1")
    need(extra.get("weights", "raw") in ("raw", "ema"), "'extra.weights' must be 'raw' or 'ema'")
    need(isinstance(extra.get("kernels", {}), dict), "'extra.kernels' must be an object")
    data = manifest.get("data")
    need(data is None or isinstance(data, dict), "'data' must be an object")
    return CheckpointMeta(cfg, list(classes), tuple(float(v) for v in stats[0]), tuple(float(v) for v in stats[1]),
                          manifest["dataset"], dict(extra), data)


def read_manifest(folder: Path) -> dict:
    """The parsed ``model.json`` of a checkpoint folder (format version checked, nothing else)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder (expected e.g. runs/<run>/best)")
    try:
        manifest = read_json(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a vitlab checkpoint ({MANIFEST} missing)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged ({e.strerror if isinstance(e, OSError) and e.strerror else e})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not is_whole(version) or version not in READS:
        raise CheckpointError(f"{path}: unsupported checkpoint format {version!r} (this vitlab reads {', '.join(map(str, READS))})")
    if version >= 3 and manifest.get(SELF_DIGEST) != manifest_digest(manifest):
        raise CheckpointError(f"{path}: damaged (its fields do not match its own checksum: the file was edited or "
                              f"corrupted after vitlab wrote it)")
    return manifest


def verify_files(folder: Path, manifest: dict) -> None:
    """Every file the manifest lists is present and has its SHA-256."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not set(files) <= {WEIGHTS, CONFIG, STATE} or WEIGHTS not in files \
            or not all(isinstance(d, str) and re.fullmatch(r"[0-9a-f]{64}", d) for d in files.values()):
        raise CheckpointError(f"{folder / MANIFEST}: malformed manifest ('files' must give the SHA-256 of {WEIGHTS} "
                              f"and of nothing but {CONFIG} and {STATE})")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from checkpoint")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: damaged (checksum mismatch); the file was modified or truncated")


def read_meta(folder: Path, verify: bool = True) -> CheckpointMeta:
    """Read and check a checkpoint's manifest (and, with ``verify``, every file's checksum)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify:
        verify_files(folder, manifest)
    return _schema(manifest, folder / MANIFEST)


def expected_tensors(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a model's weights, computed without allocating them."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in ViT(cfg).state_dict().items()}


def safetensors_header(path: Path) -> dict[str, dict]:
    """A safetensors file's header (each tensor's dtype, shape and offsets), read alone with a
    size limit; every tensor's data checked to lie within the file. A CheckpointError otherwise."""
    try:
        with open_regular(path) as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"header of {length:,} bytes")
            header = json.loads(f.read(length))
        size = path.stat().st_size
    except (OSError, ValueError, struct.error, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({e.strerror if isinstance(e, OSError) and e.strerror else e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: cannot read weights (the header is not a JSON object)")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        begin, end = offsets if isinstance(offsets, list) and len(offsets) == 2 else (None, None)
        if not (is_whole(begin) and is_whole(end) and 0 <= begin <= end <= size - 8 - length):
            raise CheckpointError(f"{path}: weights do not fit this model's architecture ({str(name)[:60]}: bad data offsets)")
    return header


def check_weights_header(folder: Path, cfg: ViTConfig) -> None:
    """The safetensors header holds exactly the tensors of ``cfg``'s architecture, in float32."""
    path = Path(folder) / WEIGHTS
    header = safetensors_header(path)
    expected = expected_tensors(cfg)
    if set(header) != set(expected):
        odd = sorted(set(header) ^ set(expected))[:3]
        raise CheckpointError(f"{path}: weights do not fit this model's architecture (tensors {odd} are missing or unexpected)")
    for name, shape in expected.items():
        entry = header[name]
        if not isinstance(entry, dict) or entry.get("dtype") != "F32" or tuple(entry.get("shape", ())) != shape:
            found = (entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else entry
            raise CheckpointError(f"{path}: weights do not fit this model's architecture ({name}: expected F32 {list(shape)}, found {found})")
        begin, end = entry["data_offsets"]
        if end - begin != 4 * math.prod(shape):
            raise CheckpointError(f"{path}: weights do not fit this model's architecture ({name}: bad data offsets)")


def open_checkpoint(folder: Path) -> CheckpointMeta:
    """The first step of every use of a checkpoint: its manifest read and checked, every file's
    checksum verified, and its weights' header checked against the architecture, before
    anything is allocated."""
    meta = read_meta(Path(folder))
    check_weights_header(Path(folder), meta.model)
    return meta


def build_model(folder: Path, meta: CheckpointMeta, kernels: Kernels) -> ViT:
    """The checkpoint's model (opened with :func:`open_checkpoint`), computing as ``kernels`` say."""
    model = ViT(meta.model, kernels)
    load_weights(Path(folder), model)
    return model


def load_weights(folder: Path, model: torch.nn.Module) -> None:
    path = Path(folder) / WEIGHTS
    check_weights_header(folder, unwrap(model).cfg)
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({e})") from None
    try:
        unwrap(model).load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: weights do not fit this model ({' '.join(first[:2])[:300]})") from None


def load_state(folder: Path) -> dict:
    """The training state of ``folder`` (structure unchecked: ``vitlab.train.state.TrainState.restore`` checks it)."""
    path = Path(folder) / STATE
    try:
        raw = read_bounded(path, MAX_STATE_BYTES)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; this checkpoint holds weights only and cannot be resumed") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load training state ({e.strerror if isinstance(e, OSError) and e.strerror else e})") from None
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # refused unpickling (code objects), truncation, ...
        raise CheckpointError(f"{path}: cannot load training state ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a vitlab training state (a {type(state).__name__}, not a dict)")
    return state


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu",
                    kernels: Kernels | None = None) -> tuple[ViT, ViTConfig]:
    """The model (in eval mode) and its config from a checkpoint folder. ``kernels``:
    how it computes (default: those measured fastest on ``device`` for fp32 evaluation
    batches, vitlab.autotune)."""
    meta = open_checkpoint(folder)
    device = device if isinstance(device, torch.device) else resolve_device(str(device))  # "auto" too; one line if bad
    if kernels is None:
        kernels = choose(meta.model, device, batch=DEFAULT_EVAL_BATCH, training=False, precision="fp32").kernels()
    return build_model(folder, meta, kernels).to(device).eval(), meta.model


# ------------------------------------------------------------------- recovery

def intact_checkpoints(run_dir: Path, name: str = "last", need_state: bool = True) -> list[Path]:
    """``name``, its temporary and previous versions that pass verification, newest step first."""
    found = []
    candidates = [run_dir / name, run_dir / f"{name}.prev", *sorted(run_dir.glob(f".{name}.*.tmp"))]
    for folder in candidates:
        try:
            meta = read_meta(folder)
        except CheckpointError:
            continue
        if (folder / STATE).is_file() or not need_state:
            found.append((int(meta.extra.get("step", -1)), folder))
    found.sort(key=lambda t: -t[0])
    return [f for _, f in found]


def recover(run_dir: Path, name: str, need_state: bool = True) -> Path | None:
    """After a crash: put the newest intact version of checkpoint ``name`` in place
    (a kill can land between the two renames of a save, or leave a complete
    temporary folder) and delete stale temporaries. Returns the folder, or None."""
    intact = intact_checkpoints(run_dir, name, need_state)
    if intact and intact[0].name.endswith(".tmp"):  # a finished save that was never renamed into place
        final = run_dir / name
        if final.exists() or final.is_symlink():
            prev = run_dir / f"{name}.prev"
            remove(prev)
            os.replace(final, prev)
        os.replace(intact[0], final)
        fsync_dir(run_dir)
        intact[0] = final
    for stale in run_dir.glob(f".{name}.*.tmp"):
        try:
            remove(stale)
        except OSError:
            pass
    return intact[0] if intact else None
