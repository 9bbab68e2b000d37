"""Reconstruction losses: each returns the loss and its gradient with respect to X_hat."""

from __future__ import annotations

import numpy as np


def mse_loss(X_hat: np.ndarray, X: np.ndarray, *, overwrite: bool = False) -> tuple[float, np.ndarray]:
    """Mean squared error over all elements, ``mean((X_hat - X)**2)``, and its gradient
    ``2 * (X_hat - X) / X.size``. With ``overwrite`` the gradient is written into X_hat's
    buffer (which the training step owns) instead of a new array."""
    diff = np.subtract(X_hat, X, out=X_hat if overwrite else None)
    flat = diff.reshape(-1)
    # einsum rather than np.dot: a BLAS call would wake NumPy's BLAS threads, which then spin
    # and compete with the kernels' OpenMP threads for the cores during the next kernel.
    loss = float(np.einsum("i,i->", flat, flat)) / flat.size
    diff *= diff.dtype.type(2.0 / flat.size)
    return loss, diff
