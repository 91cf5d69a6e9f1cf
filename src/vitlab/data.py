"""Datasets held whole in memory as uint8 tensors.

Each standard dataset is read from its official on-disk layout under a data
directory and, when absent, downloaded there (the archive verified by its
published MD5 before it is used). Files are untrusted: each is validated by its
structure with bounds taken from its own header before anything is allocated, so
a truncated, malformed or hostile file gives a :class:`DataError` naming it, never
a silently partial dataset, a traceback or an exhausted machine.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .download import RemoteFile, download_file, md5sum  # noqa: F401 (vitlab.data's API too)
from .errors import DataError
from .fileio import NotRegularFile, fsync_dir, open_regular, printable, read_bounded, temp_dir
from .images import failure_reason, read_image

TEST_FRACTION_WITHOUT_TEST_SPLIT = 0.2  # digits and folders with no test/ subfolder
SPLIT_SEED = 0  # the train/val/test carving never depends on the training seed
MAX_IDX_BYTES = 1 << 30  # an IDX file's data, from its header (MNIST's largest: 47 MB)
MAX_PICKLE_BYTES = 256 << 20  # one CIFAR pickle (CIFAR-100's train: 156 MB)
MAX_ARCHIVE_BYTES = 256 << 20  # what extracting one CIFAR archive may write (the official ones: ~187 MB)


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])

    def per_class(self, n: int) -> "ImageSet":
        """The first ``n`` images of each class, in their order (few-shot runs, quick checks)."""
        rank = torch.zeros(len(self), dtype=torch.long)  # each image's place among its class's
        for c in self.labels.unique():
            rank[self.labels == c] = torch.arange(int((self.labels == c).sum()))
        return self.subset((rank < n).nonzero().flatten())


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

    def fingerprint(self) -> dict:
        """What identifies this data: saved with every checkpoint, so that resuming on
        other files (or the same files cut differently) is noticed before it starts."""
        images, labels = hashlib.sha256(), hashlib.sha256()
        splits = [("train", self.train), ("val", self.val), ("test", self.test)]
        for _, s in splits:
            images.update(s.images.contiguous().numpy().data)
            labels.update(s.labels.contiguous().numpy().data)
        return {"dataset": self.name, "classes": list(self.classes), "image_shape": list(self.train.images.shape[1:]),
                "sizes": {name: len(s) for name, s in splits}, "val_is_test": self.val_is_test,
                "labels_sha256": labels.hexdigest(), "images_sha256": images.hexdigest(),
                "mean": list(self.mean), "std": list(self.std)}


def fingerprint_changes(saved: dict, now: dict) -> list[str]:
    """The fields of two fingerprints that differ, said the way a user reads them."""
    changes = []
    for key in saved.keys() | now.keys():
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if key == "classes" and isinstance(a, list) and isinstance(b, list):
            changes.append(f"classes ({len(a)} then, {len(b)} now)" if len(a) != len(b) else "class names")
        elif key.endswith("sha256"):
            changes.append(f"{key[:-len('_sha256')]} (different content)")
        else:
            changes.append(f"{key} ({a} then, {b} now)")
    return sorted(changes)


# ----------------------------------------------------------------- downloads (vitlab.download)

_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRROR = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

REMOTE: dict[str, list[RemoteFile]] = {
    "mnist": [
        RemoteFile(f"{n}.gz", md5, tuple(m + f"{n}.gz" for m in _MNIST_MIRRORS), size)
        for n, md5, size in zip(IDX_NAMES, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                            "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
                                (9_912_422, 28_881, 1_648_877, 4_542))
    ],
    "fashion-mnist": [
        RemoteFile(f"{n}.gz", md5, tuple(m + f"{n}.gz" for m in _FASHION_MIRROR), size)
        for n, md5, size in zip(IDX_NAMES, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                            "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
                                (26_421_880, 29_515, 4_422_102, 5_148))
    ],
    "cifar10": [RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                           ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",), 170_498_071)],
    "cifar100": [RemoteFile("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                            ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",), 169_001_437)],
}

# The files of each CIFAR archive that vitlab reads: extraction writes these and nothing else.
CIFAR_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "cifar10": ("cifar-10-batches-py", ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                                        "data_batch_5", "test_batch", "batches.meta")),
    "cifar100": ("cifar-100-python", ("train", "test", "meta")),
}


def _missing(name: str, folder: Path, what: str) -> DataError:
    urls = ", ".join(r.urls[0] for r in REMOTE[name])
    return DataError(
        f"{name} not found in {folder} ({what}) and downloading is off. "
        f"Download {urls} and put the file(s) in {folder}, or run with --download"
    )


# --------------------------------------------------------------------- memory

def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can have (MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(images: int, channels: int, size: int, what: str, copies: float = 2.0) -> None:
    """Refuse, before decoding or resizing, a dataset that will not fit in memory: ``images``
    uint8 images of channels x size x size, held ``copies`` times at the peak (the loaded
    set and its train/val/test subsets)."""
    need = int(images * channels * size * size * copies)
    free = available_memory()
    if free is not None and need > free:
        raise DataError(f"{what}: {images:,} images at {channels}x{size}x{size} need about {need / 2**30:.1f} GiB of "
                        f"memory and {free / 2**30:.1f} GiB is available; use a smaller --image-size or fewer images")


# ------------------------------------------------------------------------ IDX

def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) of unsigned bytes, checking its magic number,
    that its header describes a non-empty array of at most MAX_IDX_BYTES, and that exactly
    that many bytes follow. A gzipped file is decompressed as a stream and never past what
    its header announces, so a small file that inflates to gigabytes costs nothing."""
    kind = "image" if magic == 2051 else "label"
    try:
        with open_regular(path) as raw, (gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw) as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"{path}: only {len(head)} bytes, too short for an IDX header")
            got = int.from_bytes(head, "big")
            if got != magic:
                raise DataError(f"{path}: wrong magic number {got} (expected {magic}); not an IDX {kind} file")
            ndim = head[3]
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header")
            dims = tuple(int.from_bytes(raw_dims[4 * i: 4 * i + 4], "big") for i in range(ndim))
            expected = math.prod(dims)  # Python integers: no overflow, whatever the header says
            if dims[0] == 0:
                raise DataError(f"{path}: the header says the file holds 0 {kind}s")
            if expected == 0:
                raise DataError(f"{path}: the header describes empty {kind}s {dims}")
            if expected > MAX_IDX_BYTES:
                raise DataError(f"{path}: the header says {dims} = {expected:,} bytes of data, over the "
                                f"{MAX_IDX_BYTES:,}-byte limit; not an MNIST-style file")
            data = f.read(expected)
            trailing = f.read(1)
    except NotRegularFile as e:
        raise DataError(str(e)) from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is truncated or not gzip — delete it and download again") from None
    if len(data) != expected or trailing:
        have = f"more than {expected:,}" if trailing else f"{len(data):,}"
        raise DataError(f"{path}: header says {dims} = {expected:,} bytes of data, file has {have}; truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


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
        if len(images) != len(labels):
            raise DataError(f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} labels")
        if labels.max() > 9:
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
        ("__builtin__", "bytes"), ("builtins", "bytes"),  # protocol 2 writes an empty array's data this way
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_pickle(path: Path) -> dict:
    try:
        raw = read_bounded(path, MAX_PICKLE_BYTES)
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    try:
        d = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # truncated, not a pickle, or a forbidden global
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, found {type(d).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> ImageSet:
    d = _load_pickle(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path}: missing 'data' or '{label_key}' entry; not a CIFAR batch")
    data, labels = d["data"], d[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: expected uint8 data of shape (N, 3072), got {found}")
    if len(data) == 0:
        raise DataError(f"{path}: holds 0 images")
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError):
        raise DataError(f"{path}: '{label_key}' is not a list of class indices") from None
    if labels.dtype.kind not in "iu":  # floats (NaN among them), bools, strings, mixed objects
        raise DataError(f"{path}: '{label_key}' must hold whole class indices, found {labels.dtype} values")
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {labels.size} labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise DataError(f"{path}: label {bad} out of range 0..{num_classes - 1}")
    return ImageSet(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64)))


def _names(path: Path, key: str, count: int) -> list[str]:
    names = _load_pickle(path).get(key)
    if not isinstance(names, list) or len(names) != count or \
            not all(isinstance(n, (bytes, str)) and 0 < len(n) <= 200 for n in names):
        raise DataError(f"{path}: expected {count} class names (each 1 to 200 characters) under '{key}'")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def extract_members(archive: Path, dest: Path, folder: str, wanted: Sequence[str],
                    limit: int = MAX_ARCHIVE_BYTES) -> Path:
    """Write the regular files ``folder/<name>`` (``name`` in ``wanted``) of a tar archive
    into ``dest/folder/``, and nothing else; returns that folder.

    Output paths are built here from the allow-list, never taken from the archive, so no
    member can land outside ``dest`` whatever this Python's ``tarfile`` filters do. A wanted
    name that is a link, device or folder, one that appears twice or is missing, or more
    than ``limit`` bytes in all, refuse the archive."""
    out = dest / folder
    out.mkdir()
    written, total = set(), 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = member.name.strip("/").split("/")
                if len(parts) != 2 or parts[0] != folder or parts[1] not in wanted:
                    continue  # not a file vitlab reads: never written
                if not member.isreg():
                    raise DataError(f"{archive}: {member.name} is not a regular file (a link or device); refusing the archive")
                if parts[1] in written:
                    raise DataError(f"{archive}: {member.name} appears twice; refusing the archive")
                total += member.size
                if total > limit:
                    raise DataError(f"{archive}: its files hold more than the {limit:,}-byte limit; refusing the archive")
                source = tar.extractfile(member)
                with source, open(out / parts[1], "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)  # a regular member yields exactly member.size bytes
                    sink.flush()
                    os.fsync(sink.fileno())
                written.add(parts[1])
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{archive}: cannot extract ({e}); the archive is truncated or corrupt — delete it and download again") from None
    missing = [n for n in wanted if n not in written]
    if missing:
        raise DataError(f"{archive}: does not contain {folder}/{missing[0]}; not the official archive")
    return out


def _ensure_cifar(name: str, data_dir: Path, download: bool) -> Path:
    """The dataset's folder under ``data_dir``, extracted from its archive when only that is
    there. The archive, found or downloaded, must have the published MD5 before anything
    is extracted; extraction goes to a temporary folder inside ``data_dir`` that is renamed
    into place, so a second process extracting at the same time finds one whole folder."""
    folder_name, wanted = CIFAR_FILES[name]
    folder = data_dir / folder_name
    if folder.is_dir():
        return folder
    remote = REMOTE[name][0]
    archive = data_dir / remote.filename
    if not archive.is_file():
        if not download:
            raise _missing(name, data_dir, f"expected {folder_name}/ or {archive.name}")
        archive = download_file(remote, data_dir)
    digest = md5sum(archive)
    if digest != remote.md5:
        raise DataError(f"{archive}: md5 {digest} is not the published {remote.md5} of the official archive; "
                        f"refusing to extract it. Delete it to download the official one, or extract it yourself "
                        f"into {folder}")
    tmp = temp_dir(data_dir, ".extract-")
    try:
        extracted = extract_members(archive, tmp, folder_name, wanted)
        try:
            os.rename(extracted, folder)  # the folder appears whole or not at all
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not folder.is_dir():
                raise
            # another process extracted the same archive first: its folder is whole
        fsync_dir(data_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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

DIGITS_SHAPE = (1797, 65)  # 8x8 pixel values 0..16, then the label


def digits_table() -> np.ndarray:
    """scikit-learn's digits.csv.gz, read where scikit-learn keeps it without importing it (an
    import costs about a second of every run's start-up); through scikit-learn where the file
    is not there, or not as it should be."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        try:
            with gzip.open(Path(root) / "datasets" / "data" / "digits.csv.gz", "rt") as f:
                table = np.loadtxt(f, delimiter=",")
        except (OSError, ValueError, EOFError):
            continue
        if table.shape == DIGITS_SHAPE and np.isin(table, np.arange(17)).all() and (table[:, -1] <= 9).all():
            return table
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return np.concatenate([d.data, d.target[:, None]], axis=1)


def load_digits() -> tuple[ImageSet, list[str]]:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16): works offline anywhere."""
    table = digits_table()
    images = np.round(table[:, :-1].reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(table[:, -1].astype(np.int64))), [str(i) for i in range(10)]


# --------------------------------------------------------------------- folder

def _visible(paths) -> list[Path]:
    return sorted(p for p in paths if not p.name.startswith("."))


def _class_dirs(root: Path) -> list[Path]:
    return _visible(p for p in root.iterdir() if p.is_dir())


def _image_files(folder: Path) -> list[Path]:
    return _visible(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def load_image_tree(root: Path, image_size: int, class_dirs: Sequence[str] | None = None,
                    warn: Callable[[str], None] = print) -> tuple[ImageSet, list[str]]:
    """One subfolder per class; every file in a raster format (:mod:`vitlab.images`) is
    resized to ``image_size`` and converted to RGB. Unreadable files are named and skipped.

    ``class_dirs``: the class folders' own names (as the file system spells them) to read,
    in label order; default: every subfolder of ``root``. Returns the images and the class
    names as they can be printed (a folder name that is not UTF-8 shows U+FFFD)."""
    if class_dirs is None:
        class_dirs = [d.name for d in _class_dirs(root)]
        if len(class_dirs) < 2:
            raise DataError(f"{printable(root)}: found {len(class_dirs)} class folder(s); a classifier needs at "
                            f"least 2 (one subfolder per class)")
    classes = [printable(c) for c in class_dirs]
    if len(set(classes)) < len(classes):
        raise DataError(f"{printable(root)}: two class folders have names that print the same "
                        f"({sorted(c for c in classes if classes.count(c) > 1)[0]!r}); rename one")
    listing = [_image_files(root / c) for c in class_dirs]
    total = sum(len(files) for files in listing)
    check_memory(total, 3, image_size, printable(root))
    images = np.empty((total, 3, image_size, image_size), dtype=np.uint8)  # filled in place: no second copy
    labels, skipped, notes = [], [], []
    for label, (cls, files) in enumerate(zip(class_dirs, listing)):
        count = 0
        for path in files:
            try:
                images[len(labels)] = read_image(path, "RGB", image_size, notes).transpose(2, 0, 1)
            except (OSError, ValueError) as e:  # ImageRefused is a ValueError; Pillow raises both
                skipped.append(f"{printable(path)} ({failure_reason(e)})")
                continue
            labels.append(label)
            count += 1
        if count == 0 and (root / cls).is_dir():
            raise DataError(f"{printable(root / cls)}: class folder holds no readable image; add images or remove the folder")
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warn(f"skipped {len(skipped)} unreadable file(s) under {printable(root)}: {shown}")
    for note in sorted(set(notes)):
        warn(f"note: {notes.count(note)} image(s) under {printable(root)}: {note}")
    if not labels:
        raise DataError(f"{printable(root)}: no readable images")
    return ImageSet(torch.from_numpy(images[: len(labels)]), torch.tensor(labels, dtype=torch.int64)), classes


def load_folder(root: Path, image_size: int, warn: Callable[[str], None] = print) -> tuple[ImageSet, ImageSet | None, ImageSet | None, list[str]]:
    """``root/<class>/*`` or ``root/{train,val,test}/<class>/*``: returns train, val, test (or None) and class names."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; pass --data-dir pointing at a folder with one subfolder per class")
    if not (root / "train").is_dir():
        train, classes = load_image_tree(root, image_size, warn=warn)
        return train, None, None, classes
    class_dirs = [d.name for d in _class_dirs(root / "train")]
    train, classes = load_image_tree(root / "train", image_size, warn=warn)
    val, test = ((load_image_tree(root / part, image_size, class_dirs, warn)[0] if (root / part).is_dir() else None)
                 for part in ("val", "test"))
    return train, val, test, classes


# --------------------------------------------------------------------- splits

def carve(data: ImageSet, size: float, seed: int = SPLIT_SEED) -> tuple[ImageSet, ImageSet]:
    """Split off ``size`` (a fraction < 1, or a count) of ``data`` with a fixed seed: (rest, carved)."""
    n = len(data)
    k = int(round(size * n)) if size < 1 else int(size)
    if not 0 < k < n:
        raise DataError(f"cannot hold out {k} of {n} images; choose a --val-size between 0 and {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data.subset(perm[k:].sort().values), data.subset(perm[:k].sort().values)


CHUNK = 1024  # images per step of the passes below: bounded float copies, not one of the whole set


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 batch, a chunk at a time."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty(len(images), images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, len(images), CHUNK):
        x = torch.nn.functional.interpolate(images[i: i + CHUNK].float(), size=(size, size), mode="bilinear",
                                            antialias=True, align_corners=False)
        out[i: i + CHUNK] = x.round_().clamp_(0, 255)
    return out


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) standard deviation of uint8 images scaled to [0, 1],
    accumulated in float64 a chunk at a time (a float64 copy of CIFAR would be 1.2 GB)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for i in range(0, len(images), CHUNK):
        x = images[i: i + CHUNK].double().div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square_().sum(dim=(0, 2, 3))
    n = images.numel() // images.shape[1]
    mean = total / n
    std = ((squares - n * mean.square()) / max(1, n - 1)).clamp_min(0).sqrt().clamp_min(1e-3)
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

    if image_size is not None and name != "folder":  # folder images are decoded at this size
        check_memory(len(train) + len(test), train.images.shape[1], image_size, f"{name} at --image-size {image_size}")
        train = ImageSet(resize_images(train.images, image_size), train.labels)
        test = ImageSet(resize_images(test.images, image_size), test.labels)
    val_is_test = False
    if val is None:
        if val_size == 0:
            val, val_is_test = test, True
        else:
            train, val = carve(train, val_size)
    mean, std = channel_stats(train.images)
    return DatasetSplits(name, list(classes), train, val, test, val_is_test, mean, std)
