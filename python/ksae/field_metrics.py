"""The field's figures for a sparse autoencoder, streamed over rows in bounded memory.

``store_metrics`` reads its rows a batch at a time (an ``ActivationStore`` view, an array, a
``NpyRowStream`` or any iterable of row batches) and keeps only per-feature and per-latent
float64 / int64 sums, so an activation store of any length is measured in one pass:

- ``fvu``: fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``,
  the total variance merged batch by batch with Chan et al.'s parallel formula (each batch's
  mean and centred sum of squares, in float64), which is exact where ``sum x^2 - n mean^2``
  cancels;
- ``l0``: active latents per row (non-zero code values: ``ksae.sparsity.active_mask``);
- ``dead_fraction``, ``dense_fraction``: latents active on no row, on more than
  ``dense_threshold`` (10%) of the rows;
- ``log_density_histogram``: the histogram of log10(firing density) of the live latents,
  a quarter decade a bin, the dead ones counted apart;
- ``relative_reconstruction_bias``: gamma of the Gated SAE paper (Rajamanoharan et al.,
  2024, section 5), ``argmin_g E ||x_hat / g - x||^2 = E ||x_hat||^2 / E[x_hat . x]``: 1 for
  an unbiased reconstruction, below 1 when it shrinks; ``optimal_scale`` is its inverse,
  ``argmin_s E ||s x_hat - x||^2 = E[x_hat . x] / E ||x_hat||^2``.

``firing_counts`` gives the per-latent counts alone (an encode pass, no decode).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .config import check_int
from .sparsity import active_mask

BINS_PER_DECADE = 4


def row_batches(rows_source: Any, batch_size: int) -> Iterator[np.ndarray]:
    """The rows of ``rows_source`` in order, ``batch_size`` at a time: a batch source with
    ``batches(batch_size, seed)`` (``ActivationStore`` and its views), a stream with
    ``iter_chunks`` (``NpyRowStream``), a 2-D array, or an iterable of 2-D row batches. An
    ``ActivationStore`` is read one shard at a time (the same rows in the same order as
    its wider windows give, with the fewest in memory)."""
    check_int("batch_size", batch_size, 1)
    if hasattr(rows_source, "batches"):
        if hasattr(rows_source, "window_shards"):  # a store: one shard in memory at a time
            rows_source = copy.copy(rows_source)
            rows_source.window_shards = 1
        yield from rows_source.batches(batch_size, seed=None)
    elif hasattr(rows_source, "iter_chunks"):
        yield from rows_source.iter_chunks(batch_size)
    elif isinstance(rows_source, np.ndarray):
        if rows_source.ndim != 2:
            raise ValueError(f"rows_source: expected a 2-D array of rows, got shape {rows_source.shape}")
        for start in range(0, len(rows_source), batch_size):
            yield rows_source[start:start + batch_size]
    elif isinstance(rows_source, Iterable):
        yield from rows_source
    else:
        raise TypeError("rows_source: expected an ActivationStore, a NpyRowStream, a 2-D array "
                        f"or an iterable of row batches, got {type(rows_source).__name__}")


def fired_latents(values: np.ndarray, indices: np.ndarray, cfg: Any) -> np.ndarray:
    """Per-latent counts of active code entries in one code (n_latents,), int64."""
    return np.bincount(indices[active_mask(values, cfg)], minlength=cfg.n_latents).astype(np.int64)


def firing_counts(sae: Any, rows_source: Any, *, batch_size: int = 4096) -> tuple[np.ndarray, int]:
    """(rows on which each latent is active, (n_latents,) int64; the number of rows)."""
    counts = np.zeros(sae.config.n_latents, dtype=np.int64)
    n = 0
    for X in row_batches(rows_source, batch_size):
        values, indices = sae.encode(X)
        counts += fired_latents(values, indices, sae.config)
        n += len(X)
    return counts, n


class _Sums:
    """The float64 sums ``store_metrics`` accumulates, merged a batch at a time."""

    def __init__(self, d: int, n_latents: int) -> None:
        self.n = 0
        self.mean = np.zeros(d)
        self.m2 = 0.0  # sum ||x - mean||^2 over the rows so far
        self.sse = self.cross = self.hat_sq = 0.0
        self.active = 0
        self.counts = np.zeros(n_latents, dtype=np.int64)

    def add(self, X: np.ndarray, X_hat: np.ndarray, fired: np.ndarray) -> None:
        X64, hat64 = np.asarray(X, dtype=np.float64), np.asarray(X_hat, dtype=np.float64)
        m = len(X64)
        if m == 0:
            return
        batch_mean = X64.mean(axis=0)
        centred = X64 - batch_mean
        delta = batch_mean - self.mean
        total = self.n + m
        self.m2 += float(np.einsum("ij,ij->", centred, centred)) + float(delta @ delta) * self.n * m / total
        self.mean += delta * (m / total)
        self.n = total
        residual = X64 - hat64
        self.sse += float(np.einsum("ij,ij->", residual, residual))
        self.cross += float(np.einsum("ij,ij->", hat64, X64))
        self.hat_sq += float(np.einsum("ij,ij->", hat64, hat64))
        self.active += int(fired.sum())  # each active entry is one latent of one row
        self.counts += fired


def log_density_histogram(counts: np.ndarray, n_rows: int) -> dict[str, Any]:
    """The histogram of log10(count / n_rows) of the latents with count > 0: ``edges``
    (a quarter decade apart, from below log10(1 / n_rows) to 0), ``counts`` per bin (the
    last bin closed), and ``dead`` (latents with count 0, not in the bins)."""
    live = counts[counts > 0]
    low = math.floor(math.log10(1.0 / max(n_rows, 1)) * BINS_PER_DECADE) / BINS_PER_DECADE
    edges = np.linspace(low, 0.0, round(-low * BINS_PER_DECADE) + 1) if low < 0 else np.array([-1.0, 0.0])
    hist, _ = np.histogram(np.log10(live / n_rows), bins=edges)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in hist],
            "dead": int(len(counts) - len(live))}


def store_metrics(sae: Any, rows_source: Any, *, batch_size: int = 4096,
                  dense_threshold: float = 0.1) -> dict[str, Any]:
    """FVU, L0, dead and dense fractions, the log-density histogram and the relative
    reconstruction bias of ``sae`` on the rows of ``rows_source`` (see the module), in one
    streaming pass with float64 sums; also ``n_rows`` and ``firing_counts`` (a list, per
    latent). ``dense_threshold``: the firing density above which a latent is dense."""
    if not 0 <= dense_threshold <= 1:
        raise ValueError(f"dense_threshold: expected a number in [0, 1], got {dense_threshold!r}")
    cfg = sae.config
    sums: _Sums | None = None
    for X in row_batches(rows_source, batch_size):
        values, indices = sae.encode(X)
        X_hat = sae.decode(values, indices)
        if sums is None:
            sums = _Sums(np.shape(X)[1], cfg.n_latents)
        sums.add(X, X_hat, fired_latents(values, indices, cfg))
    if sums is None or sums.n == 0:
        raise ValueError("rows_source: expected at least one row, got none")
    if sums.m2 == 0:
        raise ValueError("rows_source: every feature is constant, so the FVU is undefined")
    density = sums.counts / sums.n
    return {
        "n_rows": sums.n,
        "fvu": sums.sse / sums.m2,
        "mse": sums.sse / (sums.n * len(sums.mean)),
        "l0": sums.active / sums.n,
        "dead_fraction": float(np.mean(sums.counts == 0)),
        "dense_fraction": float(np.mean(density > dense_threshold)),
        "log_density_histogram": log_density_histogram(sums.counts, sums.n),
        "relative_reconstruction_bias": sums.hat_sq / sums.cross if sums.cross else float("nan"),
        "optimal_scale": sums.cross / sums.hat_sq if sums.hat_sq else float("nan"),
        "firing_counts": sums.counts.tolist(),
    }
