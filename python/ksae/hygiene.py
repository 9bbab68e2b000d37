"""Decoder hygiene: small named operations that keep a dictionary well-conditioned."""

from __future__ import annotations

import numpy as np


def normalize_rows(W: np.ndarray) -> None:
    """Scale each row of W to unit Euclidean norm, in place (all-zero rows stay zero)."""
    norms = np.linalg.norm(W, axis=1, keepdims=True)
    np.divide(W, norms, out=W, where=norms > 0)


def geometric_median(X: np.ndarray, *, max_iter: int = 100, tol: float = 1e-7,
                     max_samples: int = 20000, seed: int = 0) -> np.ndarray:
    """The point minimising the sum of Euclidean distances to the rows of X (Weiszfeld's
    iterations, in float64, on at most ``max_samples`` rows drawn at random). Unlike the mean
    it is not dragged by a few outlying samples, which makes it the better starting b_dec for
    heavy-tailed activations."""
    X = np.asarray(X, dtype=np.float64)
    if X.shape[0] > max_samples:
        X = X[np.random.default_rng(seed).choice(X.shape[0], max_samples, replace=False)]
    median = X.mean(axis=0)
    for _ in range(max_iter):
        dist = np.sqrt(np.einsum("ij,ij->i", X - median, X - median))
        weights = 1.0 / np.maximum(dist, 1e-12)
        updated = (weights[:, None] * X).sum(axis=0) / weights.sum()
        moved = np.sqrt(np.sum((updated - median) ** 2))
        median = updated
        if moved <= tol * max(1.0, np.sqrt(np.sum(median ** 2))):
            break
    return median


def initial_decoder_bias(X: np.ndarray, how: str) -> np.ndarray | None:
    """The starting b_dec for training data X: None for zeros, else its mean or geometric
    median (float64)."""
    if how == "mean":
        return np.asarray(X, dtype=np.float64).mean(axis=0)
    if how == "geometric_median":
        return geometric_median(X)
    return None
