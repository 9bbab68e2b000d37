"""The training loop behind ``SparseAutoencoder.fit``: epochs over shuffled mini-batches with a
learning-rate schedule, gradient clipping, validation, early stopping and history records.

One record is a dict; per epoch it holds ``epoch``, ``step``, ``loss``, ``fve``, ``l0``,
``dead_fraction``, ``lr`` and ``time`` (and ``val_loss``, ``val_fve``, ``val_l0``,
``val_dead_fraction`` when there is validation data), and ``event: "epoch"``; every
``log_every`` steps a record with ``event: "step"`` holds the same training figures over the
steps since the last one. Records go to ``history_`` / ``step_history_`` (dicts of lists) and
to the user's callback.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .config import ModelConfig, TrainConfig
from .metrics import fraction_of_variance_explained
from .schedules import make_schedule
from .sparsity import active_mask

if TYPE_CHECKING:
    from .model import SparseAutoencoder

Callback = Callable[[dict[str, Any]], None]


def curriculum_k(k: int, train_cfg: TrainConfig, step: int, total_steps: int) -> int:
    """The k curriculum: k_start at step 0, falling linearly to k at k_anneal_fraction of the
    training steps, k afterwards (k itself when there is no k_start)."""
    if train_cfg.k_start is None:
        return k
    span = max(1, round(train_cfg.k_anneal_fraction * total_steps))
    if step >= span:
        return k
    return int(round(train_cfg.k_start + (k - train_cfg.k_start) * step / span))


class RunningStats:
    """Training figures accumulated over a span of batches."""

    def __init__(self, n_latents: int, n_features: int) -> None:
        self.n_features = n_features
        self.fired = np.zeros(n_latents, dtype=bool)
        self.samples = 0
        self.sse = 0.0
        self.auxk = 0.0
        self.sparsity_loss = 0.0
        self.active = 0.0
        self.resampled = 0
        self.started = time.perf_counter()

    def add(self, result) -> None:
        active = result.active
        rows = result.values.shape[0]
        self.fired[result.indices[active]] = True
        self.samples += rows
        self.sse += result.loss * rows * self.n_features
        self.auxk += result.auxk_loss * rows
        self.sparsity_loss += result.sparsity_loss * rows
        self.active += float(active.sum())

    def record(self, total_variance_per_sample: float) -> dict[str, Any]:
        loss = self.sse / (self.samples * self.n_features)
        fve = (1.0 - (self.sse / self.samples) / total_variance_per_sample
               if total_variance_per_sample > 0 else float("nan"))
        return {"loss": loss, "fve": fve, "l0": self.active / self.samples,
                "dead_fraction": float(1.0 - self.fired.mean()), "auxk_loss": self.auxk / self.samples,
                "sparsity_loss": self.sparsity_loss / self.samples,
                "resampled": self.resampled, "time": time.perf_counter() - self.started}


def total_variance(X: np.ndarray, chunk: int = 8192) -> float:
    """``sum((X - X.mean(axis=0))**2)`` in float64, a chunk of rows at a time."""
    mean = X.mean(axis=0, dtype=np.float64)
    total = 0.0
    for start in range(0, X.shape[0], chunk):
        centered = X[start:start + chunk] - mean
        total += float(np.einsum("ij,ij->", centered, centered))
    return total


def split_validation(X: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of the rows of X, chosen at random: (train, validation)."""
    n_val = int(round(X.shape[0] * fraction))
    if n_val < 1 or n_val >= X.shape[0]:
        raise ValueError(f"validation_split: {fraction} of {X.shape[0]} samples leaves no "
                         "training or no validation data")
    order = rng.permutation(X.shape[0])
    return X[np.sort(order[n_val:])], X[np.sort(order[:n_val])]


def evaluate(model: "SparseAutoencoder", X: np.ndarray) -> dict[str, float]:
    """A model's figures on data X: ``mse`` of the reconstruction, ``fve`` (fraction of
    variance explained), ``l0`` (active latents per sample) and ``dead_fraction`` (latents
    that fire on no sample of X)."""
    values, indices = model.encode(X)
    X_hat = model.decode(values, indices)
    fired = np.zeros(model.config.n_latents, dtype=bool)
    active = active_mask(values, model.config)
    fired[indices[active]] = True
    return {"mse": float(np.mean((X_hat - X) ** 2)),
            "fve": fraction_of_variance_explained(X, X_hat),
            "l0": float(active.sum(axis=1).mean()),
            "dead_fraction": float(1.0 - fired.mean())}


def validation_record(model: "SparseAutoencoder", X_val: np.ndarray) -> dict[str, Any]:
    figures = evaluate(model, X_val)
    return {"val_loss": figures["mse"], "val_fve": figures["fve"], "val_l0": figures["l0"],
            "val_dead_fraction": figures["dead_fraction"]}


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


def append(history: dict[str, list], record: dict[str, Any]) -> None:
    for key, value in record.items():
        if key != "event":
            history.setdefault(key, []).append(value)


def train(model: "SparseAutoencoder", X: np.ndarray, X_val: np.ndarray | None,
          train_cfg: TrainConfig, cfg: ModelConfig, callback: Callback | None) -> None:
    """Run ``train_cfg.epochs`` epochs of ``model`` on X (already validated and initialised)."""
    n, d = X.shape
    total_steps = train_cfg.epochs * math.ceil(n / train_cfg.batch_size)
    if train_cfg.k_start is not None and not cfg.k <= train_cfg.k_start <= cfg.n_latents:
        raise ValueError(f"k_start: expected k = {cfg.k} <= k_start <= n_latents = "
                         f"{cfg.n_latents}, got {train_cfg.k_start}")
    schedule = make_schedule(train_cfg.schedule, train_cfg.lr, total_steps=total_steps,
                             warmup_steps=train_cfg.warmup_steps, step_size=train_cfg.lr_step_size,
                             gamma=train_cfg.lr_gamma, min_lr=train_cfg.min_lr)
    variance_per_sample = total_variance(X) / n
    stopper = (EarlyStopping(train_cfg.early_stopping_patience, train_cfg.early_stopping_min_delta)
               if train_cfg.early_stopping_patience else None)
    emit = callback or (lambda record: None)
    optimizer = model._optimizer
    for epoch in range(1, train_cfg.epochs + 1):
        epoch_stats, step_stats = RunningStats(cfg.n_latents, d), RunningStats(cfg.n_latents, d)
        order = model._rng.permutation(n) if train_cfg.shuffle else None
        for start in range(0, n, train_cfg.batch_size):
            stop = min(start + train_cfg.batch_size, n)
            batch = X[order[start:stop]] if order is not None else X[start:stop]
            optimizer.lr = schedule(optimizer.n_steps)
            k = curriculum_k(cfg.k, train_cfg, model.n_iter_, total_steps)
            result = model._train_step(batch, cfg, train_cfg, k)
            epoch_stats.add(result)
            if train_cfg.resample_every and model.n_iter_ % train_cfg.resample_every == 0:
                epoch_stats.resampled += model._resample_dead_latents(batch, train_cfg)
            if train_cfg.log_every:
                step_stats.add(result)
                if model.n_iter_ % train_cfg.log_every == 0:
                    record = {"event": "step", "epoch": epoch, "step": model.n_iter_, "k": k,
                              "lr": optimizer.lr, **step_stats.record(variance_per_sample)}
                    append(model.step_history_, record)
                    emit(record)
                    step_stats = RunningStats(cfg.n_latents, d)
        record = {"event": "epoch", "epoch": epoch, "step": model.n_iter_, "k": k,
                  "lr": optimizer.lr, **epoch_stats.record(variance_per_sample)}
        if X_val is not None:
            record.update(validation_record(model, X_val))
        append(model.history_, record)
        emit(record)
        if stopper is not None and stopper.update(epoch, record["val_loss"], model._params):
            model.stopped_epoch_ = epoch
            break
    if stopper is not None:
        model.best_epoch_ = stopper.best_epoch
        if train_cfg.restore_best_weights and stopper.best_params is not None:
            for name, best in stopper.best_params.items():
                np.copyto(model._params[name], best)
    if cfg.sparsity == "batchtopk":
        model.calibrate_threshold(X)
