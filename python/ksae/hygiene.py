"""Decoder hygiene: small named operations that keep a dictionary well-conditioned."""

from __future__ import annotations

import numpy as np


def normalize_rows(W: np.ndarray) -> None:
    """Scale each row of W to unit Euclidean norm, in place (all-zero rows stay zero)."""
    norms = np.linalg.norm(W, axis=1, keepdims=True)
    np.divide(W, norms, out=W, where=norms > 0)
