"""Batch sources: where the trainer's batches come from.

A batch source is anything with the methods of ``BatchSource``: its ``shape``, the batches
of one epoch, the data's total variance, a sample for one-off estimates (``b_dec_init``,
thresholds) and single rows (for the fingerprint a checkpoint keeps). ksae has two, rows in
memory (``ArrayRows``) and a ``.npy`` file streamed a window at a time (``StreamRows``);
``batch_source`` wraps what a user passes to ``fit``, and passes an object that already is
a batch source through, so other sources (an activation store, a rank's shard) plug in
without a change to the loop.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np

from . import _core
from .array_files import NpyRowStream
from .validation import as_float_matrix


@runtime_checkable
class BatchSource(Protocol):
    """What the trainer needs of its training data."""

    shape: tuple[int, int]
    """(n_samples, n_features)."""

    def batches(self, batch_size: int, seed: int | None, skip: int = 0,
                n_threads: int = 0) -> Iterator[np.ndarray]:
        """One epoch's batches, C-contiguous arrays of the model's dtype, shuffled from
        ``seed`` (None: in order), without the first ``skip`` batches; the same seed must
        give the same batches."""

    def total_variance(self, n_threads: int = 0) -> float:
        """``sum((X - X.mean(axis=0))**2)`` over all rows, in float64."""

    def sample(self) -> np.ndarray:
        """Rows that stand for the data in one-off estimates."""

    def row(self, i: int) -> np.ndarray:
        """Row ``i``."""


CANCELLATION_LIMIT = 1e-6
"""total_variance's shortcut stands when the deviations' squares are at least this fraction
of the values' squares: float64 sums then lose at most about eps64 / 1e-6 ~ 2e-10 of it."""


def total_variance(X: np.ndarray, n_threads: int = 0, chunk: int = 8192) -> float:
    """``sum((X - X.mean(axis=0))**2)`` in float64 for a C-contiguous float32/float64 ``X``.

    Computed as ``sum(X**2) - n * sum(mean**2)``, the column sums and the squares summed in
    double by one multi-threaded kernel pass (``_core.sums_and_squares``) instead of NumPy's
    mean and a float64 copy of every chunk, which made a one-epoch fit on 51200 x 784 rows
    0.1 s slower. Where that difference cancels (data far from zero for its spread) the
    deviations are summed directly, ``chunk`` rows at a time."""
    sums, squares = _core.sums_and_squares(X, n_threads)
    mean = sums / X.shape[0]
    total = squares - X.shape[0] * float(mean @ mean)
    if total >= CANCELLATION_LIMIT * squares:
        return total
    total = 0.0
    for start in range(0, X.shape[0], chunk):
        centered = X[start:start + chunk] - mean
        total += float(np.einsum("ij,ij->", centered, centered))
    return total


INIT_SAMPLE_ROWS = 65536
"""Rows of a stream used where a whole in-memory array would be (b_dec_init, batchtopk's
threshold calibration): the first ones of the file."""


def epoch_order(n: int, seed: int | None) -> np.ndarray | None:
    """The row order of an epoch: a permutation drawn from ``seed``, or None (in order)."""
    return None if seed is None else np.random.default_rng(seed).permutation(n)


class ArrayRows:
    """Training data held in memory: batches are rows gathered in each epoch's order."""

    def __init__(self, X: np.ndarray) -> None:
        self.X = X
        self.shape: tuple[int, int] = X.shape

    def batches(self, batch_size: int, seed: int | None, skip: int = 0,
                n_threads: int = 0) -> Iterator[np.ndarray]:
        """The epoch whose shuffle is drawn from ``seed`` (None: in order), without its first
        ``skip`` batches. A shuffled batch's rows are copied by ``_core.take_rows`` on
        ``n_threads``: NumPy's ``X[rows]`` took 133-143 us of a 3.8 ms step at
        (256, 784, 1000, 25), take_rows on 2 threads 62-68 us."""
        order = epoch_order(self.shape[0], seed)
        for start in range(skip * batch_size, self.shape[0], batch_size):
            stop = min(start + batch_size, self.shape[0])
            yield (_core.take_rows(self.X, order[start:stop], n_threads) if order is not None
                   else self.X[start:stop])

    def total_variance(self, n_threads: int = 0) -> float:
        return total_variance(self.X, n_threads)

    def sample(self) -> np.ndarray:
        """The rows that stand for the data in one-off estimates: all of them."""
        return self.X

    def row(self, i: int) -> np.ndarray:
        return self.X[i]

    def split(self, held_out: np.ndarray) -> tuple["ArrayRows", np.ndarray]:
        """(the rows not in ``held_out`` as a source, the held-out rows), in their order."""
        train_X, val_X = split_rows(self.X, held_out)
        return ArrayRows(train_X), val_X


class StreamRows:
    """Training data streamed from a .npy file (``ksae.NpyRowStream``) a window at a time, so
    memory stays far below the file's size. The whole file is read once up front, for its
    column statistics, which also proves it holds no NaN or infinity. Shuffling is by
    blocks within a window (see ``NpyRowStream.iter_batches``)."""

    def __init__(self, stream: NpyRowStream, dtype: np.dtype | str, name: str = "X") -> None:
        self.stream, self.dtype = stream, np.dtype(dtype)
        self.shape = (stream.n_rows, stream.n_features)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite data: reported below
            stats = stream.column_statistics()
        self._total_variance = float(stats.variance.sum() * stats.n_rows)
        if not (np.isfinite(stats.mean).all() and np.isfinite(self._total_variance)):
            self._raise_first_bad_row(name)

    def _raise_first_bad_row(self, name: str) -> None:
        start = 0
        for chunk in self.stream.iter_chunks(4096):
            bad = np.flatnonzero(~np.isfinite(chunk).all(axis=1))
            if bad.size:
                raise ValueError(f"{name}: row {start + int(bad[0])} of {self.stream.path} contains "
                                 "NaN or infinity; clean or drop such rows first")
            start += len(chunk)
        raise ValueError(f"{name}: the values of {self.stream.path} overflow float64 sums; rescale the data")

    def batches(self, batch_size: int, seed: int | None, skip: int = 0,
                n_threads: int = 0) -> Iterator[np.ndarray]:
        batches = self.stream.iter_batches(batch_size, shuffle=seed is not None, rng=seed)
        for index, batch in enumerate(batches):
            if index >= skip:
                yield np.ascontiguousarray(batch, dtype=self.dtype)

    def total_variance(self, n_threads: int = 0) -> float:
        return self._total_variance  # from the statistics read up front

    def sample(self) -> np.ndarray:
        rows = self.stream.read(0, min(self.shape[0], INIT_SAMPLE_ROWS))
        return np.ascontiguousarray(rows, dtype=self.dtype)

    def row(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(self.stream.read(i, i + 1)[0], dtype=self.dtype)


def training_rows(X: Any, dtype: np.dtype | str, n_features: int | None = None) -> BatchSource:
    """Training data as a batch source: a batch source as it is, an ``NpyRowStream``
    streamed, anything else checked and converted once by ``as_float_matrix``."""
    if isinstance(X, NpyRowStream):
        if n_features is not None and X.n_features != n_features:
            raise ValueError(f"X: expected {n_features} features (the model's d_in), got "
                             f"{X.n_features} in {X.path}")
        return StreamRows(X, dtype)
    if isinstance(X, BatchSource):
        given = getattr(X, "dtype", None)
        if given is not None and np.dtype(given) != np.dtype(dtype):
            raise ValueError(f"X: {type(X).__name__} gives {np.dtype(given).name} rows, the "
                             f"model is {np.dtype(dtype).name}; open it with dtype="
                             f"{np.dtype(dtype).name!r}")
        if n_features is not None and X.shape[1] != n_features:
            raise ValueError(f"X: expected {n_features} features (the model's d_in), got "
                             f"{X.shape[1]} from {type(X).__name__}")
        return X
    return ArrayRows(as_float_matrix(X, "X", dtype, n_features))


def validation_rows(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of ``fraction`` of ``n`` rows, chosen at random, to hold out."""
    n_val = int(round(n * fraction))
    if n_val < 1 or n_val >= n:
        raise ValueError(f"validation_split: {fraction} of {n} samples leaves no "
                         "training or no validation data")
    return np.sort(rng.permutation(n)[:n_val])


def split_rows(X: np.ndarray, held_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the rows of X not in ``held_out``, the rows in it), each in their original order."""
    keep = np.ones(X.shape[0], dtype=bool)
    keep[held_out] = False
    return X[keep], X[held_out]


def fingerprint(source: BatchSource) -> dict[str, Any]:
    """Shape and a hash of three rows of the training data: enough to catch resuming on
    other data without reading all of it."""
    n = source.shape[0]
    h = hashlib.sha256()
    for i in sorted({0, n // 2, n - 1}):
        h.update(np.ascontiguousarray(source.row(i)).tobytes())
    return {"shape": list(source.shape), "rows_sha256": h.hexdigest()}
