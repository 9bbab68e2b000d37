"""Where a training run stands: the figures of the span in progress, early stopping's
record and the position within an epoch. A checkpoint saves these beside the model state and
the optimizer (``ksae.checkpoint``); the trainer (``ksae.training``) updates them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core


class RunningStats:
    """Training figures accumulated over a span of batches."""

    SCALARS = ("samples", "sse", "auxk", "sparsity_loss", "active", "resampled")

    def __init__(self, n_latents: int, n_features: int) -> None:
        self.n_features = n_features
        self.fired = np.zeros(n_latents, dtype=bool)
        self.samples = 0
        self.sse = 0.0
        self.auxk = 0.0
        self.sparsity_loss = 0.0
        self.active = 0.0
        self.resampled = 0
        self.elapsed_before = 0.0  # seconds spent in this span before a resume
        self.started = time.perf_counter()

    def add(self, result: Any) -> None:
        """Count one step's ``StepResult``."""
        rows = result.values.shape[0]
        # One kernel call: in a fit step NumPy's mask, index, scatter and sum took 90 us.
        active = _core.note_fired(self.fired, result.values, result.indices, result.active_above)
        self.samples += rows
        self.sse += result.loss * rows * self.n_features
        self.auxk += result.auxk_loss * rows
        self.sparsity_loss += result.sparsity_loss * rows
        self.active += float(active)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def record(self, total_variance_per_sample: float) -> dict[str, Any]:
        loss = self.sse / (self.samples * self.n_features)
        fve = (1.0 - (self.sse / self.samples) / total_variance_per_sample
               if total_variance_per_sample > 0 else float("nan"))
        return {"loss": loss, "fve": fve, "l0": self.active / self.samples,
                "dead_fraction": float(1.0 - self.fired.mean()), "auxk_loss": self.auxk / self.samples,
                "sparsity_loss": self.sparsity_loss / self.samples,
                "resampled": self.resampled, "time": self.elapsed()}

    def state(self) -> tuple[dict[str, Any], np.ndarray]:
        """(scalars, fired) for a checkpoint."""
        return ({name: getattr(self, name) for name in self.SCALARS} | {"elapsed": self.elapsed()},
                self.fired)

    @classmethod
    def from_state(cls, scalars: dict[str, Any], fired: np.ndarray, n_features: int) -> "RunningStats":
        stats = cls(fired.shape[0], n_features)
        for name in cls.SCALARS:
            setattr(stats, name, type(getattr(stats, name))(scalars[name]))
        stats.fired[:] = fired
        stats.elapsed_before = float(scalars["elapsed"])
        return stats


class EarlyStopping:
    """Tracks the validation loss; ``update`` says whether to stop and keeps a copy of the
    best weights."""

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_params: dict[str, np.ndarray] | None = None
        self.waited = 0

    def update(self, epoch: int, val_loss: float, params: dict[str, np.ndarray]) -> bool:
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.waited = val_loss, epoch, 0
            self.best_params = {name: p.copy() for name, p in params.items()}
            return False
        self.waited += 1
        return self.waited >= self.patience


@dataclass
class TrainingPosition:
    """Where a training run stands between two steps: everything besides the model and its
    optimizer that a checkpoint must hold for a resumed run to continue exactly as an
    uninterrupted one would."""

    epoch: int = 1
    """The epoch in progress (1-based)."""
    batches_done: int = 0
    """Batches of that epoch already trained on."""
    epoch_seed: int | None = None
    """Seed of that epoch's shuffle, drawn from the model's generator when the epoch starts."""
    epoch_stats: RunningStats | None = None
    step_stats: RunningStats | None = None
    stopper: EarlyStopping | None = None
    stopped: bool = False
    """Early stopping ended the run."""


def append(history: dict[str, list], record: dict[str, Any]) -> None:
    """Add a record's figures to a history (a dict of lists), leaving out its ``event``."""
    for key, value in record.items():
        if key != "event":
            history.setdefault(key, []).append(value)
