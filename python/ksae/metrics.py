"""Quality figures for reconstructions and learned dictionaries."""

from __future__ import annotations

import numpy as np


def fraction_of_variance_explained(X: np.ndarray, X_hat: np.ndarray) -> float:
    """``1 - sum((X - X_hat)**2) / sum((X - mean(X, axis=0))**2)``: 1 for a perfect
    reconstruction, 0 for one no better than the per-feature mean of X."""
    X = np.asarray(X, dtype=np.float64)
    residual = np.sum((X - np.asarray(X_hat, dtype=np.float64)) ** 2)
    total = np.sum((X - X.mean(axis=0)) ** 2)
    if total == 0:
        raise ValueError("X: every feature is constant, so the fraction of variance explained is undefined")
    return float(1.0 - residual / total)


def dictionary_recovery(true_directions: np.ndarray, W_dec: np.ndarray) -> float:
    """Mean over the true directions (rows) of the best cosine similarity with any learned
    decoder row: 1 when every true direction is matched exactly by some latent."""
    return float(best_cosine_similarities(true_directions, W_dec).mean())


def best_cosine_similarities(true_directions: np.ndarray, W_dec: np.ndarray) -> np.ndarray:
    """For each true direction (row), its largest cosine similarity with any learned decoder
    row: an array of shape (n_directions,) whose mean is ``dictionary_recovery``."""
    T = np.asarray(true_directions, dtype=np.float64)
    D = np.asarray(W_dec, dtype=np.float64)
    if T.ndim != 2 or D.ndim != 2 or T.shape[1] != D.shape[1]:
        raise ValueError(f"true_directions, W_dec: expected 2-D arrays of equal width, got {T.shape} and {D.shape}")
    T = T / np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-300)
    D = D / np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-300)
    return (T @ D.T).max(axis=1)
