"""Input checks shared by the estimator and the command line: each failure raises a
TypeError or ValueError that names the argument, what it got and what was expected."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core


def as_float_matrix(X: Any, name: str, dtype: np.dtype | str, n_features: int | None = None,
                    n_threads: int = 0, owner: str = "SparseAutoencoder") -> np.ndarray:
    """Return ``X`` as a C-contiguous 2-D array of ``dtype``, converted at most once.

    Floating-point input of any precision or memory order is accepted; integer, bool,
    complex, string and object data are refused (pixel intensities should be scaled
    explicitly), as are scipy.sparse matrices, arrays that are not 2-D, empty, of the wrong
    width (``owner``, the estimator, expects ``n_features``), or that hold NaN or infinity.
    ``n_threads`` (0: all the kernels may use) run the finiteness check. The messages carry
    scikit-learn's wording where its checks look for it.
    """
    if _is_sparse(X):
        raise TypeError(f"{name}: scipy.sparse input is not supported (the encoder multiplies "
                        f"dense rows); convert it with {name}.toarray(), a block of rows at a "
                        "time if the dense array would not fit in memory")
    arr = X if isinstance(X, np.ndarray) else np.asarray(X)
    kind = arr.dtype.kind
    if kind in "iub":
        raise TypeError(
            f"{name}: expected floating-point data, got dtype {arr.dtype}; convert it explicitly, "
            f"e.g. {name}.astype(np.float32) (and / 255 for 8-bit pixel intensities)")
    if kind != "f":
        raise TypeError(f"{name}: expected a real floating-point array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        hint = f". Reshape your data with {name}.reshape(1, -1) for a single sample" if arr.ndim == 1 else ""
        raise ValueError(f"{name}: expected a 2-D array (n_samples, n_features), got shape {arr.shape}{hint}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        what = "sample" if arr.shape[0] == 0 else "feature"
        raise ValueError(f"{name}: expected at least one sample and one feature; found 0 {what}(s) "
                         f"(shape={arr.shape}) while a minimum of 1 is required.")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(
            f"{name}: expected {n_features} features (the model's d_in), got {arr.shape[1]} "
            f"(shape {arr.shape}): {name} has {arr.shape[1]} features, but {owner} is expecting "
            f"{n_features} features as input")
    source = arr
    if not (arr.flags.c_contiguous and arr.dtype == dtype):  # else already what is asked for
        with np.errstate(over="ignore"):  # values too large for dtype become inf: reported below
            arr = np.ascontiguousarray(arr, dtype=dtype)
    if not _core.all_finite(arr, n_threads):  # one pass; NumPy's check is the slow path
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        if np.isfinite(source[bad]).all():
            raise ValueError(f"{name}: row {bad} holds values beyond the range of {np.dtype(dtype).name} "
                             f"(largest magnitude {np.abs(source[bad]).max():.3g}); rescale the data")
        raise ValueError(f"{name}: row {bad} contains NaN or infinity; clean or drop such rows first")
    return arr


def as_code(values: Any, indices: Any, dtype: np.dtype | str, n_latents: int) -> tuple[np.ndarray, np.ndarray]:
    """Check a sparse code (values, indices) of matching (n_samples, k) shapes and return
    them as C-contiguous arrays of ``dtype`` and int64."""
    v = np.asarray(values)
    i = np.asarray(indices)
    if v.dtype.kind != "f":
        raise TypeError(f"values: expected a floating-point array, got dtype {v.dtype}")
    if i.dtype.kind not in "iu":
        raise TypeError(f"indices: expected an integer array, got dtype {i.dtype}")
    if v.ndim != 2 or v.shape != i.shape:
        raise ValueError(
            f"values, indices: expected two 2-D arrays of the same shape (n_samples, k), "
            f"got {v.shape} and {i.shape}")
    if i.size and (i.min() < 0 or i.max() >= n_latents):
        raise ValueError(f"indices: expected entries in [0, {n_latents}), got [{i.min()}, {i.max()}]")
    return np.ascontiguousarray(v, dtype=dtype), np.ascontiguousarray(i, dtype=np.int64)


def _is_sparse(X: Any) -> bool:
    """Whether X is a scipy.sparse matrix or array (or another sparse container with its
    interface), recognised without importing scipy."""
    return hasattr(X, "nnz") and hasattr(X, "toarray") and not isinstance(X, np.ndarray)
