"""Optimizers: small Python objects whose elementwise update is one fused C++ pass.

An optimizer owns its state (moments, momentum buffers) keyed by parameter name, created on
the first step with the parameter's shape and dtype. ``step`` updates the parameters in place.
"""

from __future__ import annotations

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
             unit_norm_rows: frozenset[str] = frozenset(), n_threads: int = 0) -> None:
        """Apply one update to every parameter in ``params`` from ``grads`` (same keys).
        Parameters named in ``unit_norm_rows`` have their rows rescaled to unit norm after
        the update."""
        self.n_steps += 1
        for name, param in params.items():
            self._update(name, param, grads[name], name in unit_norm_rows, n_threads)

    @abstractmethod
    def _update(self, name: str, param: np.ndarray, grad: np.ndarray, unit_norm: bool,
                n_threads: int) -> None:
        """Update one parameter in place from its gradient."""

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

    def _update(self, name, param, grad, unit_norm, n_threads):
        buf = self._buffer(name, "momentum_buffer", param) if self.momentum else None
        _core.sgd_update(param, grad, buf, self.lr, self.momentum, self.nesterov,
                         self.weight_decay, unit_norm, n_threads)

    def hyperparameters(self):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` computes it; with ``weight_decay`` the decay is
    decoupled from the gradient (AdamW)."""

    name = "adam"

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(lr)
        for i, b in enumerate(betas):
            if not 0 <= b < 1:
                raise ValueError(f"betas[{i}]: expected 0 <= beta < 1, got {b}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = check_positive_float("eps", eps)
        self.weight_decay = check_positive_float("weight_decay", weight_decay, allow_zero=True)

    def _update(self, name, param, grad, unit_norm, n_threads):
        m = self._buffer(name, "exp_avg", param)
        v = self._buffer(name, "exp_avg_sq", param)
        _core.adam_update(param, grad, m, v, self.lr, self.betas[0], self.betas[1], self.eps,
                          self.weight_decay, self.n_steps, unit_norm, n_threads)

    def hyperparameters(self):
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}


def make_optimizer(config: TrainConfig) -> Optimizer:
    """The optimizer a training configuration names."""
    name = check_choice("optimizer", config.optimizer, OPTIMIZERS)
    if name == "sgd":
        return SGD(config.lr, config.momentum, config.nesterov, config.weight_decay)
    return Adam(config.lr, weight_decay=config.weight_decay if name == "adamw" else 0.0)
