"""The data of an experiment, loaded as its DataConfig says."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..activation_store import ActivationStore
from ..array_files import NpyRowStream, load_array
from ..config import DataConfig
from ..validation import as_float_matrix
from .errors import renaming


@dataclass
class ExperimentData:
    """Train and test data of a run, and what the report and probe need to know about it."""

    train: np.ndarray | NpyRowStream | ActivationStore
    """Training rows: an array, a stream of a .npy file (``stream``), or an activation store."""
    test: np.ndarray
    """Test rows, in memory."""
    description: str
    """One line naming the data, for reports."""
    train_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    image_shape: tuple[int, int] | None = None
    """(height, width) of image data, for plots."""
    directions: np.ndarray | None = None
    """The planted directions of synthetic data."""
    test_store: ActivationStore | None = None
    """An activation store's held-out view (its documents and token ids), for the field's
    metrics and the spliced-in metric."""

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def labelled(self) -> bool:
        return self.train_labels is not None and self.test_labels is not None

    def train_chunks(self, chunk_rows: int = 8192) -> Iterator[np.ndarray]:
        """The training rows in file order, a chunk at a time (streams stay on disk)."""
        if isinstance(self.train, NpyRowStream):
            yield from self.train.iter_chunks(chunk_rows)
        elif isinstance(self.train, ActivationStore):
            yield from self.train.batches(chunk_rows, seed=None)
        else:
            for start in range(0, len(self.train), chunk_rows):
                yield self.train[start:start + chunk_rows]


def n_held_out(n_rows: int, fraction: float, where: str) -> int:
    """Rows held out for testing: ``fraction`` of ``n_rows``, at least one, leaving one."""
    n_test = max(1, int(round(n_rows * fraction)))
    if n_test >= n_rows:
        raise ValueError(f"--test-fraction: {fraction} of the {n_rows} rows of {where} leaves no "
                         "training data")
    return n_test


def source_flag(data: DataConfig) -> str:
    """The flag that chose the data's rows, as the user would write it."""
    if data.dataset == "synthetic":
        return "--d-in"
    if data.dataset in ("array", "store"):
        return f"--path {data.path}"
    return f"--dataset {data.dataset}"


def finite_rows(X: np.ndarray, where: str) -> np.ndarray:
    """``X`` as training would take it, refused with a message that names ``where`` and the
    row when a row holds NaN or infinity."""
    with renaming(rows=where):
        return as_float_matrix(X, "rows", X.dtype)


def load_data(data: DataConfig, seed: int, dtype: str) -> ExperimentData:
    """Train and test data as ``data`` says, in the model's ``dtype``. ``seed`` draws the
    synthetic data set. Errors name the flag (``--path``, ``--test-path``, ``--key``) and
    the file, and the row of a file that holds NaN or infinity."""
    if data.dataset == "synthetic":
        return _synthetic(data, seed, dtype)
    if data.dataset == "array":
        return _array(data, dtype)
    if data.dataset == "store":
        return _store(data, dtype)
    return _images(data, dtype)


def _synthetic(data: DataConfig, seed: int, dtype: str) -> ExperimentData:
    from ..datasets import make_sparse_dictionary

    made = make_sparse_dictionary(n_samples=data.n_samples, d_in=data.d_in,
                                  n_components=data.n_components, n_active=data.n_active,
                                  noise=data.noise, random_state=seed, dtype=dtype)
    n_test = n_held_out(data.n_samples, data.test_fraction, "the synthetic data")
    return ExperimentData(made.X[:-n_test], made.X[-n_test:],
                          f"synthetic: {data.n_samples} samples of width {data.d_in}, each a sum of "
                          f"{data.n_active} of {data.n_components} planted directions (seed {seed})",
                          directions=made.directions)


def _images(data: DataConfig, dtype: str) -> ExperimentData:
    from ..datasets import load_mnist

    with renaming(data_dir="--path"):
        splits = [load_mnist(data.dataset, split, data_dir=data.path, cache_dir=data.cache_dir,
                             download=data.download) for split in ("train", "test")]
    train, test = splits
    return ExperimentData(train.images.astype(dtype, copy=False), test.images.astype(dtype, copy=False),
                          f"{data.dataset}: {len(train.images)} training and {len(test.images)} test "
                          f"images of {train.image_shape[0]} x {train.image_shape[1]} pixels in [0, 1]",
                          train_labels=train.labels, test_labels=test.labels,
                          image_shape=train.image_shape)


def _array(data: DataConfig, dtype: str) -> ExperimentData:
    path = data.path
    assert path is not None  # DataConfig checks it
    test_key = data.key if data.test_path is not None and data.test_path.lower().endswith(".npz") else None
    train_key = data.key if path.lower().endswith(".npz") else None
    if data.stream:
        with renaming(path="--path"):
            whole = NpyRowStream(path, dtype=dtype)
        if data.test_path is not None:
            train, test = whole, _load(data.test_path, test_key, dtype, "--test-path")
        else:
            n_test = n_held_out(whole.n_rows, data.test_fraction, path)
            split = whole.n_rows - n_test
            train = NpyRowStream(path, dtype=dtype, rows=(0, split))
            test = finite_rows(whole.read(split, whole.n_rows),
                               f"--path {path} (its test rows, from row {split})")
        how = "streamed from disk"
    else:
        X = _load(path, train_key, dtype, "--path")
        if data.test_path is not None:
            train, test = X, _load(data.test_path, test_key, dtype, "--test-path")
        else:
            n_test = n_held_out(len(X), data.test_fraction, path)
            train, test = X[:-n_test], X[-n_test:]
        how = "in memory"
    if test.shape[1] != train.shape[1]:
        raise ValueError(f"--test-path: {data.test_path} has {test.shape[1]} features per row, the "
                         f"training data {path} has {train.shape[1]}")
    source = f"{path}" + (f" (test: {data.test_path})" if data.test_path else
                          f" (test: its last {len(test)} rows)")
    return ExperimentData(train, test, f"array {source}: {len(train)} training and {len(test)} test "
                          f"rows of width {train.shape[1]}, {how}")


def _load(path: str, key: str | None, dtype: str, flag: str) -> np.ndarray:
    """The matrix of an array file, its rows checked; errors name ``flag``."""
    with renaming(path=flag, key="--key"):
        return finite_rows(load_array(path, key=key, dtype=dtype), f"{flag} {path}")


def _store(data: DataConfig, dtype: str) -> ExperimentData:
    """An activation store: test_fraction of its documents held out whole (seed 0), the
    test rows read into memory, the training rows streamed."""
    assert data.path is not None  # DataConfig checks it
    with renaming(path="--path"):
        train, test = ActivationStore(data.path, dtype=dtype).split_documents(data.test_fraction)
    test_rows = np.concatenate(list(test.batches(65536, seed=None)))
    about = ", ".join(f"{k} {v}" for k, v in train.metadata.items() if isinstance(v, (str, int, float)))
    return ExperimentData(train, test_rows, test_store=test, description=
                          f"activation store {data.path}{f' ({about})' if about else ''}: "
                          f"{len(train)} training and {len(test_rows)} test rows of width "
                          f"{train.shape[1]}, documents held out whole, streamed from disk")
