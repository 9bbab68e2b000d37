"""Datasets that need no network."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .config import check_int, check_positive_float


class SparseDictionaryData(NamedTuple):
    """Samples made from a known sparse dictionary."""

    X: np.ndarray
    """(n_samples, d_in) samples."""
    directions: np.ndarray
    """(n_components, d_in) ground-truth unit directions."""
    codes: np.ndarray
    """(n_samples, n_components) the non-negative coefficients of each sample."""


def make_sparse_dictionary(n_samples: int = 20000, d_in: int = 64, n_components: int = 128,
                           n_active: int = 4, noise: float = 0.01, random_state: int | None = 0,
                           dtype: str = "float32") -> SparseDictionaryData:
    """Synthetic data with a planted sparse dictionary.

    Each sample is a sum of ``n_active`` distinct ground-truth unit directions (chosen at
    random out of ``n_components``) with coefficients drawn uniformly from [0.5, 1.5), plus
    Gaussian noise of standard deviation ``noise`` per feature. A k-sparse autoencoder with
    ``k >= n_active`` and enough latents should find the directions again
    (see ``ksae.metrics.dictionary_recovery``).
    """
    n_samples = check_int("n_samples", n_samples, 1)
    d_in = check_int("d_in", d_in, 1)
    n_components = check_int("n_components", n_components, 1)
    n_active = check_int("n_active", n_active, 1, n_components)
    noise = check_positive_float("noise", noise, allow_zero=True)
    # A stream of its own, so that data and a model given the same integer seed do not share
    # random numbers (the model's first decoder rows would otherwise equal the planted atoms).
    rng = np.random.default_rng(None if random_state is None else [random_state, 0xDA7A])
    directions = rng.standard_normal((n_components, d_in))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    # n_active distinct components per sample: the first n_active of a random ranking
    chosen = np.argsort(rng.random((n_samples, n_components)), axis=1)[:, :n_active]
    codes = np.zeros((n_samples, n_components))
    np.put_along_axis(codes, chosen, rng.uniform(0.5, 1.5, (n_samples, n_active)), axis=1)
    X = codes @ directions + noise * rng.standard_normal((n_samples, d_in))
    return SparseDictionaryData(X.astype(dtype), directions.astype(dtype), codes.astype(dtype))
