"""Shared fixtures and helpers for the ksae test suite.

Randomness is seeded (the ``rng`` fixture); kernels are held to ``ksae.reference`` computed
in float64 with the norm-wise relative error ``rel_err`` under ``TOL[dtype]``.
"""

from __future__ import annotations

import numpy as np
import pytest

DTYPES = (np.float32, np.float64)
THREADS = (1, 2)
ACTIVATIONS = ("relu", "linear", "sigmoid", "tanh", "leaky_relu", "elu", "swish", "gelu", "softmax")

TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}
"""Largest norm-wise relative error accepted against the float64 reference, per dtype."""


def tol(dtype) -> float:
    return TOL[np.dtype(dtype)]


def rel_err(a, b) -> float:
    """Norm-wise relative error ``||a - b|| / max(||b||, tiny)``, computed in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    denom = max(float(np.linalg.norm(b)), np.finfo(np.float64).tiny)
    return float(np.linalg.norm(a - b)) / denom


def make_weights(rng: np.random.Generator, d_in: int, n_latents: int, dtype=np.float64,
                 *, bias_scale: float = 0.1) -> dict[str, np.ndarray]:
    """Random parameters in the internal layout: W_enc_t (n_latents, d_in) is W_enc
    transposed, b_enc (n_latents,), W_dec (n_latents, d_in), b_dec (d_in,). All C-contiguous
    arrays of ``dtype``; encoder columns are scaled so pre-activations are O(1)."""
    W_enc_t = rng.standard_normal((n_latents, d_in)) / np.sqrt(d_in)
    W_dec = rng.standard_normal((n_latents, d_in))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    params = {
        "W_enc_t": W_enc_t,
        "b_enc": bias_scale * rng.standard_normal(n_latents),
        "W_dec": W_dec,
        "b_dec": bias_scale * rng.standard_normal(d_in),
    }
    return {name: np.ascontiguousarray(p, dtype=dtype) for name, p in params.items()}


def as64(*arrays):
    """The arrays cast to float64 (indices and other integer arrays are left alone)."""
    out = tuple(a.astype(np.float64) if a.dtype.kind == "f" else a for a in arrays)
    return out if len(out) > 1 else out[0]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


@pytest.fixture
def make_rng():
    """Factory for independently seeded generators (for tests that try several seeds)."""
    return np.random.default_rng
