"""The IDX file format (MNIST's): a 4-byte magic, big-endian dimensions, then the values.

Layout: two zero bytes, a type code, the number of dimensions ``ndim``; ``ndim`` big-endian
unsigned 32-bit sizes; then ``prod(sizes)`` values of the type, big-endian, in C order.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""IDX type code -> the (big-endian) dtype of the values it stores."""

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed, into an array of its shape.

    Compression is recognised by the file's first bytes, not its name, so a raw file named
    ``.gz`` (or the reverse) still reads. Values come back in native byte order, in a
    writable array. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming
    the file for a bad magic number, an unknown type code, a damaged gzip stream, or a
    payload whose size does not match the dimensions (a truncated download, say).
    """
    path = Path(path)
    with open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            dtype, shape = _read_header(f, path)
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            # One byte more than needed tells trailing garbage from an exact fit without
            # reading an arbitrarily large remainder.
            payload = f.read(expected + 1)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: damaged gzip stream ({exc}); delete the file and fetch it again") from None
    need = f"the header's shape {shape} of {dtype.newbyteorder('=').name} needs {expected} bytes"
    if len(payload) < expected:
        raise ValueError(f"{path}: truncated IDX file: {need}, the file holds {len(payload)}; "
                         "delete it and fetch it again")
    if len(payload) > expected:
        raise ValueError(f"{path}: IDX file longer than its header says: {need}, the file holds more")
    return np.frombuffer(payload, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _read_header(f, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    magic = f.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic bytes {magic.hex() or 'missing'}, "
                         "expected 00 00 <type> <ndim>)")
    code, ndim = magic[2], magic[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02X}; expected one of {known}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions; expected at least 1")
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header: {ndim} dimensions declared, "
                         f"{len(dims) // 4} present")
    shape = tuple(int(s) for s in np.frombuffer(dims, dtype=">u4"))
    return IDX_DTYPES[code], shape
