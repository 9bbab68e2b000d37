"""Dead latents, and the two ways of bringing them back: AuxK (Gao et al., 2024), an
auxiliary loss that trains them on the main model's residual, and resampling (after
Anthropic), which re-initialises them toward badly reconstructed inputs.

A latent is dead once ``samples_since_fired`` (kept by the step's ``mark_fired``) reaches
``dead_after_samples``.
"""

from __future__ import annotations

import numpy as np

from . import _core
from .config import DENSE_SPARSITIES, TrainConfig
from .losses import linear_mse
from .optim import Optimizer
from .state import ModelState, selected_pre_buffer


def dead_mask(state: ModelState, train_cfg: TrainConfig) -> np.ndarray:
    """Which latents are dead: unfired for at least ``dead_after_samples`` samples."""
    return state.samples_since_fired >= train_cfg.dead_after_samples


def auxk_backward(state: ModelState, grad_out: np.ndarray, ws: dict[str, np.ndarray],
                  train_cfg: TrainConfig) -> float:
    """AuxK: the top auxk_k dead latents of each sample, chosen from the pre-activations the
    encode left in ``ws["pre"]``, reconstruct the main model's residual e = X - X_hat. Adds
    the gradients of ``auxk_coef * |e_hat - e|^2 / |e - mean(e)|^2`` to the main ones in
    ``state.grads``; e is a constant (no gradient flows back into the main reconstruction).
    Returns the AuxK loss (0 when no latent is dead)."""
    cfg, p, g, nt = state.cfg, state.params, state.grads, state.n_threads
    if cfg.sparsity in DENSE_SPARSITIES:
        raise ValueError(f"auxk_coef: AuxK revives dead latents of a k-sparse model; "
                         f"sparsity={cfg.sparsity!r} puts every latent in the code")
    if not linear_mse(cfg, train_cfg):
        raise ValueError("auxk_coef: AuxK reconstructs the residual of a linear-output MSE "
                         f"model; this one has loss={train_cfg.loss!r}, "
                         f"output_activation={cfg.output_activation!r}")
    dead = dead_mask(state, train_cfg)
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0.0
    k_aux = min(train_cfg.auxk_k or 2 * cfg.k, n_dead)
    bias = np.where(dead, p["b_enc"], -np.inf).astype(p["b_enc"].dtype)
    selected_pre = selected_pre_buffer(grad_out.shape[0], k_aux, cfg)
    values, indices = _core.select_topk(ws["pre"], bias, k_aux, cfg.activation, nt, selected_pre)
    residual = grad_out * grad_out.dtype.type(-grad_out.size / 2)  # X - X_hat, from the MSE gradient
    scale = float(np.sum((residual - residual.mean(axis=0)) ** 2, dtype=np.float64))
    if scale == 0:
        return 0.0
    # e_hat = dense(values) @ W_dec: the kernels' decode with a zero bias, so that AuxK
    # trains the dead latents and leaves b_dec to the main loss.
    zero_bias = np.zeros_like(p["b_dec"])
    diff = _core.decode(values, indices, p["W_dec"], zero_bias, nt) - residual
    loss = train_cfg.auxk_coef * float(np.sum(diff * diff, dtype=np.float64)) / scale
    grad = diff * diff.dtype.type(2 * train_cfg.auxk_coef / scale)
    _core.backward(grad, ws["centered"], values, indices, p["W_enc_t"], p["W_dec"],
                   cfg.activation, cfg.normalize_decoder, nt, g["W_enc_t"], g["b_enc"],
                   g["W_dec"], g["b_dec"], True, selected_pre)
    # The kernel's b_dec gradient includes the decoder's bias term, absent from e_hat;
    # keep only the encoder's part (b_dec is subtracted from the input before encoding).
    g["b_dec"] -= grad.sum(axis=0)
    return loss


def resample_dead_latents(state: ModelState, batch: np.ndarray, train_cfg: TrainConfig,
                          optimizer: Optimizer) -> int:
    """Re-initialise every dead latent toward an input the model reconstructs badly: inputs
    of ``batch`` are drawn (from ``state.rng``) with probability proportional to their
    squared reconstruction error; a dead latent's decoder row becomes the unit direction of
    that input's residual, its encoder row the same direction at the mean norm of the live
    encoder rows (not Anthropic's 0.2 times: in a TopK model a latent must win a place in
    the top k, and at 0.2 it measurably died again), its bias 0, and its ``optimizer`` state
    is cleared. Returns how many latents were resampled."""
    dead = np.flatnonzero(dead_mask(state, train_cfg))
    if dead.size == 0:
        return 0
    residual = (batch - state.reconstruct(batch)).astype(np.float64)
    error = np.einsum("ij,ij->i", residual, residual)
    usable = error > 0
    if not usable.any():
        return 0
    chosen = state.rng.choice(batch.shape[0], size=dead.size, p=error / error.sum())
    directions = residual[chosen] / np.sqrt(error[chosen])[:, None]
    p = state.params
    alive = np.ones(state.n_latents, dtype=bool)
    alive[dead] = False
    enc_norm = float(np.linalg.norm(p["W_enc_t"][alive], axis=1).mean()) if alive.any() else 1.0
    with state.changing():
        p["W_dec"][dead] = directions
        p["W_enc_t"][dead] = directions * enc_norm
        p["b_enc"][dead] = 0
        if "log_threshold" in p:  # the dead latents' encoder rows are new: their thresholds too
            p["log_threshold"][dead] = np.median(p["log_threshold"][alive]) if alive.any() else 0
    for name in ("W_dec", "W_enc_t", "b_enc", "log_threshold"):
        for buffer in optimizer.state.get(name, {}).values():
            buffer[dead] = 0
    state.samples_since_fired[dead] = 0
    return int(dead.size)
