"""The data layer: IDX files, MNIST / Fashion-MNIST lookup and download (against a local HTTP
server), arrays from .npy/.npz files, and row streams from .npy files larger than memory."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import json
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ksae
from ksae import datasets
from ksae.array_files import ColumnStatistics, NpyRowStream, load_array
from ksae.datasets import SPLIT_FILES, DownloadError, ImageDataset, data_cache_dir, load_mnist
from ksae.idx import read_idx

from test_properties import PROPERTY

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file's bytes, written here independently of the reader under test."""
    arr = np.asarray(array)
    header = bytes([0, 0, IDX_CODES[arr.dtype], arr.ndim])
    dims = b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    return header + dims + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


# --- IDX ------------------------------------------------------------------------------------

@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("dtype", list(IDX_CODES), ids=lambda d: d.name)
def test_read_idx_returns_every_idx_type_in_native_order(tmp_path, rng, dtype, compressed):
    values = rng.integers(-100, 100, size=(3, 4, 5)) if dtype.kind == "i" else rng.integers(0, 255, size=(3, 4, 5))
    array = (values * 0.5 if dtype.kind == "f" else values).astype(dtype)
    path = write_idx(tmp_path / ("a.idx.gz" if compressed else "a.idx"), array)
    out = read_idx(str(path))
    assert out.dtype == dtype and out.dtype.isnative and out.flags.writeable
    np.testing.assert_array_equal(out, array)


def test_read_idx_decodes_hand_written_big_endian_bytes(tmp_path):
    labels = tmp_path / "labels"
    labels.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 4, 7, 0, 255, 3]))
    np.testing.assert_array_equal(read_idx(labels), np.array([7, 0, 255, 3], dtype=np.uint8))
    shorts = tmp_path / "shorts"  # 2 x 1 int16: 0x0102 = 258 and 0xFFFE = -2
    shorts.write_bytes(bytes([0, 0, 0x0B, 2, 0, 0, 0, 2, 0, 0, 0, 1, 1, 2, 0xFF, 0xFE]))
    np.testing.assert_array_equal(read_idx(shorts), np.array([[258], [-2]], dtype=np.int16))


def test_read_idx_tells_compression_by_content_not_name(tmp_path):
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    misnamed = tmp_path / "raw-but-named.gz"
    misnamed.write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(misnamed), array)


@pytest.mark.parametrize("content, message", [
    (bytes([1, 0, 0x08, 1, 0, 0, 0, 1, 5]), "not an IDX file"),
    (bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 5]), "unknown IDX type code 0x0A"),
    (bytes([0, 0, 0x08, 0]), "0 dimensions"),
    (bytes([0, 0, 0x08, 3, 0, 0, 0, 1]), "truncated IDX header"),
    (bytes([0, 0, 0x08, 1, 0, 0, 0, 4, 1, 2]), "truncated IDX file"),
    (bytes([0, 0, 0x08, 1, 0, 0, 0, 1, 1, 2]), "longer than its header says"),
    (b"", "not an IDX file"),
])
@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gz"])
def test_read_idx_refuses_malformed_files_naming_them(tmp_path, content, message, compressed):
    path = tmp_path / "bad-file-idx1-ubyte"
    path.write_bytes(gzip.compress(content) if compressed else content)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_truncated_payload_reports_sizes(tmp_path):
    path = write_idx(tmp_path / "images.gz", np.zeros((10, 28, 28), dtype=np.uint8))
    cut = tmp_path / "cut"
    cut.write_bytes(gzip.decompress(path.read_bytes())[:-100])
    with pytest.raises(ValueError, match=r"shape \(10, 28, 28\) of uint8 needs 7840 bytes, the file holds 7740"):
        read_idx(cut)


def test_read_idx_refuses_a_damaged_gzip_stream(tmp_path):
    whole = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    path = tmp_path / "cut.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="damaged gzip stream") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")


# --- MNIST / Fashion-MNIST ------------------------------------------------------------------

def make_split(rng, n):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    return images, labels


@pytest.fixture
def fake_mnist(tmp_path, rng):
    """A small MNIST look-alike as .gz files under ``served/good``, a corrupted copy under
    ``served/bad``, and the SHA-256 of the good files."""
    splits = {"train": make_split(rng, 20), "test": make_split(rng, 7)}
    good, bad = tmp_path / "served" / "good", tmp_path / "served" / "bad"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    sha256 = {}
    for split, arrays in splits.items():
        for base, array in zip(SPLIT_FILES[split], arrays):
            data = (good / (base + ".gz"))
            write_idx(data, array)
            sha256[base + ".gz"] = hashlib.sha256(data.read_bytes()).hexdigest()
            corrupted = bytearray(data.read_bytes())
            corrupted[-12] ^= 0xFF
            (bad / (base + ".gz")).write_bytes(bytes(corrupted))
    return splits, sha256


def use_source(monkeypatch, name="mnist", **changes):
    """Point data set ``name`` at test mirrors/checksums/system directories."""
    changes.setdefault("system_dirs", ())
    monkeypatch.setitem(datasets.IMAGE_DATASETS, name,
                        dataclasses.replace(datasets.IMAGE_DATASETS[name], **changes))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep the test output clean
        pass


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """Serve ``tmp_path/served`` on 127.0.0.1; yields (base URL, stop function)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    handler = functools.partial(_QuietHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopped = []

    def stop():
        if not stopped:
            server.shutdown()
            server.server_close()
            thread.join()
            stopped.append(True)

    yield f"http://127.0.0.1:{server.server_address[1]}", stop
    stop()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def assert_matches(data: ImageDataset, images, labels):
    assert data.images.shape == (len(images), 784) and data.images.dtype == np.float32
    np.testing.assert_array_equal(data.images, images.reshape(len(images), -1).astype(np.float32) / 255)
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.labels, labels)
    assert data.image_shape == (28, 28)


def cache_listing(cache: Path) -> list[str]:
    """Every entry under the cache, temporary files included."""
    return sorted(p.name for p in cache.rglob("*")) if cache.exists() else []


def test_download_verifies_caches_and_then_works_offline(tmp_path, fake_mnist, http_server, monkeypatch):
    splits, sha256 = fake_mnist
    url, stop = http_server
    use_source(monkeypatch, mirrors=(url + "/good/",), sha256=sha256)
    cache = tmp_path / "cache"
    assert_matches(load_mnist("mnist", "train", cache_dir=cache), *splits["train"])
    # only the requested split is fetched, under its final names, with nothing else left over
    assert cache_listing(cache) == ["mnist", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        assert (cache / "mnist" / name).read_bytes() == (tmp_path / "served" / "good" / name).read_bytes()
    stop()  # no network from here on: the cache must suffice
    assert_matches(load_mnist("mnist", "train", cache_dir=cache, download=False), *splits["train"])
    assert_matches(load_mnist("mnist", "train", cache_dir=cache), *splits["train"])
    with pytest.raises(DownloadError):  # the test split was never cached
        load_mnist("mnist", "test", cache_dir=cache)


def test_a_corrupted_mirror_is_skipped_for_the_next(tmp_path, fake_mnist, http_server, monkeypatch):
    splits, sha256 = fake_mnist
    url, _ = http_server
    use_source(monkeypatch, mirrors=(url + "/bad/", url + "/good/"), sha256=sha256)
    cache = tmp_path / "cache"
    assert_matches(load_mnist("mnist", "test", cache_dir=cache), *splits["test"])
    assert cache_listing(cache) == ["mnist", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_a_checksum_mismatch_everywhere_leaves_nothing_in_the_cache(tmp_path, fake_mnist, http_server,
                                                                    monkeypatch):
    _, sha256 = fake_mnist
    url, _ = http_server
    use_source(monkeypatch, mirrors=(url + "/bad/", url + "/missing/"), sha256=sha256)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as info:
        load_mnist("mnist", "train", cache_dir=cache)
    message = str(info.value)
    assert f"{url}/bad/train-images-idx3-ubyte.gz: SHA-256 mismatch" in message
    assert f"{url}/missing/train-images-idx3-ubyte.gz: HTTP 404" in message
    assert not (cache / "mnist" / "train-images-idx3-ubyte.gz").exists()
    assert [p for p in cache_listing(cache) if p != "mnist"] == []


def test_no_network_names_the_urls_tried_and_where_to_put_the_files(tmp_path, fake_mnist, monkeypatch):
    _, sha256 = fake_mnist
    mirrors = (closed_port_url(), closed_port_url() + "mirror2/")
    use_source(monkeypatch, mirrors=mirrors, sha256=sha256)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as info:
        load_mnist("mnist", "test", cache_dir=cache)
    assert isinstance(info.value, OSError)
    message = str(info.value)
    for mirror in mirrors:
        assert mirror + "t10k-images-idx3-ubyte.gz" in message
    assert "data_dir=" in message and str(cache / "mnist") in message
    assert cache_listing(cache) in ([], ["mnist"])


def test_download_false_lists_the_places_searched(tmp_path, monkeypatch):
    system = tmp_path / "system"
    use_source(monkeypatch, "fashion-mnist", system_dirs=(system,))
    with pytest.raises(FileNotFoundError) as info:
        load_mnist("fashion-mnist", "train", cache_dir=tmp_path / "cache", download=False)
    message = str(info.value)
    assert str(system) in message and str(tmp_path / "cache" / "fashion-mnist") in message
    assert "train-images-idx3-ubyte and train-labels-idx1-ubyte" in message


@pytest.mark.parametrize("suffix", ["", ".gz"], ids=["raw", "gz"])
def test_data_dir_raw_or_gz(tmp_path, rng, suffix, monkeypatch):
    use_source(monkeypatch, mirrors=(closed_port_url(),))  # any attempt to download would fail
    images, labels = make_split(rng, 12)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_idx(data_dir / ("t10k-images-idx3-ubyte" + suffix), images)
    write_idx(data_dir / ("t10k-labels-idx1-ubyte" + suffix), labels)
    data = load_mnist("mnist", "test", data_dir=data_dir, normalize=False)
    assert data.images.dtype == np.uint8 and data.images.shape == (12, 784)
    np.testing.assert_array_equal(data.images, images.reshape(12, 784))
    np.testing.assert_array_equal(data.labels, labels)
    assert data.class_names == tuple("0123456789")


def test_data_dir_missing_files_are_named(tmp_path, rng):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_idx(data_dir / "train-labels-idx1-ubyte.gz", make_split(rng, 3)[1])
    with pytest.raises(FileNotFoundError, match=r"data_dir: .* lacks train-images-idx3-ubyte \(raw or .gz\)"):
        load_mnist("mnist", "train", data_dir=data_dir)


def test_a_system_copy_is_used_before_the_cache(tmp_path, rng, monkeypatch):
    system, cache = tmp_path / "usr-share", tmp_path / "cache"
    in_system, in_cache = make_split(rng, 5), make_split(rng, 6)
    for directory, arrays in ((system, in_system), (cache / "fashion-mnist", in_cache)):
        directory.mkdir(parents=True)
        for base, array in zip(SPLIT_FILES["train"], arrays):
            write_idx(directory / (base + ".gz"), array)
    use_source(monkeypatch, "fashion-mnist", system_dirs=(tmp_path / "absent", system))
    assert_matches(load_mnist("fashion-mnist", cache_dir=cache, download=False), *in_system)
    use_source(monkeypatch, "fashion-mnist", system_dirs=(tmp_path / "absent",))
    assert_matches(load_mnist("fashion-mnist", cache_dir=cache, download=False), *in_cache)


def test_cache_directory_follows_argument_then_env_then_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("KSAE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_cache_dir("mnist") == tmp_path / "xdg" / "ksae" / "mnist"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec says: ignore it
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_cache_dir("mnist") == tmp_path / "home" / ".cache" / "ksae" / "mnist"
    monkeypatch.setenv("KSAE_DATA", str(tmp_path / "env"))
    assert data_cache_dir("fashion-mnist") == tmp_path / "env" / "fashion-mnist"
    assert data_cache_dir("mnist", tmp_path / "arg") == tmp_path / "arg" / "mnist"


def test_the_env_cache_is_searched(tmp_path, rng, monkeypatch):
    use_source(monkeypatch)
    monkeypatch.setenv("KSAE_DATA", str(tmp_path / "env"))
    images, labels = make_split(rng, 4)
    (tmp_path / "env" / "mnist").mkdir(parents=True)
    write_idx(tmp_path / "env" / "mnist" / "t10k-images-idx3-ubyte", images)
    write_idx(tmp_path / "env" / "mnist" / "t10k-labels-idx1-ubyte", labels)
    assert_matches(load_mnist(split="test", download=False), images, labels)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"name": "fashion_mnist"}, ValueError, "did you mean 'fashion-mnist'"),
    ({"split": "val"}, ValueError, r"split: expected one of 'train', 'test'"),
    ({"download": "no"}, TypeError, "download: expected a bool"),
    ({"normalize": 1}, TypeError, "normalize: expected a bool"),
])
def test_load_mnist_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        load_mnist(**kwargs)


def test_mismatched_image_and_label_files_are_refused(tmp_path, rng):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_idx(data_dir / "t10k-images-idx3-ubyte", make_split(rng, 5)[0])
    write_idx(data_dir / "t10k-labels-idx1-ubyte", make_split(rng, 4)[1])
    with pytest.raises(ValueError, match="holds 5 images but .* holds 4 labels"):
        load_mnist(split="test", data_dir=data_dir)
    write_idx(data_dir / "t10k-labels-idx1-ubyte", np.full(5, 10, dtype=np.uint8))
    with pytest.raises(ValueError, match="labels must be below 10, found 10"):
        load_mnist(split="test", data_dir=data_dir)


DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_test_split_from_the_debian_package(tmp_path):
    data = load_mnist("fashion-mnist", "test", cache_dir=tmp_path, download=False)
    assert data.images.shape == (10000, 784) and data.images.dtype == np.float32
    assert data.images.min() == 0.0 and data.images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(data.labels), np.full(10, 1000))
    assert data.class_names[9] == "Ankle boot"
    # Debian recompressed the files; their content is the original data, whose published
    # MD5s (of the decompressed files) are these.
    for name, md5 in (("t10k-images-idx3-ubyte.gz", "8181f5470baa50b63fa0f6fddb340f0a"),
                      ("t10k-labels-idx1-ubyte.gz", "15d484375f8d13e6eb1aabb0c3f46965")):
        content = gzip.decompress((DEBIAN_FASHION / name).read_bytes())
        assert hashlib.md5(content).hexdigest() == md5, name


# --- load_array -------------------------------------------------------------------------------

def test_load_array_memory_maps_npy_read_only(tmp_path, rng):
    X = rng.standard_normal((30, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    mapped = load_array(tmp_path / "x.npy")
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, X)
    loaded = load_array(str(tmp_path / "x.npy"), mmap=False)
    assert not isinstance(loaded, np.memmap) and loaded.flags.writeable
    np.testing.assert_array_equal(loaded, X)


def test_load_array_npz_keys(tmp_path, rng):
    X, Y = rng.standard_normal((5, 3)), rng.standard_normal((6, 2))
    np.savez(tmp_path / "one.npz", features=X)
    np.testing.assert_array_equal(load_array(tmp_path / "one.npz"), X)
    np.savez_compressed(tmp_path / "two.npz", features=X, other=Y)
    np.testing.assert_array_equal(load_array(tmp_path / "two.npz", key="other"), Y)
    with pytest.raises(ValueError, match=r"key: .* holds several arrays \(features, other\)"):
        load_array(tmp_path / "two.npz")
    with pytest.raises(ValueError, match="key: expected one of 'features', 'other', got 'feature'; did you mean 'features'"):
        load_array(tmp_path / "two.npz", key="feature")


def test_load_array_dtypes(tmp_path, rng):
    counts = rng.integers(0, 50, size=(8, 3)).astype(np.int32)
    np.save(tmp_path / "counts.npy", counts)
    as_default = load_array(tmp_path / "counts.npy")
    assert as_default.dtype == np.float64
    np.testing.assert_array_equal(as_default, counts)
    assert load_array(tmp_path / "counts.npy", dtype="float32").dtype == np.float32
    halves = rng.standard_normal((4, 2)).astype(np.float16)
    np.save(tmp_path / "halves.npy", halves)
    assert load_array(tmp_path / "halves.npy").dtype == np.float16  # floats keep their dtype
    big_endian = rng.standard_normal((4, 2)).astype(">f8")
    np.save(tmp_path / "be.npy", big_endian)
    out = load_array(tmp_path / "be.npy")
    assert out.dtype == np.float64 and out.dtype.isnative
    np.testing.assert_array_equal(out, big_endian)
    with pytest.raises(ValueError, match="dtype: expected one of 'float32', 'float64'"):
        load_array(tmp_path / "counts.npy", dtype="int8")


@pytest.mark.parametrize("array, error, message", [
    (np.zeros((3, 2), dtype=bool), TypeError, "holds dtype bool; expected real numbers"),
    (np.zeros((3, 2), dtype=complex), TypeError, "holds dtype complex128"),
    (np.zeros(5), ValueError, r"expected a 2-D array \(n_samples, n_features\), got shape \(5,\)"),
    (np.zeros((2, 2, 2)), ValueError, "got shape"),
    (np.zeros((0, 4)), ValueError, "at least one sample and one feature"),
])
def test_load_array_refuses_unusable_arrays(tmp_path, array, error, message):
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(error, match=message):
        load_array(tmp_path / "a.npy")


def test_load_array_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npy"):
        load_array(tmp_path / "absent.npy")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"path: expected a file ending in .npy or .npz, got .*x.csv"):
        load_array(tmp_path / "x.csv")
    np.save(tmp_path / "objects.npy", np.array([[{}]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="is not a readable .npy file"):
        load_array(tmp_path / "objects.npy", mmap=False)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="is not a readable .npz file"):
        load_array(tmp_path / "junk.npz")
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike"):
        load_array(3)


# --- NpyRowStream -----------------------------------------------------------------------------

def numbered_rows(n_rows: int, n_features: int = 3, dtype=np.float64) -> np.ndarray:
    """Rows whose first column is the row's index, so a row can be recognised in a batch."""
    X = np.arange(n_rows * n_features, dtype=dtype).reshape(n_rows, n_features)
    X[:, 0] = np.arange(n_rows)
    return X


@pytest.fixture
def stream_file(tmp_path):
    X = numbered_rows(103)
    np.save(tmp_path / "x.npy", X)
    return tmp_path / "x.npy", X


def test_stream_describes_the_file(stream_file):
    path, _ = stream_file
    stream = NpyRowStream(path)
    assert (stream.n_rows, stream.n_features, stream.shape, len(stream)) == (103, 3, (103, 3), 103)
    assert stream.dtype == np.float64
    assert repr(stream) == f"NpyRowStream({str(path)!r}, shape=(103, 3), dtype=float64)"
    assert NpyRowStream(str(path), dtype="float32").dtype == np.float32


def test_stream_rows_view_a_range_of_the_file(stream_file):
    path, X = stream_file
    stream = NpyRowStream(path, rows=(20, 90))
    assert (stream.n_rows, stream.shape, stream.rows) == (70, (70, 3), (20, 90))
    assert repr(stream) == f"NpyRowStream({str(path)!r}, rows=(20, 90), shape=(70, 3), dtype=float64)"
    np.testing.assert_array_equal(stream.read(0, 70), X[20:90])
    np.testing.assert_array_equal(np.concatenate(list(stream.iter_chunks(16))), X[20:90])
    shuffled = np.concatenate(list(stream.iter_batches(8, shuffle=True, rng=0, block_rows=5)))
    np.testing.assert_array_equal(np.sort(shuffled[:, 0]), np.arange(20, 90))
    stats = stream.column_statistics(chunk_rows=7)
    np.testing.assert_allclose(stats.mean, X[20:90].mean(axis=0))
    with pytest.raises(ValueError, match=r"rows stop \(file .* holds 103 rows\): expected an integer >= 21 and <= 103, got 104"):
        NpyRowStream(path, rows=(20, 104))
    with pytest.raises(ValueError, match="rows stop .*got 20"):
        NpyRowStream(path, rows=(20, 20))
    with pytest.raises(TypeError, match=r"rows: expected a \(start, stop\) tuple"):
        NpyRowStream(path, rows=[0, 5])


def test_stream_read_and_chunks(stream_file):
    path, X = stream_file
    stream = NpyRowStream(path)
    part = stream.read(10, 25)
    np.testing.assert_array_equal(part, X[10:25])
    assert part.flags.writeable and part.flags.c_contiguous
    assert stream.read(5, 5).shape == (0, 3)
    chunks = list(stream.iter_chunks(25))
    assert [len(c) for c in chunks] == [25, 25, 25, 25, 3]
    np.testing.assert_array_equal(np.concatenate(chunks), X)
    with pytest.raises(ValueError, match=r"stop: expected an integer >= 10 and <= 103, got 104"):
        stream.read(10, 104)
    with pytest.raises(ValueError, match="start: expected an integer >= 0"):
        stream.read(-1, 3)
    with pytest.raises(ValueError, match="chunk_rows: expected an integer >= 1"):
        stream.iter_chunks(0)  # checked at the call, not at the first chunk


def test_stream_batches_in_order_without_shuffle(stream_file):
    path, X = stream_file
    stream = NpyRowStream(path)
    batches = list(stream.iter_batches(10, block_rows=7, window_blocks=2))
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert len(batches) == stream.batches_per_epoch(10)
    np.testing.assert_array_equal(np.concatenate(batches), X)


@pytest.fixture(scope="module")
def stream_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("streams")
    paths = {}
    for n_rows in (1, 7, 64, 97, 600):
        paths[n_rows] = directory / f"rows{n_rows}.npy"
        np.save(paths[n_rows], numbered_rows(n_rows, 2))
    return paths


@settings(**PROPERTY, max_examples=60)
@given(n_rows=st.sampled_from([1, 7, 64, 97, 600]), batch_size=st.integers(1, 70),
       block_rows=st.integers(1, 40), window_blocks=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_shuffled_epoch_holds_every_row_exactly_once(stream_files, n_rows, batch_size, block_rows,
                                                     window_blocks, seed):
    stream = NpyRowStream(stream_files[n_rows])
    batches = list(stream.iter_batches(batch_size, shuffle=True, rng=np.random.default_rng(seed),
                                       block_rows=block_rows, window_blocks=window_blocks))
    sizes = [len(b) for b in batches]
    assert sizes[:-1] == [batch_size] * (len(sizes) - 1) and 1 <= sizes[-1] <= batch_size
    assert len(batches) == stream.batches_per_epoch(batch_size)
    rows = np.concatenate(batches)
    np.testing.assert_array_equal(np.sort(rows[:, 0]), np.arange(n_rows))
    # each row arrives whole: its other column still belongs to it
    np.testing.assert_array_equal(rows[:, 1], numbered_rows(n_rows, 2)[rows[:, 0].astype(int), 1])


def epoch_order(stream, rng, batch_size=16, **kwargs):
    return np.concatenate(list(stream.iter_batches(batch_size, shuffle=True, rng=rng, **kwargs)))[:, 0]


def test_shuffle_is_seeded_and_changes_between_epochs(stream_files):
    stream = NpyRowStream(stream_files[600])
    kwargs = dict(block_rows=20, window_blocks=3)
    rng = np.random.default_rng(7)
    first, second = epoch_order(stream, rng, **kwargs), epoch_order(stream, rng, **kwargs)
    assert not np.array_equal(first, second)  # one generator, two epochs: two orders
    again = np.random.default_rng(7)
    np.testing.assert_array_equal(epoch_order(stream, again, **kwargs), first)
    np.testing.assert_array_equal(epoch_order(stream, again, **kwargs), second)
    np.testing.assert_array_equal(epoch_order(stream, 7, **kwargs), first)  # an int seeds a generator
    assert not np.array_equal(first, np.arange(600))


def test_shuffle_permutes_blocks_and_mixes_rows_within_a_window(stream_files):
    stream = NpyRowStream(stream_files[600])
    order = epoch_order(stream, np.random.default_rng(3), batch_size=20, block_rows=10, window_blocks=4)
    blocks = order.astype(int) // 10
    window = blocks[:40]  # the first window: 4 whole blocks, in two batches of 20
    assert len(set(window)) == 4 and np.all(np.bincount(window)[np.unique(window)] == 10)
    assert sorted(set(window)) != [0, 1, 2, 3]  # blocks come in a permuted order ...
    # ... and the rows of a window are shuffled together: a batch mixes rows of its blocks
    assert len(set(blocks[:20])) >= 3 and np.mean(np.diff(order[:20]) == 1) < 0.5


def test_stream_converts_dtypes(tmp_path, rng):
    X = rng.standard_normal((50, 4))
    np.save(tmp_path / "x.npy", X)
    stream = NpyRowStream(tmp_path / "x.npy", dtype="float32")
    batches = list(stream.iter_batches(8, shuffle=True, rng=0))
    assert all(b.dtype == np.float32 and b.flags.c_contiguous for b in batches)
    np.save(tmp_path / "ints.npy", np.arange(12, dtype=np.int16).reshape(4, 3))
    ints = NpyRowStream(tmp_path / "ints.npy")
    assert ints.dtype == np.float64
    np.testing.assert_array_equal(ints.read(0, 4), np.arange(12).reshape(4, 3))
    np.save(tmp_path / "be.npy", X.astype(">f4"))
    big_endian = NpyRowStream(tmp_path / "be.npy")
    assert big_endian.dtype == np.float32 and big_endian.dtype.isnative
    np.testing.assert_array_equal(np.concatenate(list(big_endian.iter_chunks(16))), X.astype(np.float32))


def test_stream_reads_npy_format_version_2(tmp_path):
    X = numbered_rows(9)
    with open(tmp_path / "v2.npy", "wb") as f:
        np.lib.format.write_array(f, X, version=(2, 0))
    np.testing.assert_array_equal(NpyRowStream(tmp_path / "v2.npy").read(0, 9), X)


def test_stream_refuses_unusable_files(tmp_path):
    np.save(tmp_path / "fortran.npy", np.asfortranarray(np.zeros((4, 3))))
    with pytest.raises(ValueError, match=r"Fortran \(column-major\) order"):
        NpyRowStream(tmp_path / "fortran.npy")
    np.save(tmp_path / "vector.npy", np.zeros(4))
    with pytest.raises(ValueError, match="expected a 2-D array"):
        NpyRowStream(tmp_path / "vector.npy")
    np.save(tmp_path / "objects.npy", np.array([[{}]], dtype=object), allow_pickle=True)
    with pytest.raises(TypeError, match="expected real numbers"):
        NpyRowStream(tmp_path / "objects.npy")
    np.save(tmp_path / "whole.npy", np.zeros((10, 3)))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "whole.npy").read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated .npy file"):
        NpyRowStream(tmp_path / "cut.npy")
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(ValueError, match="not a readable .npy file"):
        NpyRowStream(tmp_path / "text.npy")
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="expected a file ending in .npy"):
        NpyRowStream(tmp_path / "a.npz")
    with pytest.raises(FileNotFoundError):
        NpyRowStream(tmp_path / "absent.npy")


def test_stream_argument_errors(stream_file):
    stream = NpyRowStream(stream_file[0])
    for kwargs, message in (({"block_rows": 0}, "block_rows: expected an integer >= 1"),
                            ({"window_blocks": 0}, "window_blocks: expected an integer >= 1")):
        with pytest.raises(ValueError, match=message):
            stream.iter_batches(4, **kwargs)
    with pytest.raises(TypeError, match="shuffle: expected a bool"):
        stream.iter_batches(4, shuffle="yes")
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1"):
        stream.batches_per_epoch(0)


def test_column_statistics_match_numpy(tmp_path, rng):
    # A large common offset: a naive sum of squares in float32 would lose the variance.
    X = (1e4 + rng.standard_normal((1001, 5)) * np.arange(1, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    stats = NpyRowStream(tmp_path / "x.npy").column_statistics(chunk_rows=64)
    assert isinstance(stats, ColumnStatistics) and stats.n_rows == 1001
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(stats.mean, X64.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.variance, X64.var(axis=0), rtol=1e-9)
    total = np.sum((X64 - X64.mean(axis=0)) ** 2)
    np.testing.assert_allclose(stats.n_rows * stats.variance.sum(), total, rtol=1e-9)


def test_streaming_a_large_file_keeps_resident_memory_small(tmp_path):
    """Stream a ~200 MB float32 file in shuffled batches in a child process, so that this
    process's memory does not count, and compare its peak resident memory before and after."""
    n_rows, n_features = 200_000, 256
    path = tmp_path / "big.npy"
    header = {"descr": "<f4", "fortran_order": False, "shape": (n_rows, n_features)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        block = np.ones((10_000, n_features), dtype=np.float32)
        for _ in range(n_rows // len(block)):
            f.write(block.tobytes())
    file_bytes = path.stat().st_size
    script = textwrap.dedent(f"""
        import json, resource, sys
        import numpy as np
        from ksae.array_files import NpyRowStream
        stream = NpyRowStream({str(path)!r})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rows, total = 0, 0.0
        for batch in stream.iter_batches(1024, shuffle=True, rng=0):
            rows += len(batch)
            total += float(batch[:, 0].sum())
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"rows": rows, "total": total, "growth_kib": after - before}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    assert report["rows"] == n_rows and report["total"] == n_rows
    growth = report["growth_kib"] * 1024  # Linux reports ru_maxrss in KiB
    assert growth < 0.5 * file_bytes, f"peak RSS grew by {growth / 2**20:.0f} MiB for a {file_bytes / 2**20:.0f} MiB file"


def test_public_names():
    for name in ("load_mnist", "ImageDataset", "read_idx", "load_array", "NpyRowStream"):
        assert name in ksae.__all__ and getattr(ksae, name) is not None
