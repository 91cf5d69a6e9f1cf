"""Property-based tests: any input gives a result or the project's own error,
never another exception and never a hang."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitlab.config import TrainConfig
from vitlab.data import _cifar_batch, extract_members, read_idx
from vitlab.errors import ConfigError, DataError

from ..datafiles import idx_bytes

FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])

values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.floats(-3, 3), max_size=3))
field_names = st.sampled_from([f for f in TrainConfig.__dataclass_fields__] + ["bogus_key"])


@FAST
@given(st.dictionaries(field_names, values, max_size=6))
def test_any_config_mapping_is_valid_or_a_config_error(d):
    try:
        cfg = TrainConfig.from_dict(d).validate()
    except ConfigError as e:
        assert str(e)  # a message, on one line
        assert "\n" not in str(e)
        return
    assert cfg.epochs >= 1 and cfg.lr > 0 and cfg.dim % cfg.heads == 0


@FAST
@given(st.integers(1, 64), st.integers(1, 64), st.integers(1, 16), st.floats(-1, 2), st.floats(-1, 1.5))
def test_architecture_arithmetic(dim, heads, patch, lr, hflip):
    try:
        TrainConfig(dim=dim, heads=heads, patch_size=patch, image_size=32, lr=lr, hflip=hflip).validate()
    except ConfigError:
        assert dim % heads or 32 % patch or lr <= 0 or not 0 <= hflip <= 1
    else:
        assert dim % heads == 0 and 32 % patch == 0 and lr > 0 and 0 <= hflip <= 1


@FAST
@given(st.binary(max_size=3000), st.booleans())
def test_idx_parser_on_random_bytes(tmp_path_factory, raw, gz):
    path = tmp_path_factory.mktemp("idx") / ("f.gz" if gz else "f")
    path.write_bytes(gzip.compress(raw) if gz and len(raw) % 2 else raw)
    try:
        arr = read_idx(path, 2051)
    except DataError as e:
        assert str(path) in str(e)
    else:
        assert arr.dtype == np.uint8


@FAST
@given(st.binary(max_size=400), st.integers(0, 100))
def test_idx_parser_on_mutated_headers(tmp_path_factory, junk, cut):
    good = idx_bytes(np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5), 2051)
    raw = good[:cut] + junk
    path = tmp_path_factory.mktemp("idx") / "f"
    path.write_bytes(raw)
    try:
        arr = read_idx(path, 2051)
    except DataError:
        return
    assert arr.size == len(raw) - 4 - 4 * raw[3]


@FAST
@given(st.binary(max_size=2000))
def test_cifar_parser_on_random_bytes(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("c") / "data_batch_1"
    path.write_bytes(raw)
    try:
        _cifar_batch(path, "labels", 10)
    except DataError as e:
        assert "data_batch_1" in str(e)


@FAST
@given(st.dictionaries(st.sampled_from([b"data", b"labels", b"x"]),
                       st.one_of(st.integers(), st.binary(max_size=20), st.lists(st.integers(-5, 15), max_size=4),
                                 st.builds(lambda n: np.zeros((n, 3072), np.uint8), st.integers(0, 3)),
                                 st.builds(lambda n: np.zeros((n, 7), np.float32), st.integers(0, 3))), max_size=3))
def test_cifar_parser_on_wrong_structures(tmp_path_factory, d):
    path = tmp_path_factory.mktemp("c") / "test_batch"
    path.write_bytes(pickle.dumps(d, protocol=2))
    try:
        s = _cifar_batch(path, "labels", 10)
    except DataError:
        return
    assert s.images.shape[1:] == (3, 32, 32) and len(s.images) == len(s.labels)
    assert (s.labels >= 0).all() and (s.labels < 10).all()


@FAST
@given(st.binary(max_size=3000))
def test_tar_extraction_on_random_bytes(tmp_path_factory, raw):
    base = tmp_path_factory.mktemp("t")
    archive = base / "a.tar.gz"
    archive.write_bytes(raw)
    try:
        extract_members(archive, base, "cifar-10-batches-py", ("data_batch_1",))
    except DataError as e:
        assert "a.tar.gz" in str(e)
    assert sorted(p.name for p in base.iterdir()) == ["a.tar.gz", "cifar-10-batches-py"]


def test_tar_with_path_traversal_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    (tmp_path / "a.tar.gz").write_bytes(buf.getvalue())
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="does not contain"):
        extract_members(tmp_path / "a.tar.gz", tmp_path / "out", "cifar-10-batches-py", ("data_batch_1",))
    assert not (tmp_path / "escaped.txt").exists()
