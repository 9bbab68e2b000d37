"""Optimizers: small Python objects whose elementwise update is one fused C++ pass, and
clipping of the gradients by their global norm.

An optimizer owns its state (moments, momentum buffers) keyed by parameter name, created on
the first step with the parameter's shape and dtype. ``step`` updates the parameters in place.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from . import _core
from .buffers import aligned_zeros
from .config import TrainConfig, check_choice, check_positive_float, OPTIMIZERS


class Optimizer(ABC):
    """Base class: ``step(params, grads)`` updates ``params`` in place."""

    name = "optimizer"

    def __init__(self, lr: float) -> None:
        self.lr = check_positive_float("lr", lr)
        self.n_steps = 0
        self.state: dict[str, dict[str, np.ndarray]] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], *,
             unit_norm_rows: frozenset[str] = frozenset(), n_threads: int = 0,
             rows: dict[str, np.ndarray] | None = None) -> None:
        """Apply one update to every parameter in ``params`` from ``grads`` (same keys).
        Parameters named in ``unit_norm_rows`` have their rows rescaled to unit norm after
        the update. ``rows`` names, per parameter, the rows (strictly increasing int64
        indices) that received gradient; a lazy optimizer updates only those."""
        self.n_steps += 1
        rows = rows or {}
        for name, param in params.items():
            self._update(name, param, grads[name], name in unit_norm_rows, n_threads, rows.get(name))

    @abstractmethod
    def _update(self, name: str, param: np.ndarray, grad: np.ndarray, unit_norm: bool,
                n_threads: int, rows: np.ndarray | None) -> None:
        """Update one parameter in place from its gradient (lazily, on ``rows`` only, where
        the optimizer supports it)."""

    def _buffer(self, name: str, key: str, like: np.ndarray) -> np.ndarray:
        slot = self.state.setdefault(name, {})
        if key not in slot:
            slot[key] = aligned_zeros(like.shape, like.dtype)
        return slot[key]

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr}


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay,
    as ``torch.optim.SGD`` computes it."""

    name = "sgd"

    def __init__(self, lr: float = 1e-2, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__(lr)
        self.momentum = check_positive_float("momentum", momentum, allow_zero=True)
        if self.momentum >= 1:
            raise ValueError(f"momentum: expected 0 <= momentum < 1, got {momentum}")
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0")
        self.nesterov = bool(nesterov)
        self.weight_decay = check_positive_float("weight_decay", weight_decay, allow_zero=True)

    def _update(self, name, param, grad, unit_norm, n_threads, rows):
        buf = self._buffer(name, "momentum_buffer", param) if self.momentum else None
        _core.sgd_update(param, grad, buf, self.lr, self.momentum, self.nesterov,
                         self.weight_decay, unit_norm, n_threads)

    def hyperparameters(self):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` computes it; with ``weight_decay`` the decay is
    decoupled from the gradient (AdamW). With ``lazy``, a step updates only the rows named
    in ``step(rows=...)`` (TensorFlow's LazyAdam): the other rows' weights and moments stay
    as they are instead of decaying and coasting on momentum."""

    name = "adam"

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, lazy: bool = False) -> None:
        super().__init__(lr)
        self.lazy = bool(lazy)
        for i, b in enumerate(betas):
            if not 0 <= b < 1:
                raise ValueError(f"betas[{i}]: expected 0 <= beta < 1, got {b}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = check_positive_float("eps", eps)
        self.weight_decay = check_positive_float("weight_decay", weight_decay, allow_zero=True)

    def _update(self, name, param, grad, unit_norm, n_threads, rows):
        m = self._buffer(name, "exp_avg", param)
        v = self._buffer(name, "exp_avg_sq", param)
        _core.adam_update(param, grad, m, v, self.lr, self.betas[0], self.betas[1], self.eps,
                          self.weight_decay, self.n_steps, unit_norm, n_threads,
                          rows if self.lazy else None)

    def hyperparameters(self):
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "lazy": self.lazy}

    def moments(self, params: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The first and second moments of ``params``, in their order (created on first use),
        for a kernel that applies this optimizer's update itself (``_core.backward_adam``)."""
        return ([self._buffer(name, "exp_avg", p) for name, p in params.items()],
                [self._buffer(name, "exp_avg_sq", p) for name, p in params.items()])


class RMSprop(Optimizer):
    """RMSprop, as ``torch.optim.RMSprop`` computes it (not centered), with optional momentum
    and L2 weight decay added to the gradient::

        g = grad + weight_decay * param
        square_avg = alpha * square_avg + (1 - alpha) * g**2
        avg = sqrt(square_avg) + eps
        momentum > 0:  buf = momentum * buf + g / avg;  param -= lr * buf
        otherwise:     param -= lr * g / avg
    """

    name = "rmsprop"

    def __init__(self, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(lr)
        self.alpha = check_positive_float("alpha", alpha, allow_zero=True)
        if self.alpha >= 1:
            raise ValueError(f"alpha: expected 0 <= alpha < 1, got {alpha}")
        self.eps = check_positive_float("eps", eps)
        self.momentum = check_positive_float("momentum", momentum, allow_zero=True)
        if self.momentum >= 1:
            raise ValueError(f"momentum: expected 0 <= momentum < 1, got {momentum}")
        self.weight_decay = check_positive_float("weight_decay", weight_decay, allow_zero=True)

    def _update(self, name, param, grad, unit_norm, n_threads, rows):
        square_avg = self._buffer(name, "square_avg", param)
        buf = self._buffer(name, "momentum_buffer", param) if self.momentum else None
        _core.rmsprop_update(param, grad, square_avg, buf, self.lr, self.alpha, self.eps,
                             self.momentum, self.weight_decay, unit_norm, n_threads)

    def hyperparameters(self):
        return {"lr": self.lr, "alpha": self.alpha, "eps": self.eps, "momentum": self.momentum,
                "weight_decay": self.weight_decay}


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float, n_threads: int = 0) -> float:
    """Clip gradients by their global norm, in place, as ``torch.nn.utils.clip_grad_norm_``.

    ``total = sqrt(sum over the arrays of sum(g**2))`` (accumulated in float64, bitwise the
    same for any ``n_threads``). When ``total > max_norm`` every gradient is multiplied by
    ``max_norm / (total + 1e-6)``; otherwise they are left alone. Returns ``total``, the norm
    before clipping. A non-finite total (inf or nan) is returned without scaling anything, for
    the caller to act on.
    """
    max_norm = check_positive_float("max_norm", max_norm)
    sum_sq = 0.0
    for name, grad in grads.items():
        try:
            sum_sq += _core.squared_norm(grad, n_threads)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"grads[{name!r}]: {exc}") from None
        if not grad.flags.writeable:  # checked before any is scaled
            raise ValueError(f"grads[{name!r}]: array is read-only")
    total = math.sqrt(sum_sq)
    if math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for grad in grads.values():
            grad *= grad.dtype.type(scale)
    return total


def make_optimizer(config: TrainConfig) -> Optimizer:
    """The optimizer a training configuration names."""
    name = check_choice("optimizer", config.optimizer, OPTIMIZERS)
    if name == "sgd":
        return SGD(config.lr, config.momentum, config.nesterov, config.weight_decay)
    if name == "rmsprop":
        # config.momentum is SGD's (default 0.9); RMSprop keeps torch's default of none.
        return RMSprop(config.lr, weight_decay=config.weight_decay)
    return Adam(config.lr, weight_decay=config.weight_decay if name == "adamw" else 0.0,
                lazy=config.lazy_adam)
