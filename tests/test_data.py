import functools
import gzip
import http.server
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab import data as vdata
from vitlab.data import RemoteFile, load_dataset
from vitlab.errors import DataError

from .datafiles import idx_bytes, md5, trust_archive, write_cifar10, write_cifar100, write_idx_dataset


# ------------------------------------------------------------ real datasets

def test_real_mnist(real_data):
    d = load_dataset("mnist", real_data, val_size=5000, download=False)
    assert (len(d.train), len(d.val), len(d.test)) == (55000, 5000, 10000)
    assert d.train.images.dtype == torch.uint8 and d.train.images.shape[1:] == (1, 28, 28)
    assert d.classes == [str(i) for i in range(10)]
    # The official test set starts 7 2 1 0 4; all ten digits appear ~1,000 times.
    assert d.test.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(d.test.labels).min() > 850
    assert d.mean[0] == pytest.approx(0.1307, abs=2e-3)


def test_real_fashion_mnist_through_torchvision_layout(real_data, tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (real_data / "fashion-mnist").iterdir():  # torchvision keeps them un-gzipped
        (raw / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    d = load_dataset("fashion-mnist", tmp_path, val_size=0, download=False)
    assert d.val_is_test and len(d.train) == 60000 and len(d.test) == 10000
    assert d.train.labels[:5].tolist() == [9, 0, 0, 3, 0]
    assert d.classes[9] == "Ankle boot"


def test_real_cifar10(real_data):
    d = load_dataset("cifar10", real_data, val_size=0, download=False)
    assert d.train.images.shape == (50000, 3, 32, 32) and len(d.test) == 10000
    assert d.train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert d.classes[:3] == ["airplane", "automobile", "bird"]
    assert d.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=1e-4)
    assert d.std == pytest.approx((0.2470, 0.2435, 0.2616), abs=1e-4)


def test_real_cifar100_fine_and_coarse(real_data):
    fine = load_dataset("cifar100", real_data, val_size=0, download=False)
    assert len(fine.classes) == 100 and fine.classes[0] == "apple"
    assert fine.train.labels[:10].tolist() == [19, 29, 0, 11, 1, 86, 90, 28, 23, 31]
    assert fine.test.labels[:5].tolist() == [49, 33, 72, 51, 71]
    coarse = load_dataset("cifar100", real_data, val_size=0, download=False, coarse_labels=True)
    assert len(coarse.classes) == 20 and coarse.classes[0] == "aquatic_mammals"
    assert coarse.train.labels[:5].tolist() == [11, 15, 4, 14, 1]
    assert torch.equal(fine.train.images[:100], coarse.train.images[:100])


def test_validation_split_is_fixed_and_disjoint(real_data):
    a = load_dataset("mnist", real_data, val_size=0.1, download=False)
    b = load_dataset("mnist", real_data, val_size=0.1, download=False)
    assert torch.equal(a.val.labels, b.val.labels) and len(a.val) == 6000 and len(a.train) == 54000
    # Every training image lands in exactly one of train and val: compare pixel sums as multisets.
    full = load_dataset("mnist", real_data, val_size=0, download=False)
    sums = lambda s: sorted(s.images.flatten(1).sum(1).tolist())  # noqa: E731
    assert sorted(sums(a.train) + sums(a.val)) == sums(full.train)


# ------------------------------------------------------- small official files

@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_round_trip(tmp_path, gz):
    arrays = write_idx_dataset(tmp_path / "mnist", gz=gz)
    d = load_dataset("mnist", tmp_path, val_size=0, download=False)
    assert np.array_equal(d.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(d.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_cifar10_tarball_is_extracted_and_read(tmp_path, monkeypatch):
    written = write_cifar10(tmp_path, as_tarball=True)
    trust_archive(monkeypatch, "cifar10", tmp_path / "cifar-10-python.tar.gz")
    assert not (tmp_path / "cifar-10-batches-py").exists()
    d = load_dataset("cifar10", tmp_path, val_size=0, download=False)
    assert (tmp_path / "cifar-10-batches-py").is_dir()
    assert len(d.train) == 5 * 12 and d.classes[3] == "class3"
    data, labels = written["data_batch_2"]
    # Row layout: 1024 R, then 1024 G, then 1024 B values, row-major.
    img = d.train.images[12]
    assert torch.equal(img[1].flatten(), torch.from_numpy(data[0, 1024:2048]))
    assert d.train.labels[12:24].tolist() == labels


def test_cifar100_tarball(tmp_path, monkeypatch):
    written = write_cifar100(tmp_path, as_tarball=True)
    trust_archive(monkeypatch, "cifar100", tmp_path / "cifar-100-python.tar.gz")
    d = load_dataset("cifar100", tmp_path, val_size=0, download=False, coarse_labels=True)
    assert d.train.labels.tolist() == written["train"][2] and d.classes[1] == "coarse1"


def test_image_size_option_resizes(tmp_path):
    write_idx_dataset(tmp_path / "mnist")
    d = load_dataset("mnist", tmp_path, val_size=0, download=False, image_size=32)
    assert d.train.images.shape[-2:] == (32, 32) and d.train.images.dtype == torch.uint8


def test_digits_dataset_is_real_and_offline():
    d = load_dataset("digits", "unused", val_size=0.1)
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    assert d.train.images.shape[1:] == (1, 8, 8) and int(d.train.images.max()) == 255


def test_digits_are_read_without_importing_scikit_learn_and_equal_its_own(monkeypatch):
    """The file scikit-learn ships, read directly, is what its load_digits returns; where the
    file is damaged, vitlab goes through scikit-learn instead."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits as sk_digits

    from vitlab import data

    code = "import sys; from vitlab.data import load_digits; load_digits(); print('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    images, classes = data.load_digits()
    d = sk_digits()
    assert torch.equal(images.labels, torch.from_numpy(d.target.astype(np.int64))) and classes == list("0123456789")
    assert torch.equal(images.images, torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8)[:, None]))
    monkeypatch.setattr(data, "DIGITS_SHAPE", (1797, 64))  # as if the file were not what it should be
    assert torch.equal(data.load_digits()[0].images, images.images)


# ----------------------------------------------------------- broken inputs

def _corrupt(path: Path, data: bytes) -> None:
    path.write_bytes(gzip.compress(data))


@pytest.mark.parametrize("case, message", [
    ("truncated_gzip", "truncated or not gzip"),
    ("wrong_magic", "wrong magic number"),
    ("short_data", "truncated or corrupt"),
    ("count_mismatch", "holds 40 images but"),
    ("label_range", "out of range"),
])
def test_broken_idx_files_name_the_file(tmp_path, case, message):
    write_idx_dataset(tmp_path / "mnist")
    images = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    labels = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    if case == "truncated_gzip":
        images.write_bytes(images.read_bytes()[:500])
    elif case == "wrong_magic":
        _corrupt(images, idx_bytes(np.zeros((40, 28, 28), np.uint8), 2049))
    elif case == "short_data":
        _corrupt(images, idx_bytes(np.zeros((40, 28, 28), np.uint8), 2051)[:-100])
    elif case == "count_mismatch":
        _corrupt(labels, idx_bytes(np.zeros(39, np.uint8), 2049))
    elif case == "label_range":
        _corrupt(labels, idx_bytes(np.full(40, 12, np.uint8), 2049))
    with pytest.raises(DataError, match=message) as e:
        load_dataset("mnist", tmp_path, download=False)
    assert "train-" in str(e.value)


def test_truncated_cifar_pickle(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path, download=False)


def test_cifar_batch_with_wrong_shape(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({b"data": np.zeros((5, 100), np.uint8), b"labels": [0] * 5}, protocol=2))
    with pytest.raises(DataError, match=r"test_batch: expected uint8 data of shape \(N, 3072\)"):
        load_dataset("cifar10", tmp_path, download=False)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/vitlab-pwned"),))


def test_cifar_pickle_with_code_is_refused_and_never_runs(tmp_path):
    Path("/tmp/vitlab-pwned").unlink(missing_ok=True)
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps({b"data": _Payload()}))
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset("cifar10", tmp_path, download=False)
    assert not Path("/tmp/vitlab-pwned").exists()


def test_corrupt_tarball(tmp_path, monkeypatch):
    write_cifar10(tmp_path, as_tarball=True)
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:2000])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: md5 .* is not the published"):
        load_dataset("cifar10", tmp_path, download=False)
    trust_archive(monkeypatch, "cifar10", archive)  # a truncated archive that passes the checksum: caught on reading
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: cannot extract"):
        load_dataset("cifar10", tmp_path, download=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]  # nothing half-extracted left


def test_missing_dataset_offline_says_what_to_download(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", tmp_path, download=False)
    msg = str(e.value)
    assert "cifar-100-python.tar.gz" in msg and str(tmp_path) in msg


# ----------------------------------------------------------------- download

@pytest.fixture
def http_dir(tmp_path):
    """A folder served over HTTP on 127.0.0.1; yields (folder, base_url)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_verifies_checksum_then_loads(tmp_path, http_dir, monkeypatch):
    served, url = http_dir
    write_idx_dataset(served)
    remotes = [RemoteFile(p.name, md5(p), (url + p.name,), p.stat().st_size) for p in sorted(served.iterdir())]
    monkeypatch.setitem(vdata.REMOTE, "mnist", remotes)
    d = load_dataset("mnist", tmp_path / "data", download=True, val_size=0)
    assert len(d.train) == 40
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(p.name for p in served.iterdir())


def test_download_with_bad_checksum_is_refused_and_not_kept(tmp_path, http_dir, monkeypatch):
    served, url = http_dir
    write_cifar10(served, as_tarball=True)
    bad = RemoteFile("cifar-10-python.tar.gz", "0" * 32, (url + "cifar-10-python.tar.gz",),
                     (served / "cifar-10-python.tar.gz").stat().st_size)
    monkeypatch.setitem(vdata.REMOTE, "cifar10", [bad])
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("cifar10", tmp_path / "data", download=True)
    assert list((tmp_path / "data").iterdir()) == []  # neither the archive nor a temporary file remains


def test_download_from_unreachable_host_gives_clear_error(tmp_path, monkeypatch):
    dead = RemoteFile("cifar-10-python.tar.gz", "0" * 32, ("http://127.0.0.1:9/cifar-10-python.tar.gz",), 1000)
    monkeypatch.setitem(vdata.REMOTE, "cifar10", [dead])
    with pytest.raises(DataError, match="could not download cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path, download=True)


# ------------------------------------------------------------------- folder

def _image_tree(root: Path, classes=("cat", "dog"), per_class=6, size=20) -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_folder_dataset_resizes_and_reports_unreadable(tmp_path):
    _image_tree(tmp_path)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    Image.new("L", (9, 9)).save(tmp_path / "dog" / "gray.jpg")
    warnings = []
    d = load_dataset("folder", tmp_path, image_size=16, val_size=2, warn=warnings.append)
    assert d.classes == ["cat", "dog"]
    assert len(d.train) + len(d.val) + len(d.test) == 13 and d.train.images.shape[1:] == (3, 16, 16)
    assert len(warnings) == 1 and "skipped 1 unreadable" in warnings[0] and "notes.txt" in warnings[0]


def test_folder_with_train_and_test_subfolders(tmp_path):
    _image_tree(tmp_path / "train")
    _image_tree(tmp_path / "test", per_class=2)
    d = load_dataset("folder", tmp_path, image_size=8, val_size=0)
    assert len(d.train) == 12 and len(d.test) == 4 and d.val_is_test


def test_folder_with_one_class_or_an_empty_class(tmp_path):
    _image_tree(tmp_path / "one", classes=("only",))
    with pytest.raises(DataError, match="at least 2"):
        load_dataset("folder", tmp_path / "one")
    _image_tree(tmp_path / "two")
    (tmp_path / "two" / "empty").mkdir()
    with pytest.raises(DataError, match="empty: class folder holds no readable image"):
        load_dataset("folder", tmp_path / "two")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("folder", tmp_path / "nowhere")
