"""Checkpoints: folders that load without unpickling code, written atomically.

A checkpoint folder holds
  ``model.safetensors``  the weights;
  ``model.json``         format version, the ViTConfig, class names, normalisation
                         statistics, and the SHA-256 of every other file in the folder;
  ``config.yaml``        the full run configuration;
  ``state.pt``           (optional) optimizer state, step counters and RNG states,
                         loaded with ``torch.load(weights_only=True)``.

A folder is written under a temporary name, fsynced, and renamed into place; the
previous version is kept as ``<name>.prev`` until the next save, so a process
killed at any moment leaves an intact checkpoint behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import CheckpointError, ConfigError
from .model import ViT, ViTConfig

FORMAT_VERSION = 1
MANIFEST = "model.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
CONFIG = "config.yaml"


# ------------------------------------------------------------- atomic writes

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- checkpoints

@dataclass
class CheckpointMeta:
    model: ViTConfig
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str
    extra: dict[str, Any] = field(default_factory=dict)  # epoch, step, val_acc, ...


def save_checkpoint(folder: Path, model: torch.nn.Module, meta: CheckpointMeta, config_yaml: str,
                    state: dict | None = None) -> Path:
    """Write a complete checkpoint folder atomically (see module docstring)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in _raw(model).state_dict().items()}
        # Serialise in memory and write with plain file I/O, so a full disk is an OSError like any other.
        _write(tmp / WEIGHTS, save(weights, metadata={"format": "vitlab", "version": str(FORMAT_VERSION)}))
        _write(tmp / CONFIG, config_yaml.encode())
        if state is not None:
            buf = io.BytesIO()
            torch.save(state, buf)
            _write(tmp / STATE, buf.getvalue())
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": meta.model.to_dict(),
            "classes": list(meta.classes),
            "mean": list(meta.mean),
            "std": list(meta.std),
            "dataset": meta.dataset,
            "extra": meta.extra,
            "files": files,
        }
        _write(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        _fsync_dir(tmp)
        prev = folder.with_name(folder.name + ".prev")
        if folder.exists():
            if prev.exists():
                shutil.rmtree(prev)
            os.replace(folder, prev)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _raw(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # unwrap torch.compile


def read_meta(folder: Path, verify: bool = True) -> CheckpointMeta:
    """Read and check a checkpoint's manifest (and, with ``verify``, every file's checksum)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder (expected e.g. runs/<run>/best)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a vitlab checkpoint ({MANIFEST} missing)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{manifest_path}: damaged ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: unsupported checkpoint format {manifest.get('format_version') if isinstance(manifest, dict) else '?'} (this vitlab reads {FORMAT_VERSION})")
    if verify:
        for name, digest in manifest.get("files", {}).items():
            path = folder / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing from checkpoint")
            if sha256_file(path) != digest:
                raise CheckpointError(f"{path}: damaged (checksum mismatch); the file was modified or truncated")
    try:
        model_cfg = ViTConfig.from_dict(manifest["model"])
        return CheckpointMeta(model_cfg, list(manifest["classes"]), tuple(manifest["mean"]), tuple(manifest["std"]),
                              str(manifest["dataset"]), dict(manifest.get("extra", {})))
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{manifest_path}: malformed manifest ({e})") from None


def load_weights(folder: Path, model: torch.nn.Module) -> None:
    path = Path(folder) / WEIGHTS
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({e})") from None
    try:
        _raw(model).load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: weights do not fit this model ({' '.join(first[:2])[:300]})") from None


def load_state(folder: Path) -> dict:
    path = Path(folder) / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; this checkpoint holds weights only and cannot be resumed") from None
    except Exception as e:  # refused unpickling (code objects), truncation, ...
        raise CheckpointError(f"{path}: cannot load training state ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> tuple[ViT, ViTConfig]:
    """The model (in eval mode) and its config from a checkpoint folder."""
    meta = read_meta(Path(folder))
    model = ViT(meta.model)
    load_weights(Path(folder), model)
    return model.to(device).eval(), meta.model


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
        if final.exists():
            prev = run_dir / f"{name}.prev"
            if prev.exists():
                shutil.rmtree(prev)
            os.replace(final, prev)
        os.replace(intact[0], final)
        _fsync_dir(run_dir)
        intact[0] = final
    for stale in run_dir.glob(f".{name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return intact[0] if intact else None
