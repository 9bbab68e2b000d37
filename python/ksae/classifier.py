"""Supervised fine-tuning of a k-sparse encoder with a softmax head: ``SparseClassifier``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _core
from .buffers import aligned_copy, aligned_empty, aligned_zeros
from .exceptions import not_fitted
from .config import NEEDS_SELECTED_PRE, ModelConfig, TrainConfig, check_int, check_known_keys
from .losses import softmax, softmax_cross_entropy
from .estimator import SparseAutoencoder
from .state import encode_chunk_rows
from .optim import Optimizer, clip_grad_norm, make_optimizer
from .schedules import make_schedule
from .validation import as_float_matrix

FIT_OPTIONS = ("momentum", "nesterov", "weight_decay", "schedule", "warmup_steps",
               "lr_step_size", "lr_gamma", "min_lr", "clip_grad_norm")
"""The TrainConfig fields that apply to a classifier, beyond fit's named arguments."""

def as_labels(y: Any, n_samples: int, n_classes: int) -> np.ndarray:
    """``y`` as an int64 vector of ``n_samples`` class indices in [0, n_classes)."""
    labels = np.asarray(y)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"y: expected integer class labels 0..{n_classes - 1}, got dtype {labels.dtype}")
    if labels.shape != (n_samples,):
        raise ValueError(f"y: expected {n_samples} labels (one per row of X), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"y: expected labels in [0, {n_classes}) (n_classes = {n_classes}), got "
                         f"values in [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


class SparseClassifier:
    """A k-sparse encoder fine-tuned with a softmax head on labelled data.

    Starting from a fitted topk ``SparseAutoencoder`` (its encoder weights are copied; the
    autoencoder is left as it is)::

        code   = the top-k code of x, as autoencoder.encode computes it (k latents)
        logits = code @ W_head + b_head          (the sparse decode kernel, batch*k*n_classes)
        p(y|x) = softmax(logits)

    ``fit`` minimises the mean cross-entropy over W_enc, b_enc, W_head and b_head together,
    the gradient reaching the encoder through the k kept latents (the backward kernel with the
    head in place of the decoder). The input centering b_dec stays fixed: its effect on the
    pre-activations, a shift, is b_enc's to learn. The head starts at zero.

    Fitted attributes: ``W_enc_`` (d_in, n_latents), ``b_enc_``, ``b_dec_`` (the fixed
    centering), ``W_head_`` (n_latents, n_classes), ``b_head_``, ``classes_`` (0..n_classes-1),
    ``n_iter_`` and ``history_`` (per-epoch mean ``loss`` and training ``accuracy``, measured
    on each batch before its update).
    """

    def __init__(self, autoencoder: SparseAutoencoder, n_classes: int, *,
                 random_state: int | None = None) -> None:
        self.autoencoder = autoencoder
        self.n_classes = n_classes
        self.random_state = random_state

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"autoencoder": self.autoencoder, "n_classes": self.n_classes,
                "random_state": self.random_state}

    # ----------------------------------------------------------------- training
    def fit(self, X: Any, y: Any, *, epochs: int = 10, batch_size: int = 256, lr: float = 1e-3,
            optimizer: str = "adam", shuffle: bool = True, **options: Any) -> "SparseClassifier":
        """Copy the autoencoder's encoder, start the head at zero and train both for
        ``epochs`` passes over (X, y), labels being integers 0..n_classes-1. ``options`` are
        the optimizer, schedule and clipping fields of TrainConfig (``FIT_OPTIONS``).
        Returns self."""
        check_known_keys("fit", options, list(FIT_OPTIONS))
        train_cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                                shuffle=shuffle, **options)
        cfg = self._encoder_config()
        n_classes = check_int("n_classes", self.n_classes, 2)
        source = self.autoencoder.state_.params
        X = as_float_matrix(X, "X", cfg.dtype, source["W_dec"].shape[1],
                            owner="SparseClassifier")
        y = as_labels(y, X.shape[0], n_classes)
        dtype = np.dtype(cfg.dtype)
        self._params = {"W_enc_t": aligned_copy(source["W_enc_t"]), "b_enc": aligned_copy(source["b_enc"]),
                        "W_head": aligned_zeros((cfg.n_latents, n_classes), dtype),
                        "b_head": aligned_zeros(n_classes, dtype)}
        self._centering = source["b_dec"].copy()
        self._k, self._activation, self._n_threads = cfg.k, cfg.activation, cfg.n_threads or 0
        self._grads = {name: aligned_empty(p.shape, dtype) for name, p in self._params.items()}
        rows = min(train_cfg.batch_size, X.shape[0])
        workspace = {"centered": aligned_empty((rows, X.shape[1]), dtype)}
        if cfg.activation in NEEDS_SELECTED_PRE:
            workspace["selected_pre"] = aligned_empty((rows, cfg.k), dtype)
        self.classes_ = np.arange(n_classes)
        self.n_iter_ = 0
        self.history_: dict[str, list[float]] = {"loss": [], "accuracy": []}
        rng = np.random.default_rng(self.random_state)
        n = X.shape[0]
        steps_per_epoch = math.ceil(n / train_cfg.batch_size)
        schedule = make_schedule(train_cfg.schedule, train_cfg.lr,
                                 total_steps=train_cfg.epochs * steps_per_epoch,
                                 warmup_steps=train_cfg.warmup_steps,
                                 step_size=train_cfg.lr_step_size, gamma=train_cfg.lr_gamma,
                                 min_lr=train_cfg.min_lr)
        opt = make_optimizer(train_cfg)
        for _ in range(train_cfg.epochs):
            order = rng.permutation(n) if train_cfg.shuffle else np.arange(n)
            loss_sum = correct = 0.0
            for start in range(0, n, train_cfg.batch_size):
                rows = order[start:start + train_cfg.batch_size]
                opt.lr = schedule(opt.n_steps)
                ws = {name: buffer[:len(rows)] for name, buffer in workspace.items()}
                loss, hits = self._step(X[rows], y[rows], opt, train_cfg.clip_grad_norm, ws)
                loss_sum += loss * len(rows)
                correct += hits
            self.history_["loss"].append(loss_sum / n)
            self.history_["accuracy"].append(correct / n)
        return self

    def _encoder_config(self) -> ModelConfig:
        if not isinstance(self.autoencoder, SparseAutoencoder):
            raise TypeError(f"autoencoder: expected a fitted ksae.SparseAutoencoder, got "
                            f"{type(self.autoencoder).__name__}")
        cfg = self.autoencoder.config
        self.autoencoder.state_.use_config(cfg)  # fitted, with weights its parameters describe
        if cfg.sparsity != "topk":
            raise ValueError(f"autoencoder: SparseClassifier fine-tunes a topk encoder; this one's "
                             f"sparsity is {cfg.sparsity!r}")
        return cfg

    def _step(self, X: np.ndarray, y: np.ndarray, opt: Optimizer, clip: float | None,
              ws: dict[str, np.ndarray]) -> tuple[float, int]:
        """One optimizer step on a batch, with scratch arrays ``ws`` for it: returns its loss
        and its number of correct predictions, both before the update."""
        p, g, nt = self._params, self._grads, self._n_threads
        centered, selected_pre = ws["centered"], ws.get("selected_pre")
        # No pre-activation buffer: the encode selects while it multiplies (the fused path).
        values, indices = _core.encode(X, p["W_enc_t"], p["b_enc"], self._centering, self._k,
                                       self._activation, nt, centered, None, selected_pre)
        logits = _core.decode(values, indices, p["W_head"], p["b_head"], nt)
        hits = int(np.count_nonzero(np.argmax(logits, axis=1) == y))
        loss, grad_logits = softmax_cross_entropy(logits, y)
        if not np.isfinite(loss):
            raise FloatingPointError(f"training diverged at step {self.n_iter_ + 1}: the loss is "
                                     f"{loss}; lower the learning rate or rescale the data")
        _core.backward(grad_logits, centered, values, indices, p["W_enc_t"], p["W_head"],
                       self._activation, False, nt, g["W_enc_t"], g["b_enc"], g["W_head"], None,
                       False, selected_pre)
        np.sum(grad_logits, axis=0, out=g["b_head"])
        if clip is not None:
            clip_grad_norm(g, clip, nt)
        opt.step(p, g, n_threads=nt)
        self.n_iter_ += 1
        return loss, hits

    # ----------------------------------------------------------------- inference
    def _fitted(self) -> dict[str, np.ndarray]:
        if not hasattr(self, "_params"):
            raise not_fitted("SparseClassifier", "fit")
        return self._params

    def decision_function(self, X: Any) -> np.ndarray:
        """The logits, (n_samples, n_classes)."""
        p = self._fitted()
        X = as_float_matrix(X, "X", p["W_enc_t"].dtype, p["W_enc_t"].shape[1],
                            owner="SparseClassifier")
        logits = np.empty((X.shape[0], p["W_head"].shape[1]), dtype=X.dtype)
        chunk = encode_chunk_rows(X.itemsize)
        for start in range(0, X.shape[0], chunk):
            values, indices = _core.encode(X[start:start + chunk], p["W_enc_t"], p["b_enc"],
                                           self._centering, self._k, self._activation,
                                           self._n_threads)
            logits[start:start + chunk] = _core.decode(values, indices, p["W_head"],
                                                       p["b_head"], self._n_threads)
        return logits

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, (n_samples, n_classes)."""
        return softmax(self.decision_function(X))

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row (int64)."""
        return np.argmax(self.decision_function(X), axis=1)

    def score(self, X: Any, y: Any) -> float:
        """Accuracy: the fraction of rows whose predicted class is y."""
        predicted = self.predict(X)
        return float(np.mean(predicted == as_labels(y, predicted.shape[0], len(self.classes_))))

    @property
    def W_enc_(self) -> np.ndarray:
        """The fine-tuned encoder weights, (d_in, n_latents)."""
        return self._fitted()["W_enc_t"].T

    @property
    def b_enc_(self) -> np.ndarray:
        return self._fitted()["b_enc"]

    @property
    def b_dec_(self) -> np.ndarray:
        """The input centering (the autoencoder's b_dec, not trained)."""
        self._fitted()
        return self._centering

    @property
    def W_head_(self) -> np.ndarray:
        """The head's weights, (n_latents, n_classes)."""
        return self._fitted()["W_head"]

    @property
    def b_head_(self) -> np.ndarray:
        return self._fitted()["b_head"]
