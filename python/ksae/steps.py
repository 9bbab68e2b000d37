"""One training step on a model state: forward, loss, backward, the optimizer's update.

``train_step`` is the one step that ``fit``, ``partial_fit`` and the trainer share. The
default model (topk, the MSE of a linear output, plain Adam) takes it as one kernel call,
``_core.train_step_adam``; every other combination runs the kernels one by one, with the
sparsity's penalty, AuxK (``ksae.dead_latents``), weight penalties and clipping between the
backward and the update.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _core
from .config import TrainConfig
from .dead_latents import auxk_backward, dead_mask
from .losses import add_weight_penalties, linear_mse, reconstruction_loss
from .optim import Adam, Optimizer
from .optim import clip_grad_norm as clip_gradients
from .sparsity import active_entries, active_threshold, code_penalty, jumprelu_threshold_gradient
from .state import PARAM_NAMES, ModelState, code_width, selected_pre_buffer

_DEFAULT_TRAINING = TrainConfig()


class StepResult(NamedTuple):
    """What one training step reports."""

    loss: float
    """The reconstruction loss."""
    values: np.ndarray
    indices: np.ndarray
    auxk_loss: float
    sparsity_loss: float
    """The penalty the sparsity puts on the code (0 for topk and batchtopk)."""
    active_above: float | None
    """Entries above this count as active latents; None: the non-zero ones."""

    @property
    def active(self) -> np.ndarray:
        """Which code entries count as active latents (see ``ksae.sparsity.active_mask``),
        formed when asked for: fit's figures need it, partial_fit does not."""
        return active_entries(self.values, self.active_above)


def train_step(state: ModelState, batch: np.ndarray, optimizer: Optimizer,
               train_cfg: TrainConfig | None = None, k: int | None = None) -> StepResult:
    """Forward, loss, backward (plus AuxK), clipping and ``optimizer``'s update on one
    checked batch; ``k`` overrides the model's k (the k curriculum). Returns the loss before
    the update and the batch's code. Raises FloatingPointError, leaving the weights of the
    last finite step, when the loss or the gradient norm is not finite. Holds the state's
    write lock (``state.access``): no encode sees the weights in the middle of the step."""
    with state.access.write, state.lock:
        state.weights_changed()
        return _locked_step(state, batch, optimizer, train_cfg or _DEFAULT_TRAINING,
                            k or state.cfg.k)


def _locked_step(state: ModelState, batch: np.ndarray, optimizer: Optimizer,
                 train_cfg: TrainConfig, k: int) -> StepResult:
    cfg = state.cfg
    if fuses_step(state, optimizer, train_cfg):
        return _fused_step(state, batch, optimizer, k)
    p, g, nt = state.params, state.grads, state.n_threads
    auxk = train_cfg.auxk_coef > 0
    ws = state.buffers(batch.shape[0], pre=auxk)
    encoded = batch
    if train_cfg.input_dropout > 0:  # denoising: encode a masked copy, reconstruct the clean one
        encoded = batch * (state.rng.random(batch.shape) >= train_cfg.input_dropout)
    width = code_width(cfg, k)
    selected_pre = selected_pre_buffer(batch.shape[0], width, cfg)
    # AuxK selects again from the pre-activations, so only then does encode keep them
    # (ws holds "pre" only when asked for).
    values, indices, gap = state.encode_batch(encoded, width, ws, selected_pre)
    if cfg.sparsity == "batchtopk":
        keep_batch_top(state, values, k)
    if linear_mse(cfg, train_cfg):
        # Decode and loss in one kernel: on several threads it decodes by latent group,
        # so that each core reads the decoder rows it updates in the backward.
        loss, grad_out = _core.decode_mse(values, indices, p["W_dec"], p["b_dec"], batch, nt,
                                          ws["x_hat"])
    else:
        x_hat = _core.decode(values, indices, p["W_dec"], p["b_dec"], nt, ws["x_hat"])
        loss, grad_out = reconstruction_loss(x_hat, batch, cfg.output_activation, train_cfg.loss)
    sparsity_loss, grad_values = code_penalty(values, indices, cfg, train_cfg)
    check_finite(state, "loss", loss + sparsity_loss)
    fused = fuses_adam(state, optimizer, train_cfg, gap)
    auxk_loss, rows = 0.0, None
    if fused:
        _backward_adam(state, optimizer, grad_out, ws["centered"], values, indices,
                       selected_pre, grad_values)
    else:
        dvalues = np.empty_like(values) if gap is not None else None  # dL/dz for the thresholds
        _core.backward(grad_out, ws["centered"], values, indices, p["W_enc_t"], p["W_dec"],
                       cfg.activation, cfg.normalize_decoder, nt, g["W_enc_t"], g["b_enc"],
                       g["W_dec"], g["b_dec"], False, selected_pre, grad_values, dvalues)
        if gap is not None:
            jumprelu_threshold_gradient(gap, indices, dvalues, p["log_threshold"],
                                        train_cfg.jumprelu_bandwidth, train_cfg.l0_coef,
                                        g["log_threshold"])
        if auxk:
            auxk_loss = auxk_backward(state, grad_out, ws, train_cfg)
        if train_cfg.l1_weight or train_cfg.l2_weight:
            add_weight_penalties(p, g, train_cfg.l1_weight, train_cfg.l2_weight)
        if train_cfg.clip_grad_norm is not None:
            check_finite(state, "gradient norm", clip_gradients(g, train_cfg.clip_grad_norm, nt))
        # Before the firing counts move: with AuxK the dead latents count as touched.
        rows = touched_rows(state, indices, train_cfg) if train_cfg.lazy_adam else None
    # One call where NumPy took four (an active mask, a boolean index, a scatter and an
    # add): in the step, after the kernels have pushed the interpreter's and NumPy's code
    # and data out of the caches, those took 65-73 us of a 4 ms step at
    # (256, 784, 1000, 25).
    above = active_threshold(cfg)
    _core.mark_fired(state.samples_since_fired, values, indices, batch.shape[0], above)
    if not fused:
        optimizer.step(p, g, unit_norm_rows=frozenset({"W_dec"}) if cfg.normalize_decoder
                       else frozenset(), n_threads=nt, rows=rows)
    state.n_iter += 1
    return StepResult(loss, values, indices, auxk_loss, sparsity_loss, above)


def _backward_adam(state: ModelState, opt: Adam, grad_out: np.ndarray, centered: np.ndarray,
                   values: np.ndarray, indices: np.ndarray, selected_pre: np.ndarray | None,
                   grad_values: np.ndarray | None) -> None:
    """Backward and the Adam update in one kernel: each latent's rows are updated as soon
    as the gradient rows of its block of latents are formed, bitwise as backward then
    Optimizer.step would leave them (the whole weight gradients are never stored). See
    fuses_adam for when it applies."""
    p, g, cfg = state.params, state.grads, state.cfg
    opt.n_steps += 1
    exp_avg, exp_avg_sq = opt.moments(p)
    _core.backward_adam(grad_out, centered, values, indices, p["W_enc_t"], p["b_enc"],
                        p["W_dec"], p["b_dec"], exp_avg, exp_avg_sq, g["b_enc"], g["b_dec"],
                        cfg.activation, cfg.normalize_decoder, cfg.normalize_decoder,
                        state.n_threads, opt.lr, opt.betas[0], opt.betas[1], opt.eps,
                        opt.weight_decay, opt.n_steps, selected_pre, grad_values)


def _fused_step(state: ModelState, batch: np.ndarray, opt: Adam, k: int) -> StepResult:
    """The step of _locked_step in one kernel call, bitwise the same: encode, decode_mse,
    backward_adam and mark_fired without the interpreter between them (the separate calls
    cost 38-62 us more of a 4 ms step at (256, 784, 1000, 25), alternated in one process).
    On a non-finite loss the kernel updates nothing and the step raises as the separate
    kernels' step does."""
    p, g, cfg, rows = state.params, state.grads, state.cfg, batch.shape[0]
    ws = state.buffers(rows)
    exp_avg, exp_avg_sq = opt.moments(p)
    loss, values, indices = _core.train_step_adam(
        batch, p["W_enc_t"], p["b_enc"], p["W_dec"], p["b_dec"], exp_avg, exp_avg_sq,
        g["b_enc"], g["b_dec"], state.samples_since_fired, k, cfg.activation,
        cfg.normalize_decoder, state.n_threads, opt.lr, opt.betas[0], opt.betas[1],
        opt.eps, opt.weight_decay, opt.n_steps + 1, ws["centered"], ws["x_hat"],
        selected_pre_buffer(rows, k, cfg))
    check_finite(state, "loss", loss)
    opt.n_steps += 1
    state.n_iter += 1
    return StepResult(loss, values, indices, 0.0, 0.0, None)


def fuses_step(state: ModelState, optimizer: Optimizer, train_cfg: TrainConfig) -> bool:
    """Whether the whole step is one kernel call (_core.train_step_adam): topk on the
    clean batch, the MSE of the linear output, and an Adam update that fuses into the
    backward (see fuses_adam)."""
    return (state.cfg.sparsity == "topk" and not train_cfg.input_dropout
            and linear_mse(state.cfg, train_cfg) and fuses_adam(state, optimizer, train_cfg, None))


def fuses_adam(state: ModelState, optimizer: Optimizer, train_cfg: TrainConfig,
               gap: np.ndarray | None) -> bool:
    """Whether this step's Adam update can be fused into the backward kernel: plain
    (not lazy) Adam on exactly the four parameters, with nothing between the gradients and
    the update (no AuxK second backward, weight penalty or clipping) and no threshold
    gradient (jumprelu)."""
    return (type(optimizer) is Adam and not optimizer.lazy and gap is None
            and train_cfg.auxk_coef == 0 and not train_cfg.l1_weight
            and not train_cfg.l2_weight and train_cfg.clip_grad_norm is None
            and len(state.params) == len(PARAM_NAMES))


def keep_batch_top(state: ModelState, values: np.ndarray, k: int) -> None:
    """BatchTopK, in place: of the (batch, max_k) candidate values keep the k * batch
    largest over the whole batch (zeroing the rest; relu makes a zero carry no gradient)
    and fold the smallest kept value into a running estimate of the inference threshold
    (which fit then calibrates on the training data, see calibrate_threshold)."""
    budget = k * values.shape[0]
    flat = values.reshape(-1)
    if budget < flat.size:
        cut = np.partition(flat, flat.size - budget)[flat.size - budget]
        values[values < cut] = 0
    kept = values[values > 0]
    if kept.size:
        smallest = float(kept.min())
        step = state.n_iter + 1  # a plain mean at first, then an exponential one
        rate = max(1.0 / step, 0.01)
        state.threshold = (smallest if state.threshold is None
                           else (1 - rate) * state.threshold + rate * smallest)


def touched_rows(state: ModelState, indices: np.ndarray,
                 train_cfg: TrainConfig) -> dict[str, np.ndarray]:
    """lazy_adam: the latents whose parameters received gradient this step (those the
    batch selected, and with AuxK every dead latent, a superset of those it selected),
    per per-latent parameter."""
    touched = np.zeros(state.n_latents, dtype=bool)
    touched[indices.reshape(-1)] = True
    if train_cfg.auxk_coef > 0:
        touched |= dead_mask(state, train_cfg)
    latents = np.flatnonzero(touched).astype(np.int64)
    rows = {"W_enc_t": latents, "W_dec": latents, "b_enc": latents}
    if "log_threshold" in state.params:  # jumprelu: a threshold moves with its latent
        rows["log_threshold"] = latents
    return rows


def check_finite(state: ModelState, what: str, value: float) -> None:
    """Raise FloatingPointError, naming the step, when ``value`` is not finite."""
    if not math.isfinite(value):
        raise FloatingPointError(
            f"training diverged at step {state.n_iter + 1}: the {what} is {value}; the "
            "weights are those of the last finite step. Lower the learning rate or rescale "
            "the data.")
