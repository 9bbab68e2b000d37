"""Activation normalisation (``normalize_activations="mean_norm"``): train on rows scaled
by one factor ``s`` so that their mean norm is ``sqrt(d_in)`` (the field's convention for
transformer activations, whose scale differs by model and layer), then fold ``s`` into the
weights so that the fitted model takes raw rows.

``s`` is estimated once, from the training data's sample (its first 65536 rows), before
the weights are drawn. Training sees ``s * x``. The fold uses that relu-like activations
are positively homogeneous, ``act(pre / s) = act(pre) / s``, and that the top-k of
``pre / s`` are the top-k of ``pre``: dividing ``b_enc``, ``b_dec`` and the thresholds by
``s`` gives a model whose codes on ``x`` are its codes on ``s * x`` divided by ``s`` and
whose reconstruction of ``x`` is its reconstruction of ``s * x`` divided by ``s``; the
encoder and decoder matrices, unit decoder rows included, stay as they are. Activations
that are not positively homogeneous (sigmoid, tanh, gelu, ...) and a sigmoid output cannot
be folded and are refused.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from .batches import BatchSource
from .config import ModelConfig, TrainConfig
from .state import ModelState

HOMOGENEOUS_ACTIVATIONS = ("relu", "linear", "leaky_relu")


def check_foldable(cfg: ModelConfig) -> None:
    """Raise ValueError when a model of ``cfg`` cannot take the scale into its weights."""
    if cfg.activation not in HOMOGENEOUS_ACTIVATIONS or cfg.output_activation != "linear":
        raise ValueError(f"normalize_activations: 'mean_norm' folds the scale into the weights, "
                         f"which needs activation in {HOMOGENEOUS_ACTIVATIONS} and a linear "
                         f"output; got activation={cfg.activation!r}, output_activation="
                         f"{cfg.output_activation!r}")


def mean_norm_scale(rows: np.ndarray) -> float:
    """``sqrt(d) / mean ||row||`` over ``rows`` (float64); 1.0 where every row is zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
    mean = float(norms.mean()) if len(norms) else 0.0
    return math.sqrt(rows.shape[1]) / mean if mean > 0 else 1.0


class ScaledRows:
    """A batch source whose rows are another's times ``scale`` (``ksae.BatchSource``)."""

    def __init__(self, source: BatchSource, scale: float) -> None:
        self.source, self.scale = source, scale
        self.shape = source.shape
        self.dtype = getattr(source, "dtype", None)

    def _scaled(self, rows: np.ndarray) -> np.ndarray:
        return np.multiply(rows, rows.dtype.type(self.scale))

    def batches(self, batch_size: int, seed: int | None, skip: int = 0,
                n_threads: int = 0) -> Iterator[np.ndarray]:
        return (self._scaled(b) for b in self.source.batches(batch_size, seed, skip, n_threads))

    def total_variance(self, n_threads: int = 0) -> float:
        return self.source.total_variance(n_threads) * self.scale ** 2

    def sample(self) -> np.ndarray:
        return self._scaled(self.source.sample())

    def row(self, i: int) -> np.ndarray:
        return self._scaled(self.source.row(i))


def normalized(source: BatchSource, X_val: np.ndarray | None, train_cfg: TrainConfig,
               cfg: ModelConfig) -> tuple[BatchSource, np.ndarray | None, float]:
    """The training and validation rows as training sees them, and their scale (1.0
    unless ``train_cfg.normalize_activations`` asks for one)."""
    if train_cfg.normalize_activations == "none":
        return source, X_val, 1.0
    check_foldable(cfg)
    scale = mean_norm_scale(source.sample())
    scaled_val = None if X_val is None else np.multiply(X_val, X_val.dtype.type(scale))
    return ScaledRows(source, scale), scaled_val, scale


def fold_input_scale(state: ModelState, scale: float) -> None:
    """Make ``state``, trained on rows times ``scale``, take raw rows (see the module)."""
    if scale == 1.0:
        return
    p = state.params
    with state.changing():
        for name in ("b_enc", "b_dec"):
            np.divide(p[name], p[name].dtype.type(scale), out=p[name])
        if "log_threshold" in p:
            p["log_threshold"] -= p["log_threshold"].dtype.type(math.log(scale))
        if state.threshold is not None:
            state.threshold /= scale
