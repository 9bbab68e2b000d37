"""Classification on top of the codes: a linear probe (softmax regression)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .exceptions import not_fitted
from .config import TrainConfig, check_int, check_positive_float
from .losses import softmax, softmax_cross_entropy
from .optim import make_optimizer
from .validation import as_float_matrix


class LinearProbe:
    """Softmax regression ``p(y | z) = softmax(z @ W + b)`` trained by mini-batch gradient
    descent with ksae's optimizers, on features such as ``SparseAutoencoder.transform(X)``.
    A probe's accuracy measures how linearly readable the codes make the labels.

    ``l2`` is the weight of ``l2 * sum(W**2)`` (biases are not penalised); ``optimizer``,
    ``lr``, ``epochs`` and ``batch_size`` mean what they do in ``SparseAutoencoder.fit``.
    Fitted attributes: ``coef_`` (n_features, n_classes), ``intercept_``, ``classes_``,
    ``history_`` (per-epoch mean cross-entropy in ``loss``).
    """

    def __init__(self, *, l2: float = 1e-4, epochs: int = 20, batch_size: int = 256,
                 lr: float = 1e-2, optimizer: str = "adam", random_state: int | None = None,
                 dtype: str = "float32") -> None:
        self.l2, self.epochs, self.batch_size, self.lr = l2, epochs, batch_size, lr
        self.optimizer, self.random_state, self.dtype = optimizer, random_state, dtype

    def fit(self, Z: Any, y: Any) -> "LinearProbe":
        """Train on features Z (n_samples, n_features) and integer or string labels y."""
        l2 = check_positive_float("l2", self.l2, allow_zero=True)
        train = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                            optimizer=self.optimizer, momentum=0.0 if self.optimizer != "sgd" else 0.9)
        Z = as_float_matrix(Z, "Z", self.dtype)
        y = np.asarray(y)
        if y.ndim != 1 or y.shape[0] != Z.shape[0]:
            raise ValueError(f"y: expected {Z.shape[0]} labels (one per row of Z), got shape {y.shape}")
        self.classes_, targets = np.unique(y, return_inverse=True)
        n_classes = check_int("number of classes in y", len(self.classes_), 2)
        rng = np.random.default_rng(self.random_state)
        params = {"W": np.zeros((Z.shape[1], n_classes), dtype=Z.dtype),
                  "b": np.zeros(n_classes, dtype=Z.dtype)}
        optimizer = make_optimizer(train)
        self.history_: dict[str, list[float]] = {"loss": []}
        n = Z.shape[0]
        for _ in range(train.epochs):
            order = rng.permutation(n)
            total = 0.0
            for start in range(0, n, train.batch_size):
                rows = order[start:start + train.batch_size]
                loss, grads = self._loss_and_grads(params, Z[rows], targets[rows], l2)
                optimizer.step(params, grads)
                total += loss * len(rows)
            self.history_["loss"].append(total / n)
        self.coef_, self.intercept_ = params["W"], params["b"]
        return self

    @staticmethod
    def _loss_and_grads(params: dict[str, np.ndarray], Z: np.ndarray, targets: np.ndarray,
                        l2: float) -> tuple[float, dict[str, np.ndarray]]:
        loss, grad_logits = softmax_cross_entropy(Z @ params["W"] + params["b"], targets)
        grad_W = Z.T @ grad_logits
        if l2:
            grad_W += params["W"] * params["W"].dtype.type(2 * l2)
        return loss, {"W": np.ascontiguousarray(grad_W), "b": grad_logits.sum(axis=0)}

    def predict_proba(self, Z: Any) -> np.ndarray:
        """Class probabilities, (n_samples, n_classes) in the order of ``classes_``."""
        if not hasattr(self, "coef_"):
            raise not_fitted("LinearProbe", "fit")
        Z = as_float_matrix(Z, "Z", self.dtype, self.coef_.shape[0], owner="LinearProbe")
        return softmax(Z @ self.coef_ + self.intercept_)

    def predict(self, Z: Any) -> np.ndarray:
        """The most probable label of each row."""
        proba = self.predict_proba(Z)
        return self.classes_[np.argmax(proba, axis=1)]

    def score(self, Z: Any, y: Any) -> float:
        """Accuracy: the fraction of rows whose predicted label equals y."""
        return float(np.mean(self.predict(Z) == np.asarray(y)))

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"l2": self.l2, "epochs": self.epochs, "batch_size": self.batch_size,
                "lr": self.lr, "optimizer": self.optimizer, "random_state": self.random_state,
                "dtype": self.dtype}
