"""A fresh model's parameters: the weight draws of each ``init`` and the starting biases."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .buffers import aligned_copy, aligned_empty
from .config import ModelConfig
from .hygiene import initial_decoder_bias, normalize_rows


def initial_parameters(cfg: ModelConfig, d_in: int, rng: np.random.Generator,
                       X: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Fresh parameters in the internal layout for input width ``d_in`` (see ``init``;
    ``b_dec_init`` uses the training data X), drawn from ``rng`` straight into their final
    buffers so that no full-size temporaries raise the memory peak. A jumprelu model's
    ``log_threshold`` is zeros here: its starting value needs the weights (see
    ``ModelState.initialize``)."""
    n, dtype = cfg.n_latents, np.dtype(cfg.dtype)
    # Drawn in float64 row chunks (the same stream as one draw, so float32 and float64
    # models with one seed start from the same weights) without a full float64 copy.
    rows = max(1, (8 << 20) // (8 * d_in))

    def draw(sample: Callable[[int], np.ndarray]) -> np.ndarray:
        out = aligned_empty((n, d_in), dtype)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            out[start:stop] = sample(stop - start)
        return out

    def normal(scale: float) -> np.ndarray:
        return draw(lambda m: rng.standard_normal((m, d_in)) * scale)

    def uniform(bound: float) -> np.ndarray:
        return draw(lambda m: rng.uniform(-bound, bound, (m, d_in)))

    if cfg.init == "tied":
        W_dec = normal(1.0)
        normalize_rows(W_dec)
        W_enc_t = aligned_copy(W_dec)
    elif cfg.init == "xavier":
        bound = np.sqrt(6.0 / (d_in + n))
        W_enc_t, W_dec = uniform(bound), uniform(bound)
    else:  # he: variance 2 / fan_in for each layer
        W_enc_t, W_dec = normal(np.sqrt(2.0 / d_in)), normal(np.sqrt(2.0 / n))
    if cfg.normalize_decoder:
        normalize_rows(W_dec)
    b_dec = initial_decoder_bias(X, cfg.b_dec_init) if X is not None else None
    params = {"W_enc_t": W_enc_t, "b_enc": np.zeros(n), "W_dec": W_dec,
              "b_dec": np.zeros(d_in) if b_dec is None else b_dec}
    if cfg.sparsity == "jumprelu":
        params["log_threshold"] = np.zeros(n)
    return params
