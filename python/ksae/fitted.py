"""The fitted attributes of ``SparseAutoencoder`` (``W_enc_``, ``n_iter_``, ``state_``, ...):
a base class that reads them from the estimator's model state."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .config import ModelConfig
from .exceptions import not_fitted
from .state import ModelState


class FittedAttributes:
    """SparseAutoencoder's fitted attributes, read from its model state; each raises
    NotFittedError (an AttributeError too: ``hasattr`` is False) before fitting."""

    _state: ModelState | None
    sparsity: str
    _cfg: Callable[[], ModelConfig]  # the estimator's validated configuration

    @property
    def state_(self) -> ModelState:
        """The model state: weights, firing counters, generator (``ksae.ModelState``)."""
        if self._state is None:
            raise not_fitted(type(self).__name__)
        return self._state

    def _ready(self) -> ModelState:
        """The model state, set to compute with the current parameters (set_params after
        fitting may change the activation or inference_k_scale; n_latents, dtype and
        sparsity need a new fit, and a model asked to compute with others raises)."""
        state = self.state_
        state.use_config(self._cfg())
        return state

    def _weight(self, name: str) -> np.ndarray:
        """The model's weight ``name`` itself (a writable view): it may be written in place,
        so the next encode or decode checks the weights for NaN and infinity again."""
        state = self.state_
        state.weights_changed()
        return state.params[name]

    W_enc_ = property(lambda self: self._weight("W_enc_t").T,
                      doc="Encoder weights, (d_in, n_latents) (a transposed view of the internal layout).")
    b_enc_ = property(lambda self: self._weight("b_enc"), doc="Encoder bias, (n_latents,).")
    W_dec_ = property(lambda self: self._weight("W_dec"),
                      doc="Decoder weights, (n_latents, d_in); rows have unit norm with normalize_decoder.")
    b_dec_ = property(lambda self: self._weight("b_dec"),
                      doc="Decoder bias, (d_in,); it is also subtracted from the input before encoding.")
    n_features_in_ = property(lambda self: self.state_.d_in, doc="Input width d_in seen at fit time.")
    n_iter_ = property(lambda self: self.state_.n_iter, doc="Optimizer steps taken.")
    samples_since_fired_ = property(lambda self: self.state_.samples_since_fired,
                                    doc="Per latent, training samples since it last fired.")

    @property
    def threshold_(self) -> float | None:
        """batchtopk: the inference threshold learned in training (None otherwise)."""
        return self.state_.threshold

    @property
    def log_threshold_(self) -> np.ndarray:
        """jumprelu: the log of each latent's threshold, (n_latents,) (theta = exp of it)."""
        if "log_threshold" not in self.state_.params:
            raise AttributeError(f"log_threshold_: only jumprelu models have thresholds; this "
                                 f"one's sparsity is {self.sparsity!r}")
        return self._weight("log_threshold")
