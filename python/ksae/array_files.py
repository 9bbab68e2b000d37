"""Training data from NumPy files: whole arrays (``load_array``) and row streams from a
``.npy`` file larger than memory (``NpyRowStream``).

Both accept real numbers only. Floating-point data keeps its stored dtype unless ``dtype``
asks for another; integer data (counts, 8-bit pixels) is converted to float64, or to
``dtype`` when given, because the model trains on floats. No scaling is applied: divide 8-bit
pixels by 255 yourself. Pass ``dtype`` equal to the model's (``"float32"`` by default) to
convert once, here, rather than again inside ``fit``.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from .config import check_choice, check_int, dtype_name

DEFAULT_BLOCK_BYTES = 1 << 20
"""Size of one contiguous read when streaming shuffled batches (rounded to whole rows)."""


def _target_dtype(stored: np.dtype, dtype: str | np.dtype | None, where: str) -> np.dtype:
    """The dtype data stored as ``stored`` is returned in (see the module docstring)."""
    if stored.kind not in "fiu":
        raise TypeError(f"{where}: holds dtype {stored}; expected real numbers (floating-point or integer)")
    if dtype is not None:
        return np.dtype(dtype_name(dtype))
    return stored.newbyteorder("=") if stored.kind == "f" else np.dtype(np.float64)


def _check_matrix_shape(shape: tuple[int, ...], where: str) -> None:
    if len(shape) != 2:
        raise ValueError(f"{where}: expected a 2-D array (n_samples, n_features), got shape {shape}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{where}: expected at least one sample and one feature, got shape {shape}")


def _existing_file(path: str | os.PathLike, suffixes: tuple[str, ...]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__} {path!r}")
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise ValueError(f"path: expected a file ending in {' or '.join(suffixes)}, got {str(p)!r}")
    if not p.is_file():
        raise FileNotFoundError(f"path: {str(p)!r} does not exist or is not a file")
    return p


def load_array(path: str | os.PathLike, *, key: str | None = None, mmap: bool = True,
               dtype: str | np.dtype | None = None) -> np.ndarray:
    """Load a 2-D training matrix (n_samples, n_features) from a ``.npy`` or ``.npz`` file.

    - ``.npy``: memory-mapped read-only when ``mmap`` (the default), so opening costs nothing
      and only the rows used are read; ``mmap=False`` reads the whole array into memory.
      A memory map that is touched everywhere (as an epoch of training does) grows the
      process's resident memory to the file's size: for files larger than RAM use
      ``NpyRowStream``.
    - ``.npz``: ``key`` names the array; without it the archive must hold exactly one. The
      members of an archive are always read into memory (``mmap`` does not apply).

    ``dtype`` (``"float32"`` or ``"float64"``) converts the data, which then lives in
    memory; without it floating-point data keeps its dtype and integer data becomes float64.
    Pickled (object) arrays are never loaded. Raises ``FileNotFoundError`` for a missing
    file, ``TypeError`` for non-numeric data, and ``ValueError`` for another extension, an
    unknown ``key``, an unreadable file, or an array that is not a non-empty 2-D matrix.
    """
    p = _existing_file(path, (".npy", ".npz"))
    where = str(p)
    try:
        if p.suffix.lower() == ".npy":
            arr = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
        else:
            # Our own handle: np.load leaks the one it opens when the archive is damaged.
            with open(p, "rb") as handle, np.load(handle, allow_pickle=False) as archive:
                names = tuple(archive.files)
                if not names:
                    raise ValueError(f"path: {where!r} holds no arrays")
                if key is None:
                    if len(names) > 1:
                        raise ValueError(f"key: {where!r} holds several arrays ({', '.join(names)}); "
                                         "pass key= to choose one")
                    key = names[0]
                check_choice("key", key, names)
                arr = archive[key]
                where = f"{where}[{key!r}]"
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"path: {where!r} is not a readable {p.suffix} file ({exc})") from None
    except ValueError as exc:
        if str(exc).startswith(("path:", "key:")):
            raise
        raise ValueError(f"path: {where!r} is not a readable {p.suffix} file ({exc})") from None
    _check_matrix_shape(arr.shape, where)
    target = _target_dtype(arr.dtype, dtype, where)
    return arr if arr.dtype == target else arr.astype(target)


class ColumnStatistics(NamedTuple):
    """Per-feature statistics of a data set, accumulated in float64."""

    n_rows: int
    """Number of samples seen."""
    mean: np.ndarray
    """(n_features,) mean of each column (a ``b_dec_init="mean"`` for streamed data)."""
    variance: np.ndarray
    """(n_features,) population variance of each column (ddof=0). ``n_rows * variance.sum()``
    is ``sum((X - mean)**2)``, the denominator of the fraction of variance explained."""


class NpyRowStream:
    """Rows of a 2-D ``.npy`` file read block by block, for data larger than memory.

    Only the header is parsed on opening; every read is a plain file read at an offset
    computed from it, into a fresh array. Unlike a memory map touched everywhere, whose pages
    all count as the process's resident memory, this keeps the resident memory near one
    read's size however large the file: the operating system's page cache still speeds up
    repeated epochs, but its pages can be dropped under pressure.

    The file must be C-ordered (what ``np.save`` writes for a C-contiguous array) and hold
    real numbers. ``dtype`` (``"float32"`` or ``"float64"``) is the dtype the rows come back
    in: set it to the model's dtype so each batch is converted once, here. Without it
    floating-point data keeps its stored dtype and integer data becomes float64.

    What a training loop needs, per epoch::

        stream = NpyRowStream("activations.npy", dtype="float32")
        stats = stream.column_statistics()          # once: mean for b_dec, variance for FVE
        for epoch in range(epochs):
            for batch in stream.iter_batches(256, shuffle=True, rng=rng):
                ...                                  # (<= 256, n_features) float32, C-contiguous

    One iteration is one epoch: every row exactly once, in
    ``stream.batches_per_epoch(batch_size)`` batches of ``batch_size`` rows but the last.

    ``rows=(start, stop)`` makes the stream a view of the file's rows ``start:stop``: row 0
    of the stream is the file's row ``start``, and nothing outside the range is ever read
    (so the last rows of a file can be held out as test data without copying the rest).
    """

    def __init__(self, path: str | os.PathLike, *, dtype: str | np.dtype | None = None,
                 rows: tuple[int, int] | None = None) -> None:
        self.path = _existing_file(path, (".npy",))
        with open(self.path, "rb") as f:
            stored, shape, self._offset = self._read_header(f)
        _check_matrix_shape(shape, str(self.path))
        self._stored = stored
        self.dtype: np.dtype = _target_dtype(stored, dtype, str(self.path))
        """The dtype of the arrays this stream returns."""
        file_rows, self.n_features = shape
        self._row_bytes = self.n_features * stored.itemsize
        needed = self._offset + file_rows * self._row_bytes
        size = self.path.stat().st_size
        if size < needed:
            raise ValueError(f"{self.path}: truncated .npy file: its header's shape {shape} of {stored} "
                             f"needs {needed} bytes, the file holds {size}")
        self.rows: tuple[int, int] | None = None if rows is None else self._check_rows(rows, file_rows)
        """The file's row range this stream views, or None for the whole file."""
        start, stop = self.rows or (0, file_rows)
        self.n_rows = stop - start
        self._offset += start * self._row_bytes  # row 0 of the stream is the file's row start

    def _check_rows(self, rows: object, file_rows: int) -> tuple[int, int]:
        if not isinstance(rows, tuple) or len(rows) != 2:
            raise TypeError(f"rows: expected a (start, stop) tuple, got {type(rows).__name__} {rows!r}")
        start = check_int("rows start", rows[0], 0, file_rows - 1)
        stop = check_int(f"rows stop (file {self.path} holds {file_rows} rows)", rows[1], start + 1, file_rows)
        return (start, stop)

    def _read_header(self, f: BinaryIO) -> tuple[np.dtype, tuple[int, ...], int]:
        fmt = np.lib.format
        try:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, stored = fmt.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                # 3.0 differs from 2.0 only in allowing UTF-8 in the header, which only
                # structured dtypes' field names use (refused below).
                shape, fortran_order, stored = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as exc:
            raise ValueError(f"{self.path}: not a readable .npy file ({exc})") from None
        if stored.hasobject or stored.fields is not None:
            raise TypeError(f"{self.path}: holds dtype {stored}; expected real numbers (floating-point or integer)")
        if fortran_order and len(shape) > 1 and min(shape) > 1:
            raise ValueError(f"{self.path}: the array is stored in Fortran (column-major) order, so a row is "
                             "not contiguous on disk; re-save it in C order, e.g. "
                             "np.save(path, np.ascontiguousarray(X)), or stream it in C-ordered pieces")
        return stored, tuple(shape), f.tell()

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_rows, n_features)``."""
        return (self.n_rows, self.n_features)

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        rows = f", rows={self.rows}" if self.rows is not None else ""
        return f"NpyRowStream({str(self.path)!r}{rows}, shape={self.shape}, dtype={self.dtype.name})"

    def batches_per_epoch(self, batch_size: int) -> int:
        """Number of batches ``iter_batches(batch_size)`` yields: ceil(n_rows / batch_size)."""
        batch_size = check_int("batch_size", batch_size, 1)
        return -(-self.n_rows // batch_size)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new (stop - start, n_features) array of ``dtype``."""
        start = check_int("start", start, 0, self.n_rows)
        stop = check_int("stop", stop, start, self.n_rows)
        with open(self.path, "rb", buffering=0) as f:
            return self._convert(self._read_rows(f, start, stop - start))

    def iter_chunks(self, chunk_rows: int) -> Iterator[np.ndarray]:
        """Consecutive row chunks of ``chunk_rows`` rows (the last may be shorter), in file order."""
        return self._chunks(check_int("chunk_rows", chunk_rows, 1))

    def _chunks(self, chunk_rows: int) -> Iterator[np.ndarray]:
        with open(self.path, "rb", buffering=0) as f:
            for start in range(0, self.n_rows, chunk_rows):
                yield self._convert(self._read_rows(f, start, min(chunk_rows, self.n_rows - start)))

    def iter_batches(self, batch_size: int, *, shuffle: bool = False,
                     rng: np.random.Generator | int | None = None, block_rows: int | None = None,
                     window_blocks: int = 16) -> Iterator[np.ndarray]:
        """One epoch of batches: every row exactly once, in batches of ``batch_size`` rows but
        the last (which holds the rest).

        Without ``shuffle`` the rows come in file order. With it, the file is cut into blocks
        of ``block_rows`` contiguous rows (default: about 1 MiB each); the order of the blocks
        is a fresh random permutation on every call, and the rows of ``window_blocks``
        consecutive blocks of that order are read together and shuffled among themselves.
        This is not a full permutation of the rows (two rows of one block stay within one
        window of each other), but it reads the file in large contiguous pieces and holds
        only one window (``window_blocks * block_rows`` rows) in memory. Rows stored in a
        meaningful order (sorted by label, say) mix better with smaller blocks or a larger
        window.

        ``rng`` draws the permutations: calling again with the same generator gives a new
        order (a new epoch), and generators seeded alike give the same order. An integer
        seeds a new generator; ``None`` draws fresh entropy.
        """
        batch_size = check_int("batch_size", batch_size, 1)
        window_blocks = check_int("window_blocks", window_blocks, 1)
        if block_rows is None:
            block_rows = max(1, DEFAULT_BLOCK_BYTES // self._row_bytes)
        block_rows = check_int("block_rows", block_rows, 1)
        if not isinstance(shuffle, (bool, np.bool_)):
            raise TypeError(f"shuffle: expected a bool, got {type(shuffle).__name__} {shuffle!r}")
        generator = np.random.default_rng(rng) if shuffle else None
        # Arguments are checked above, at the call; the reading starts at the first batch.
        return self._batches(batch_size, generator, block_rows, window_blocks)

    def _batches(self, batch_size: int, generator: np.random.Generator | None, block_rows: int,
                 window_blocks: int) -> Iterator[np.ndarray]:
        blocks = np.arange(-(-self.n_rows // block_rows))
        if generator is not None:
            blocks = generator.permutation(blocks)
        carry = np.empty((0, self.n_features), dtype=self._stored)
        with open(self.path, "rb", buffering=0) as f:
            for first in range(0, len(blocks), window_blocks):
                window = self._read_window(f, blocks[first:first + window_blocks], block_rows, carry)
                order = generator.permutation(len(window)) if generator is not None else None
                n_full = len(window) // batch_size * batch_size
                for start in range(0, n_full, batch_size):
                    rows = window[start:start + batch_size] if order is None else window[order[start:start + batch_size]]
                    yield self._convert(rows)
                # Rows short of a full batch wait for the next window, so that every batch but
                # the epoch's last is full, as with an in-memory array.
                carry = window[n_full:] if order is None else window[order[n_full:]]
        if len(carry):
            yield self._convert(carry)

    def column_statistics(self, chunk_rows: int | None = None) -> ColumnStatistics:
        """Column means and variances in one sequential pass, ``chunk_rows`` rows at a time
        (default: about 1 MiB), in float64 with Chan et al.'s pairwise update so that large
        offsets do not cancel."""
        if chunk_rows is None:
            chunk_rows = max(1, DEFAULT_BLOCK_BYTES // self._row_bytes)
        n = 0
        mean = np.zeros(self.n_features)
        m2 = np.zeros(self.n_features)  # sum of squared deviations from the running mean
        for chunk in self.iter_chunks(chunk_rows):
            x = chunk.astype(np.float64, copy=False)
            m = len(x)
            chunk_mean = x.mean(axis=0)
            delta = chunk_mean - mean
            m2 += ((x - chunk_mean) ** 2).sum(axis=0) + delta ** 2 * (n * m / (n + m))
            mean += delta * (m / (n + m))
            n += m
        return ColumnStatistics(n, mean, m2 / n)

    def _read_window(self, f: BinaryIO, blocks: np.ndarray, block_rows: int, carry: np.ndarray) -> np.ndarray:
        """``carry`` followed by the rows of ``blocks``, read straight into one buffer."""
        starts = blocks * block_rows
        counts = np.minimum(starts + block_rows, self.n_rows) - starts
        window = np.empty((len(carry) + int(counts.sum()), self.n_features), dtype=self._stored)
        window[:len(carry)] = carry
        at = len(carry)
        for start, count in zip(starts.tolist(), counts.tolist()):
            self._read_rows(f, start, count, out=window[at:at + count])
            at += count
        return window

    def _read_rows(self, f: BinaryIO, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:start + count`` in the stored dtype, into ``out`` if given."""
        if out is None:
            out = np.empty((count, self.n_features), dtype=self._stored)
        view = memoryview(out.reshape(-1).view(np.uint8))
        f.seek(self._offset + start * self._row_bytes)
        done = 0
        while done < len(view):  # a raw read may return less than asked for
            n = f.readinto(view[done:])
            if not n:
                raise ValueError(f"{self.path}: file ended early at row {start + done // self._row_bytes} "
                                 f"of {self.n_rows}; was it truncated after opening?")
            done += n
        return out

    def _convert(self, rows: np.ndarray) -> np.ndarray:
        return rows if rows.dtype == self.dtype else rows.astype(self.dtype)
