"""Sparsity mechanisms beyond the top-k selection: penalties on the code (L1 on relu
activations; a KL divergence toward a target mean activation for sigmoid ones), JumpReLU's
learned thresholds with their straight-through gradient, and what counts as an active latent.

A penalty returns its value and its gradient with respect to the code values, (batch, width)
like the values; the backward kernel adds that gradient to the one through the decoder
(``_core.backward(..., grad_values=...)``). ``ksae.reference`` holds their dense float64
expressions.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig, TrainConfig

SIGMOID_ACTIVE = 0.5
"""A sigmoid latent counts as active where its activation exceeds this, i.e. where its
pre-activation is positive: the cut relu makes. (Every sigmoid activation is above 0, so
counting non-zeros would say every latent fires.)"""

KL_MEAN_FLOOR = 1e-6
"""The batch mean activation enters the KL divergence clipped to [floor, 1 - floor], so that
a latent saturated on the whole batch (possible in float32) gives a large, finite gradient."""


def l1_penalty(values: np.ndarray, coef: float) -> tuple[float, np.ndarray]:
    """``coef * mean over rows of sum(|values|)`` and its (sub)gradient
    ``coef / batch * sign(values)`` (0 at 0, where relu passes no gradient anyway)."""
    batch = values.shape[0]
    loss = coef * float(np.abs(values).sum(dtype=np.float64)) / batch
    grad = np.sign(values)
    grad *= grad.dtype.type(coef / batch)
    return loss, grad


def kl_penalty(values: np.ndarray, indices: np.ndarray, n_latents: int, target: float,
               coef: float) -> tuple[float, np.ndarray]:
    """``coef * sum_j KL(target || mean_j)`` with ``mean_j`` the batch mean activation of
    latent j (0 in rows whose code omits it) and ``KL(p || q) = p log(p/q) + (1-p) log((1-p) /
    (1-q))``, and its gradient with respect to each code value of latent j,
    ``coef / batch * (-target / mean_j + (1 - target) / (1 - mean_j))``. Computed in float64;
    the means are clipped to [KL_MEAN_FLOOR, 1 - KL_MEAN_FLOOR]."""
    batch = values.shape[0]
    mean = np.bincount(indices.reshape(-1), weights=values.reshape(-1).astype(np.float64),
                       minlength=n_latents) / batch
    mean = np.clip(mean, KL_MEAN_FLOOR, 1 - KL_MEAN_FLOOR)
    kl = target * np.log(target / mean) + (1 - target) * np.log((1 - target) / (1 - mean))
    slope = (coef / batch) * (-target / mean + (1 - target) / (1 - mean))
    return coef * float(kl.sum()), slope.astype(values.dtype)[indices]


def jumprelu_values(gap: np.ndarray, indices: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """JumpReLU, ``z = pre * H(pre - threshold)``, on a code whose values are ``gap = pre -
    threshold[indices]`` (an encode with bias ``b_enc - threshold`` and a linear activation,
    which keeps each row's max_k largest gaps): ``pre`` where the gap is positive, else 0."""
    values = gap + threshold[indices]
    values[gap <= 0] = 0
    return values


def jumprelu_threshold_gradient(gap: np.ndarray, indices: np.ndarray, grad_values: np.ndarray,
                                log_threshold: np.ndarray, bandwidth: float, l0_coef: float,
                                out: np.ndarray) -> None:
    """The straight-through gradient of the loss with respect to ``log_threshold``, into
    ``out`` (Rajamanoharan et al., 2024, "Jumping Ahead"). With the rectangle kernel
    ``K(u) = 1 for |u| < 1/2`` and ``eps = bandwidth``, each code entry (r, j) contributes

        d z / d theta_j        = -(theta_j / eps) * K((pre - theta_j) / eps)   times dL/dz (grad_values)
        d L0-penalty / d theta_j = -(l0_coef / batch / eps) * K((pre - theta_j) / eps)

    and the chain rule through ``theta = exp(log_threshold)`` multiplies the sum by theta.
    Entries outside a row's code (beyond its max_k) are not seen: exact unless the cap binds,
    i.e. unless a row has max_k latents above ``theta - eps / 2``."""
    batch = gap.shape[0]
    threshold = np.exp(log_threshold.astype(np.float64))
    near = np.abs(gap) < bandwidth / 2
    latents = indices[near]
    slope = -(grad_values[near] * threshold[latents] + l0_coef / batch) / bandwidth
    grad = np.bincount(latents, weights=slope, minlength=log_threshold.shape[0]) * threshold
    out[...] = grad


def code_penalty(values: np.ndarray, indices: np.ndarray, cfg: ModelConfig,
                 train_cfg: TrainConfig) -> tuple[float, np.ndarray | None]:
    """The penalty a model's sparsity puts on its code and its gradient with respect to the
    values: L1 for sparsity 'l1', KL for 'kl', L0 for 'jumprelu' (whose gradient, through
    the thresholds only, is jumprelu_threshold_gradient's), none (0.0, None) otherwise or at
    weight 0."""
    if cfg.sparsity == "jumprelu":
        return train_cfg.l0_coef * np.count_nonzero(values) / values.shape[0], None
    if cfg.sparsity == "l1" and train_cfg.l1_coef > 0:
        return l1_penalty(values, train_cfg.l1_coef)
    if cfg.sparsity == "kl" and train_cfg.kl_coef > 0:
        return kl_penalty(values, indices, cfg.n_latents, train_cfg.kl_target, train_cfg.kl_coef)
    return 0.0, None


def active_threshold(cfg: ModelConfig) -> float | None:
    """The value a code entry must exceed to count as an active latent: SIGMOID_ACTIVE for
    sparsity 'kl'; None for every other sparsity, where the non-zero entries count."""
    return SIGMOID_ACTIVE if cfg.sparsity == "kl" else None


def active_entries(values: np.ndarray, above: float | None) -> np.ndarray:
    """The entries of ``values`` above ``above`` (the non-zero ones where it is None)."""
    return values != 0 if above is None else values > above


def active_mask(values: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Which code entries count as an active latent (for L0 and dead-latent figures): non-zero
    values, or for sparsity 'kl' values above SIGMOID_ACTIVE."""
    return active_entries(values, active_threshold(cfg))
