"""Plain-NumPy reference of every ksae kernel, and a dense NumPy model built from them.

Each function states the dense expression the C++ kernel must equal. They compute in the
dtype they are given: the tests call them in float64 to hold the kernels to them, and the
benchmarks race the kernels against them in float32 (``DenseNumpySAE``), which is the same
model written the way one would write it in NumPy, with dense matrices.

Matrices use the public shapes: ``W_enc`` is (d_in, n_latents), ``W_dec`` (n_latents, d_in).
"""

from __future__ import annotations

from typing import Callable

import math

import numpy as np

from .hygiene import normalize_rows

def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


_erf = np.vectorize(math.erf, otypes=[float])


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_derivative(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


LEAKY_SLOPE = 0.01

ACTIVATIONS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray, np.ndarray], np.ndarray]]] = {
    "relu": (lambda x: np.maximum(x, 0), lambda a, x: (a > 0).astype(a.dtype)),
    "linear": (lambda x: x, lambda a, x: np.ones_like(a)),
    "sigmoid": (_sigmoid, lambda a, x: a * (1 - a)),
    "tanh": (np.tanh, lambda a, x: 1 - a * a),
    "leaky_relu": (lambda x: np.where(x > 0, x, LEAKY_SLOPE * x),
                   lambda a, x: np.where(a > 0, 1.0, LEAKY_SLOPE).astype(a.dtype)),
    "elu": (lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
            lambda a, x: np.where(a > 0, 1.0, a + 1).astype(a.dtype)),
    "swish": (lambda x: x * _sigmoid(x),
              lambda a, x: _sigmoid(x) + x * _sigmoid(x) * (1 - _sigmoid(x))),
    "gelu": (_gelu, _gelu_derivative),
}
"""Elementwise activations: name -> (act(x), d act / dx written as f(a, x) with a = act(x)).
``softmax`` is not elementwise: it normalises each row's k kept values (see
``activate_selected``)."""

NON_MONOTONE = ("swish", "gelu")
"""Activations whose top-k must be chosen on act(pre) rather than pre."""


def selection_scores(pre: np.ndarray, activation: str) -> np.ndarray:
    """What the top-k ranks: act(pre) for non-monotone activations, pre otherwise (the same
    order for monotone ones, with act's ties, such as relu's zeros, broken by pre)."""
    return ACTIVATIONS[activation][0](pre) if activation in NON_MONOTONE else pre


def activate_selected(x: np.ndarray, activation: str) -> np.ndarray:
    """The values of the kept latents from their pre-activations x (batch, k): softmax over
    each row's k entries, or the elementwise activation."""
    if activation == "softmax":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return ACTIVATIONS[activation][0](x)


def topk_indices(pre: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, in decreasing order, the lower index
    first on ties: exactly ``np.argsort(-pre, axis=1, kind="stable")[:, :k]``, computed with
    ``argpartition`` in O(batch * n_latents)."""
    batch, n = pre.shape
    pre = np.where(np.isnan(pre), -np.inf, pre)  # NaN ranks as -inf (ties by index)
    if k >= n:
        return np.argsort(-pre, axis=1, kind="stable")[:, :k]
    part = np.argpartition(-pre, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(pre, part, axis=1).min(axis=1, keepdims=True)
    above = pre > kth
    ties = pre == kth
    # Of the entries equal to the k-th value, keep the lowest-indexed ones that are needed.
    needed = k - above.sum(axis=1, keepdims=True)
    keep = above | (ties & (np.cumsum(ties, axis=1) <= needed))
    cols = np.nonzero(keep)[1].reshape(batch, k)  # ascending within each row
    order = np.argsort(-np.take_along_axis(pre, cols, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1)


def pre_activations(X: np.ndarray, W_enc: np.ndarray, b_enc: np.ndarray, b_dec: np.ndarray) -> np.ndarray:
    """``(X - b_dec) @ W_enc + b_enc``: the one dense product of a step."""
    return (X - b_dec) @ W_enc + b_enc


def encode(X, W_enc, b_enc, b_dec, k: int, activation: str = "relu") -> tuple[np.ndarray, np.ndarray]:
    """TopK encode: ``indices = topk_indices(selection_scores(pre), k)``,
    ``values = activate_selected(pre[indices])``."""
    pre = pre_activations(X, W_enc, b_enc, b_dec)
    indices = topk_indices(selection_scores(pre, activation), k)
    values = activate_selected(np.take_along_axis(pre, indices, axis=1), activation)
    return values, indices


def selected_pre_activations(X, W_enc, b_enc, b_dec, indices) -> np.ndarray:
    """The pre-activations of the kept latents, (batch, k)."""
    return np.take_along_axis(pre_activations(X, W_enc, b_enc, b_dec), indices, axis=1)


def densify(values: np.ndarray, indices: np.ndarray, n_latents: int) -> np.ndarray:
    """Scatter (batch, k) codes into a dense (batch, n_latents) array; an index repeated
    within a row adds its values."""
    dense = np.zeros((values.shape[0], n_latents), dtype=values.dtype)
    rows = np.repeat(np.arange(values.shape[0]), values.shape[1])
    np.add.at(dense, (rows, indices.reshape(-1)), values.reshape(-1))
    return dense


def decode(values, indices, W_dec, b_dec) -> np.ndarray:
    """``densify(values, indices) @ W_dec + b_dec``."""
    return densify(values, indices, W_dec.shape[0]) @ W_dec + b_dec


def mse_loss(X_hat: np.ndarray, X: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean squared error over all elements, and its gradient with respect to X_hat."""
    diff = X_hat - X
    return float(np.mean(diff * diff)), diff * (2.0 / diff.size)


def backward(grad_out, X, values, indices, W_enc, b_dec, W_dec, activation: str = "relu",
             project_decoder_grad: bool = False, selected_pre=None, grad_values=None,
             train_centering: bool = True) -> dict[str, np.ndarray]:
    """Gradients of a loss with respect to W_enc, b_enc, W_dec and b_dec, given
    ``grad_out = dL/dX_hat`` and the code (values, indices) of the forward pass.

    The selection is the gradient's route: it is fixed by the forward pass and entries off
    it get no gradient. With ``project_decoder_grad``, each decoder row's gradient loses its
    component along the row. ``selected_pre`` (the kept pre-activations) is needed for swish
    and gelu, whose derivatives are not functions of the output alone. ``grad_values``
    (batch, k) is a penalty's gradient with respect to the code values, added to the one
    through the decoder; the result's ``values`` is the whole gradient with respect to them.
    With ``train_centering=False`` b_dec is a fixed input centering without a gradient (the
    result has no ``b_dec``), and ``W_dec`` may be (n_latents, d_out) with d_out != d_in (a
    classifier head; its output bias's gradient is ``grad_out.sum(axis=0)``).
    """
    if train_centering and W_dec.shape[1] != X.shape[1]:
        raise ValueError("train_centering: b_dec is the input centering and the output bias, "
                         f"which needs W_dec's width ({W_dec.shape[1]}) to equal X's ({X.shape[1]})")
    n = W_dec.shape[0]
    Z = densify(values, indices, n)
    dz = np.take_along_axis(grad_out @ W_dec.T, indices, axis=1)
    if grad_values is not None:
        dz = dz + grad_values
    if activation == "softmax":
        dp = values * (dz - np.sum(values * dz, axis=1, keepdims=True))
    else:
        if selected_pre is None and activation in NON_MONOTONE:
            raise ValueError(f"selected_pre: needed for the {activation} derivative")
        x = selected_pre if selected_pre is not None else np.zeros_like(values)
        dp = dz * ACTIVATIONS[activation][1](values, x)
    dpre = densify(dp, indices, n)
    grad_W_dec = Z.T @ grad_out
    if project_decoder_grad:
        norms2 = np.einsum("ij,ij->i", W_dec, W_dec)
        coef = np.divide(np.einsum("ij,ij->i", grad_W_dec, W_dec), norms2,
                         out=np.zeros_like(norms2), where=norms2 > 0)
        grad_W_dec = grad_W_dec - coef[:, None] * W_dec
    grad_b_enc = dpre.sum(axis=0)
    grads = {"W_enc": (X - b_dec).T @ dpre, "b_enc": grad_b_enc, "W_dec": grad_W_dec, "values": dz}
    if train_centering:
        grads["b_dec"] = grad_out.sum(axis=0) - W_enc @ grad_b_enc
    return grads


def l1_penalty(Z: np.ndarray, coef: float) -> tuple[float, np.ndarray]:
    """The L1 penalty on dense codes Z (batch, n_latents), ``coef * sum(|Z|) / batch``, and
    its gradient with respect to Z."""
    return coef * float(np.abs(Z).sum()) / Z.shape[0], coef * np.sign(Z) / Z.shape[0]


def kl_penalty(Z: np.ndarray, target: float, coef: float) -> tuple[float, np.ndarray]:
    """The KL sparsity penalty on dense codes Z (batch, n_latents) with entries in (0, 1):
    ``coef * sum_j KL(target || mean_j)``, ``mean_j = Z[:, j].mean()``, and its gradient
    with respect to Z (every row of latent j gets d/d mean_j divided by batch)."""
    mean = Z.mean(axis=0)
    kl = target * np.log(target / mean) + (1 - target) * np.log((1 - target) / (1 - mean))
    slope = coef * (-target / mean + (1 - target) / (1 - mean))
    return coef * float(kl.sum()), np.broadcast_to(slope / Z.shape[0], Z.shape).copy()


def jumprelu(pre: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """JumpReLU on dense pre-activations: ``pre * H(pre - threshold)``, per-latent thresholds."""
    return np.where(pre > threshold, pre, 0.0)


def jumprelu_threshold_gradient(pre: np.ndarray, threshold: np.ndarray, grad_z: np.ndarray,
                                bandwidth: float, l0_coef: float) -> np.ndarray:
    """The straight-through gradient with respect to log(threshold) of ``L(z) + l0_coef *
    mean over rows of sum_j H(pre - threshold_j)``, z = jumprelu(pre, threshold), given dense
    ``grad_z = dL/dz`` (batch, n_latents): with ``K = |pre - threshold| < bandwidth / 2``,
    ``d/dtheta = sum_r -(theta / bandwidth) K grad_z - l0_coef / (batch * bandwidth) K``,
    times theta for the logarithm."""
    K = (np.abs(pre - threshold) < bandwidth / 2).astype(np.float64)
    d_theta = (-(threshold / bandwidth) * K * grad_z).sum(axis=0)
    d_theta -= l0_coef / (pre.shape[0] * bandwidth) * K.sum(axis=0)
    return d_theta * threshold


def adam_update(param, grad, exp_avg, exp_avg_sq, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0, step: int, unit_norm_rows: bool = False, rows=None) -> None:
    """Adam/AdamW in place, PyTorch's formulation (decoupled weight decay); with ``rows``,
    on those rows (elements of a vector) only (lazy Adam)."""
    if rows is not None:
        arrays = [a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)
                  for a in (param, grad, exp_avg, exp_avg_sq)]
        p, g, m, v = (a[rows] for a in arrays)
        adam_update(p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                    weight_decay=weight_decay, step=step, unit_norm_rows=unit_norm_rows)
        for full, part in zip(arrays, (p, g, m, v)):
            full[rows] = part
        return
    exp_avg *= beta1
    exp_avg += (1 - beta1) * grad
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * grad * grad
    denom = np.sqrt(exp_avg_sq) / np.sqrt(1 - beta2**step) + eps
    param *= 1 - lr * weight_decay
    param -= (lr / (1 - beta1**step)) * exp_avg / denom
    if unit_norm_rows:
        normalize_rows(param.reshape(-1, param.shape[-1]))


def sgd_update(param, grad, momentum_buffer, *, lr, momentum=0.0, nesterov=False,
               weight_decay=0.0, unit_norm_rows: bool = False) -> None:
    """SGD with optional (Nesterov) momentum in place, PyTorch's formulation."""
    d = grad + weight_decay * param
    if momentum:
        momentum_buffer *= momentum
        momentum_buffer += d
        d = d + momentum * momentum_buffer if nesterov else momentum_buffer
    param -= lr * d
    if unit_norm_rows:
        normalize_rows(param.reshape(-1, param.shape[-1]))


def rmsprop_update(param, grad, square_avg, momentum_buffer, *, lr, alpha=0.99, eps=1e-8,
                   momentum=0.0, weight_decay=0.0, unit_norm_rows: bool = False) -> None:
    """RMSprop in place, PyTorch's formulation (not centered, L2 weight decay):
    ``g = grad + weight_decay*param``, ``square_avg = alpha*square_avg + (1-alpha)*g**2``,
    ``avg = sqrt(square_avg) + eps``; with momentum ``buf = momentum*buf + g/avg`` and
    ``param -= lr*buf``, otherwise ``param -= lr*g/avg``."""
    d = grad + weight_decay * param
    square_avg *= alpha
    square_avg += (1 - alpha) * d * d
    step = d / (np.sqrt(square_avg) + eps)
    if momentum:
        momentum_buffer *= momentum
        momentum_buffer += step
        step = momentum_buffer
    param -= lr * step
    if unit_norm_rows:
        normalize_rows(param.reshape(-1, param.shape[-1]))


def squared_norm(array) -> float:
    """Sum of the squares of ``array``'s entries, computed in float64."""
    a = np.asarray(array, dtype=np.float64)
    return float(np.sum(a * a))


class DenseNumpySAE:
    """A TopK autoencoder written in plain NumPy with dense codes, trained with Adam.

    The model ksae's kernels compute, in the way one would write it without them: dense
    (batch, n_latents) codes and dense products in the decoder and the backward pass. The
    benchmarks time it against ksae; the tests check ksae's whole training step against it.
    """

    def __init__(self, W_enc, b_enc, W_dec, b_dec, k: int, activation: str = "relu", *,
                 lr: float = 1e-3, normalize_decoder: bool = True):
        self.params = {"W_enc": W_enc.copy(), "b_enc": b_enc.copy(),
                       "W_dec": W_dec.copy(), "b_dec": b_dec.copy()}
        self.k, self.activation, self.lr = k, activation, lr
        self.normalize_decoder = normalize_decoder
        self.state = {name: (np.zeros_like(p), np.zeros_like(p)) for name, p in self.params.items()}
        self.n_steps = 0

    def encode(self, X):
        p = self.params
        return encode(X, p["W_enc"], p["b_enc"], p["b_dec"], self.k, self.activation)

    def encode_decode(self, X):
        """The reconstruction of X."""
        p = self.params
        return decode(*self.encode(X), p["W_dec"], p["b_dec"])

    def step(self, X) -> float:
        """One Adam step on the batch X; returns the batch loss before the update."""
        p = self.params
        values, indices = self.encode(X)
        loss, grad_out = mse_loss(decode(values, indices, p["W_dec"], p["b_dec"]), X)
        selected_pre = selected_pre_activations(X, p["W_enc"], p["b_enc"], p["b_dec"], indices)
        grads = backward(grad_out, X, values, indices, p["W_enc"], p["b_dec"], p["W_dec"],
                         self.activation, self.normalize_decoder, selected_pre)
        self.n_steps += 1
        for name, param in p.items():
            m, v = self.state[name]
            adam_update(param, grads[name], m, v, lr=self.lr, step=self.n_steps,
                        unit_norm_rows=self.normalize_decoder and name == "W_dec")
        return loss
