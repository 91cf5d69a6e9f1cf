"""Datasets held whole in memory as uint8 tensors.

Each standard dataset is read from its official on-disk layout under a data
directory and, when absent, downloaded there (the archive verified by its
published MD5 before it is used). Files are validated by their structure, so a
truncated or malformed file gives a :class:`DataError` naming it, never a
silently partial dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
TEST_FRACTION_WITHOUT_TEST_SPLIT = 0.2  # digits and folders with no test/ subfolder
SPLIT_SEED = 0  # the train/val/test carving never depends on the training seed


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])


@dataclass
class DatasetSplits:
    name: str
    classes: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    val_is_test: bool
    mean: tuple[float, ...]  # per channel, of the training images scaled to [0, 1]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


# ----------------------------------------------------------------- downloads

@dataclass(frozen=True)
class RemoteFile:
    filename: str
    md5: str
    urls: tuple[str, ...]


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRROR = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

REMOTE: dict[str, list[RemoteFile]] = {
    "mnist": [
        RemoteFile(f"{n}.gz", md5, tuple(m + f"{n}.gz" for m in _MNIST_MIRRORS))
        for n, md5 in zip(IDX_NAMES, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                      "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"))
    ],
    "fashion-mnist": [
        RemoteFile(f"{n}.gz", md5, tuple(m + f"{n}.gz" for m in _FASHION_MIRROR))
        for n, md5 in zip(IDX_NAMES, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                      "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))
    ],
    "cifar10": [RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                           ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",))],
    "cifar100": [RemoteFile("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                            ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",))],
}


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(remote: RemoteFile, folder: Path, attempts: int = 2, timeout: float = 30.0) -> Path:
    """Fetch ``remote`` into ``folder``: stream to a temporary file, verify the
    MD5, and only then rename it into place. A bad or interrupted download is
    retried (each mirror, ``attempts`` times) and never left under its final name."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / remote.filename
    errors: list[str] = []
    for url in remote.urls:
        for _ in range(attempts):
            fd, tmp_name = tempfile.mkstemp(prefix=f".{remote.filename}.", suffix=".part", dir=folder)
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                    total = int(resp.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {remote.filename}", leave=False) as bar:
                        for chunk in iter(lambda: resp.read(1 << 16), b""):
                            out.write(chunk)
                            bar.update(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
                got = md5sum(tmp)
                if got != remote.md5:
                    errors.append(f"{url}: checksum mismatch (md5 {got}, expected {remote.md5})")
                    continue
                os.replace(tmp, final)
                return final
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:  # e.g. IncompleteRead
                errors.append(f"{url}: {getattr(e, 'reason', e)}")
            finally:
                tmp.unlink(missing_ok=True)
    raise DataError(
        f"could not download {remote.filename} into {folder} ({'; '.join(errors[-3:])}). "
        f"Download it yourself from {remote.urls[0]} (md5 {remote.md5}) and put it in {folder}"
    )


def _missing(name: str, folder: Path, what: str) -> DataError:
    urls = ", ".join(r.urls[0] for r in REMOTE[name])
    return DataError(
        f"{name} not found in {folder} ({what}) and downloading is off. "
        f"Download {urls} and put the file(s) in {folder}, or run with --download"
    )


# ------------------------------------------------------------------------ IDX

def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) of unsigned bytes, checking its
    magic number and that the data length matches the header."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is truncated or not gzip — delete it and download again") from None
    if len(raw) < 8:
        raise DataError(f"{path}: only {len(raw)} bytes, too short for an IDX header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DataError(f"{path}: wrong magic number {got} (expected {magic}); not an IDX {'image' if magic == 2051 else 'label'} file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: header says {dims} = {expected} bytes of data, file has {len(raw) - header}; truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx_folder(candidates: Sequence[Path]) -> Path | None:
    for folder in candidates:
        if all(_idx_path(folder, n) is not None for n in IDX_NAMES):
            return folder
    return None


def _idx_path(folder: Path, stem: str) -> Path | None:
    for p in (folder / f"{stem}.gz", folder / stem):
        if p.is_file():
            return p
    return None


def load_idx_dataset(name: str, data_dir: Path, download: bool) -> tuple[ImageSet, ImageSet]:
    """MNIST or Fashion-MNIST from ``<data_dir>/<name>/`` or torchvision's ``<data_dir>/<MNIST|FashionMNIST>/raw/``."""
    tv_name = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    candidates = [data_dir / name, data_dir / tv_name / "raw", data_dir]
    folder = _find_idx_folder(candidates)
    if folder is None:
        if not download:
            raise _missing(name, data_dir / name, "expected the four IDX .gz files")
        folder = data_dir / name
        for remote in REMOTE[name]:
            if _idx_path(folder, remote.filename[:-3]) is None:
                download_file(remote, folder)

    def split(prefix: str) -> ImageSet:
        img_path = _idx_path(folder, f"{prefix}-images-idx3-ubyte")
        lbl_path = _idx_path(folder, f"{prefix}-labels-idx1-ubyte")
        images = read_idx(img_path, 2051)
        labels = read_idx(lbl_path, 2049)
        if images.ndim != 3:
            raise DataError(f"{img_path}: expected N x H x W images, got shape {images.shape}")
        if labels.ndim != 1:
            raise DataError(f"{lbl_path}: expected a vector of labels, got shape {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} labels")
        if len(labels) and labels.max() > 9:
            raise DataError(f"{lbl_path}: label {labels.max()} out of range 0..9")
        return ImageSet(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))

    return split("train"), split("t10k")


MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


# ---------------------------------------------------------------------- CIFAR

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain data and numpy arrays: a crafted CIFAR 'batch'
    cannot run code while it is read."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except Exception as e:  # truncated, not a pickle, or a forbidden global
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, found {type(d).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> ImageSet:
    d = _load_pickle(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path}: missing 'data' or '{label_key}' entry; not a CIFAR batch")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {labels.size} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: label {labels.max()} out of range 0..{num_classes - 1}")
    return ImageSet(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64)))


def _names(path: Path, key: str, count: int) -> list[str]:
    names = _load_pickle(path).get(key)
    if not isinstance(names, list) or len(names) != count:
        raise DataError(f"{path}: expected {count} entries under '{key}'")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _safe_extract(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(dest, filter="data")  # refuses absolute paths, '..' and links out of dest
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive}: cannot extract ({e}); the archive is truncated or corrupt — delete it and download again") from None


def _ensure_cifar(name: str, data_dir: Path, download: bool) -> Path:
    folder_name = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    folder = data_dir / folder_name
    if folder.is_dir():
        return folder
    archive = data_dir / REMOTE[name][0].filename
    if not archive.is_file():
        if not download:
            raise _missing(name, data_dir, f"expected {folder_name}/ or {archive.name}")
        archive = download_file(REMOTE[name][0], data_dir)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".extract-") as tmp:
        _safe_extract(archive, Path(tmp))
        if not (Path(tmp) / folder_name).is_dir():
            raise DataError(f"{archive}: does not contain {folder_name}/")
        os.replace(Path(tmp) / folder_name, folder)  # the folder appears whole or not at all
    return folder


def load_cifar10(data_dir: Path, download: bool) -> tuple[ImageSet, ImageSet, list[str]]:
    folder = _ensure_cifar("cifar10", data_dir, download)
    parts = [_cifar_batch(folder / f"data_batch_{i}", "labels", 10) for i in range(1, 6)]
    train = ImageSet(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))
    test = _cifar_batch(folder / "test_batch", "labels", 10)
    return train, test, _names(folder / "batches.meta", "label_names", 10)


def load_cifar100(data_dir: Path, download: bool, coarse: bool = False) -> tuple[ImageSet, ImageSet, list[str]]:
    folder = _ensure_cifar("cifar100", data_dir, download)
    key, n = ("coarse_labels", 20) if coarse else ("fine_labels", 100)
    train = _cifar_batch(folder / "train", key, n)
    test = _cifar_batch(folder / "test", key, n)
    return train, test, _names(folder / "meta", f"{key[:-len('_labels')]}_label_names", n)


# --------------------------------------------------------------------- digits

def load_digits() -> tuple[ImageSet, list[str]]:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16): works offline anywhere."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return ImageSet(torch.from_numpy(images), torch.from_numpy(d.target.astype(np.int64))), [str(i) for i in range(10)]


# --------------------------------------------------------------------- folder

def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_image_tree(root: Path, image_size: int, classes: list[str] | None = None,
                    warn: Callable[[str], None] = print) -> tuple[ImageSet, list[str]]:
    """One subfolder per class; every file Pillow can read is resized to
    ``image_size`` and converted to RGB. Unreadable files are named and skipped."""
    from PIL import Image, UnidentifiedImageError

    dirs = _class_dirs(root)
    if classes is None:
        classes = [d.name for d in dirs]
        if len(classes) < 2:
            raise DataError(f"{root}: found {len(classes)} class folder(s); a classifier needs at least 2 (one subfolder per class)")
    images, labels, skipped = [], [], []
    for label, cls in enumerate(classes):
        folder = root / cls
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else []
        count = 0
        for path in files:
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
                    images.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
                skipped.append(f"{path} ({type(e).__name__})")
                continue
            labels.append(label)
            count += 1
        if count == 0 and folder.is_dir():
            raise DataError(f"{folder}: class folder holds no readable image; add images or remove the folder")
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warn(f"skipped {len(skipped)} unreadable file(s) under {root}: {shown}")
    if not images:
        raise DataError(f"{root}: no readable images")
    return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)), classes


def load_folder(root: Path, image_size: int, warn: Callable[[str], None] = print) -> tuple[ImageSet, ImageSet | None, ImageSet | None, list[str]]:
    """``root/<class>/*`` or ``root/{train,val,test}/<class>/*``: returns train, val, test (or None) and class names."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; pass --data-dir pointing at a folder with one subfolder per class")
    if (root / "train").is_dir():
        train, classes = load_image_tree(root / "train", image_size, warn=warn)
        val = load_image_tree(root / "val", image_size, classes, warn)[0] if (root / "val").is_dir() else None
        test = load_image_tree(root / "test", image_size, classes, warn)[0] if (root / "test").is_dir() else None
        return train, val, test, classes
    train, classes = load_image_tree(root, image_size, warn=warn)
    return train, None, None, classes


# --------------------------------------------------------------------- splits

def carve(data: ImageSet, size: float, seed: int = SPLIT_SEED) -> tuple[ImageSet, ImageSet]:
    """Split off ``size`` (a fraction < 1, or a count) of ``data`` with a fixed seed: (rest, carved)."""
    n = len(data)
    k = int(round(size * n)) if size < 1 else int(size)
    if not 0 < k < n:
        raise DataError(f"cannot hold out {k} of {n} images; choose a --val-size between 0 and {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data.subset(perm[k:].sort().values), data.subset(perm[:k].sort().values)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.double().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def load_dataset(name: str, data_dir: str | Path, *, val_size: float = 0.1, image_size: int | None = None,
                 download: bool = True, coarse_labels: bool = False, warn: Callable[[str], None] = print) -> DatasetSplits:
    """Load ``name`` with train / val / test splits. ``val_size == 0`` uses the test set as validation."""
    data_dir = Path(data_dir).expanduser()
    val: ImageSet | None = None
    if name in ("mnist", "fashion-mnist"):
        train, test = load_idx_dataset(name, data_dir, download)
        classes = MNIST_CLASSES if name == "mnist" else FASHION_CLASSES
    elif name == "cifar10":
        train, test, classes = load_cifar10(data_dir, download)
    elif name == "cifar100":
        train, test, classes = load_cifar100(data_dir, download, coarse_labels)
    elif name == "digits":
        everything, classes = load_digits()
        train, test = carve(everything, TEST_FRACTION_WITHOUT_TEST_SPLIT)
    elif name == "folder":
        train, val, test, classes = load_folder(data_dir, image_size or 32, warn)
        if test is None:
            train, test = carve(train, TEST_FRACTION_WITHOUT_TEST_SPLIT)
    else:
        raise DataError(f"unknown dataset {name!r}")

    if image_size is not None:
        train = ImageSet(resize_images(train.images, image_size), train.labels)
        test = ImageSet(resize_images(test.images, image_size), test.labels)
        if val is not None:
            val = ImageSet(resize_images(val.images, image_size), val.labels)
    val_is_test = False
    if val is None:
        if val_size == 0:
            val, val_is_test = test, True
        else:
            train, val = carve(train, val_size)
    mean, std = channel_stats(train.images)
    return DatasetSplits(name, list(classes), train, val, test, val_is_test, mean, std)
