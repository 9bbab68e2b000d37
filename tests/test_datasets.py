"""IDX files: every IDX type, raw or gzip, and clear errors for malformed files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from ksae.idx import read_idx

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
