"""Losses: each returns the loss and its gradient with respect to its input (the
reconstruction X_hat, or a classifier's logits)."""

from __future__ import annotations

import numpy as np

from .config import ModelConfig, TrainConfig


def mse_loss(X_hat: np.ndarray, X: np.ndarray, *, overwrite: bool = False) -> tuple[float, np.ndarray]:
    """Mean squared error over all elements, ``mean((X_hat - X)**2)``, and its gradient
    ``2 * (X_hat - X) / X.size``. With ``overwrite`` the gradient is written into X_hat's
    buffer (which the training step owns) instead of a new array."""
    diff = np.subtract(X_hat, X, out=X_hat if overwrite else None)
    flat = diff.reshape(-1)
    # einsum rather than np.dot: a BLAS call would wake NumPy's BLAS threads, which then spin
    # and compete with the kernels' OpenMP threads for the cores during the next kernel.
    loss = float(np.einsum("i,i->", flat, flat)) / flat.size
    diff *= diff.dtype.type(2.0 / flat.size)
    return loss, diff


def sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The logistic function, computed without overflow warnings for large |x|."""
    out = np.negative(x, out=out)
    np.exp(np.minimum(out, 80, out=out), out=out)
    out += 1
    return np.reciprocal(out, out=out)


def bce_with_logits(logits: np.ndarray, X: np.ndarray) -> tuple[float, np.ndarray]:
    """Binary cross-entropy of sigmoid(logits) against targets X in [0, 1], averaged over all
    elements: ``mean(softplus(logits) - X * logits)``, and its gradient with respect to the
    logits, ``(sigmoid(logits) - X) / X.size``. Stable for logits of any size."""
    softplus = np.logaddexp(0, logits)
    loss = float(np.mean(softplus - X * logits, dtype=np.float64))
    grad = sigmoid(logits)
    grad -= X
    grad *= grad.dtype.type(1.0 / X.size)
    return loss, grad


def sigmoid_mse(logits: np.ndarray, X: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean squared error of sigmoid(logits) against X, and its gradient with respect to the
    logits: ``2 * (s - X) * s * (1 - s) / X.size``."""
    s = sigmoid(logits)
    diff = s - X
    loss = float(np.mean(diff * diff, dtype=np.float64))
    diff *= s * (1 - s)
    diff *= diff.dtype.type(2.0 / X.size)
    return loss, diff


def reconstruction_loss(X_hat: np.ndarray, X: np.ndarray, output_activation: str,
                        loss: str) -> tuple[float, np.ndarray]:
    """The training loss of a reconstruction whose decoder output, before the output
    activation, is ``X_hat`` (a buffer the step owns and may overwrite), and the gradient with
    respect to it: MSE of the linear or sigmoid output, or binary cross-entropy of the sigmoid
    output."""
    if loss == "bce":
        if output_activation != "sigmoid":
            raise ValueError("loss: 'bce' needs output_activation='sigmoid' (a probability per feature)")
        return bce_with_logits(X_hat, X)
    if output_activation == "sigmoid":
        return sigmoid_mse(X_hat, X)
    return mse_loss(X_hat, X, overwrite=True)


def linear_mse(cfg: ModelConfig, train_cfg: TrainConfig) -> bool:
    """Whether a model trains on the MSE of its linear output: the loss the kernels'
    decode_mse computes, and the residual AuxK reconstructs."""
    return train_cfg.loss == "mse" and cfg.output_activation == "linear"


def add_weight_penalties(params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
                         l1: float, l2: float) -> None:
    """Add the gradients of ``l1 * sum|W| + l2 * sum W^2`` over the encoder and decoder
    weights (not the biases) to ``grads``, in place. Both weights > 0 make an elastic net."""
    for name in ("W_enc_t", "W_dec"):
        W, G = params[name], grads[name]
        if l2:
            G += W * W.dtype.type(2 * l2)
        if l1:
            G += np.sign(W) * W.dtype.type(l1)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by each row's maximum so that no exponential overflows."""
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return probs


def softmax_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) (n, classes) against integer targets (n,),
    ``mean(-log softmax(logits)[i, targets[i]])``, and its gradient with respect to the
    logits, ``(softmax(logits) - onehot(targets)) / n``."""
    probs = softmax(logits)
    rows = np.arange(len(targets))
    loss = float(-np.mean(np.log(np.maximum(probs[rows, targets], 1e-30)), dtype=np.float64))
    probs[rows, targets] -= 1
    probs /= len(targets)
    return loss, probs
