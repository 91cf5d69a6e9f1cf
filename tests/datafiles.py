"""Writers for small datasets in the official on-disk formats, for tests."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np

from vitlab.data import IDX_NAMES


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dataset(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True, seed: int = 0,
                      size: int = 28) -> dict[str, np.ndarray]:
    """Four MNIST-format files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        IDX_NAMES[0]: rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        IDX_NAMES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        IDX_NAMES[2]: rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        IDX_NAMES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        raw = idx_bytes(arr, 2051 if arr.ndim == 3 else 2049)
        path = folder / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(data_dir: Path, per_batch: int = 12, seed: int = 0, as_tarball: bool = False) -> dict:
    """cifar-10-batches-py/ (or the .tar.gz holding it) with small batches."""
    rng = np.random.default_rng(seed)
    root = data_dir / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        _dump(root / name, {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                            b"filenames": [f"f{i}.png".encode() for i in range(per_batch)]})
        written[name] = (data, labels)
    _dump(root / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)],
                                  b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    if as_tarball:
        _tar(root, data_dir / "cifar-10-python.tar.gz")
    return written


def write_cifar100(data_dir: Path, n: int = 30, seed: int = 0, as_tarball: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    root = data_dir / "cifar-100-python"
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in ("train", "test"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(x) for x in rng.integers(0, 100, n)]
        coarse = [f // 5 for f in fine]
        _dump(root / name, {b"batch_label": name.encode(), b"fine_labels": fine, b"coarse_labels": coarse,
                            b"data": data, b"filenames": [b"x.png"] * n})
        written[name] = (data, fine, coarse)
    _dump(root / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                          b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    if as_tarball:
        _tar(root, data_dir / "cifar-100-python.tar.gz")
    return written


def _tar(folder: Path, archive: Path) -> None:
    import shutil

    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    shutil.rmtree(folder)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def trust_archive(monkeypatch, name: str, archive: Path) -> None:
    """Make ``archive`` the 'official' archive of dataset ``name`` for this test: vitlab
    extracts only archives whose MD5 it knows, and a test's own archive is not CIFAR's."""
    from vitlab import data as vdata

    official = vdata.REMOTE[name][0]
    monkeypatch.setitem(vdata.REMOTE, name, [vdata.RemoteFile(official.filename, md5(archive), official.urls,
                                                              archive.stat().st_size)])


def forge_manifest(folder: Path, edit=None) -> None:
    """Edit a checkpoint's model.json (``edit(manifest)``) and forge every checksum so that they
    match again, its own included: what someone who edits the folder on purpose would do (the
    checks after the checksums must still catch what is wrong)."""
    import json

    from vitlab.checkpoint import SELF_DIGEST, manifest_digest, sha256_file

    path = Path(folder) / "model.json"
    manifest = json.loads(path.read_text())
    if edit is not None:
        edit(manifest)
    manifest["files"] = {name: sha256_file(Path(folder) / name) for name in manifest.get("files", {})}
    manifest[SELF_DIGEST] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


def metrics_but_the_clock(run: Path) -> list[dict]:
    """A run's metrics.csv rows without its training-clock column (the one thing two runs of the
    same config never share), which every row must have."""
    from vitlab.report import read_metrics

    rows = read_metrics(Path(run) / "metrics.csv")
    assert rows and all(r.pop("seconds") >= 0 for r in rows)
    return rows
