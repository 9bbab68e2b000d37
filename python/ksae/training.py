"""The trainer: epochs of shuffled mini-batches over a batch source for a model state, with a
learning-rate schedule, a k curriculum, resampling, validation, early stopping, callbacks
and checkpoints.

One record is a dict; per epoch it holds ``epoch``, ``step``, ``loss``, ``fve``, ``l0``,
``dead_fraction``, ``lr`` and ``time`` (and ``val_loss``, ``val_fve``, ``val_l0``,
``val_dead_fraction`` when there is validation data), and ``event: "epoch"``; every
``log_every`` steps a record with ``event: "step"`` holds the same training figures over the
steps since the last one. Records go to the trainer's ``history`` / ``step_history`` (dicts
of lists; the estimator's ``history_`` / ``step_history_``) and to the callback, which also
receives ``event: "checkpoint"`` (``step``, ``epoch``, ``path``) after each checkpoint is
saved.
"""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from .batches import BatchSource, validation_rows
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .dead_latents import resample_dead_latents
from .metrics import fraction_of_variance_explained
from .optim import Optimizer
from .progress import EarlyStopping, RunningStats, TrainingPosition, append
from .schedules import make_schedule
from .sparsity import active_mask
from .state import ModelState
from .steps import train_step
from .validation import as_float_matrix

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


def evaluate(model: Any, X: np.ndarray) -> dict[str, float]:
    """A model's figures on data X: ``mse`` of the reconstruction, ``fve`` (fraction of
    variance explained), ``l0`` (active latents per sample) and ``dead_fraction`` (latents
    that fire on no sample of X). ``model`` is a ``ModelState`` or anything with its
    ``encode``, ``decode`` and ``config`` (a ``SparseAutoencoder``)."""
    values, indices = model.encode(X)
    X_hat = model.decode(values, indices)
    cfg = model.config
    fired = np.zeros(cfg.n_latents, dtype=bool)
    active = active_mask(values, cfg)
    fired[indices[active]] = True
    return {"mse": float(np.mean((X_hat - X) ** 2)),
            "fve": fraction_of_variance_explained(X, X_hat),
            "l0": float(active.sum(axis=1).mean()),
            "dead_fraction": float(1.0 - fired.mean())}


def validation_record(model: Any, X_val: np.ndarray) -> dict[str, Any]:
    figures = evaluate(model, X_val)
    return {"val_loss": figures["mse"], "val_fve": figures["fve"], "val_l0": figures["l0"],
            "val_dead_fraction": figures["dead_fraction"]}


def hold_out(source: BatchSource, validation_data: Any, train_cfg: TrainConfig,
             rng: np.random.Generator, dtype: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The validation data of a run: (the validation rows ``validation_data``, checked here,
    or None; the indices of ``validation_split`` of the source's rows, drawn from ``rng``, to
    hold out, or None). Holding out rows needs a source that can be split (rows in memory)."""
    X_val, held_out = None, None
    if validation_data is not None:
        if train_cfg.validation_split:
            raise ValueError("validation_split: give validation_data or validation_split, not both")
        X_val = as_float_matrix(validation_data, "validation_data", dtype, source.shape[1])
    elif train_cfg.validation_split:
        if not hasattr(source, "split"):
            raise ValueError("validation_split: a streamed X cannot be split; pass "
                             "validation_data (rows read into memory) instead")
        held_out = validation_rows(source.shape[0], train_cfg.validation_split, rng)
    if train_cfg.early_stopping_patience and X_val is None and held_out is None:
        raise ValueError("early_stopping_patience: early stopping needs validation_data "
                         "or validation_split > 0")
    return X_val, held_out


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped training between two steps. The model holds the weights of
    the last completed step; with a checkpoint path, that step was saved to ``checkpoint``."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        self.step, self.checkpoint = step, checkpoint
        where = f"; saved to {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"training interrupted after step {step}{where}")


class _InterruptFlag:
    """While active (main thread only), the first SIGINT sets ``requested`` so the loop can
    stop between steps; a second one interrupts at once, as Ctrl-C normally does."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_InterruptFlag":
        # Only in the main thread (where Python runs signal handlers), and not where SIGINT
        # is ignored (a background job): then nothing should interrupt training.
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class TrainingOutcome(NamedTuple):
    """How a run ended."""

    stopped_epoch: int | None
    """The last epoch trained when early stopping ended the run (None: it did not)."""
    best_epoch: int | None
    """The epoch of the best validation loss, with early stopping (None without)."""


class Trainer:
    """Trains a model state with an optimizer (whose state carries over between runs)
    under a ``TrainConfig``.

    ``callback`` receives every record; with ``checkpoint`` (a file path) the run is saved
    there every ``checkpoint_every`` steps, at the end of each epoch and when Ctrl-C stops
    training (which then raises TrainingInterrupted), with ``data`` (the training data's
    ``fingerprint`` and held-out ``validation_rows``) for a resume to check against.
    ``history`` and ``step_history`` are the dicts of lists the records are appended to."""

    def __init__(self, state: ModelState, optimizer: Optimizer, train_cfg: TrainConfig, *,
                 callback: Callback | None = None, checkpoint: str | Path | None = None,
                 data: dict[str, Any] | None = None, history: dict[str, list] | None = None,
                 step_history: dict[str, list] | None = None) -> None:
        self.state, self.optimizer, self.train_cfg = state, optimizer, train_cfg
        self.emit: Callback = callback or (lambda record: None)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.data = data or {}
        self.history = {} if history is None else history
        self.step_history = {} if step_history is None else step_history

    def save(self, position: TrainingPosition) -> None:
        """Write the checkpoint (when there is a path) and tell the callback."""
        if self.checkpoint is None:
            return
        save_checkpoint(self.checkpoint, self.state, self.optimizer, self.train_cfg, position,
                        self.history, self.step_history, self.data)
        self.emit({"event": "checkpoint", "epoch": position.epoch, "step": self.state.n_iter,
                   "path": str(self.checkpoint)})

    def run(self, source: BatchSource, X_val: np.ndarray | None = None,
            position: TrainingPosition | None = None) -> TrainingOutcome:
        """Train on ``source`` up to ``train_cfg.epochs`` epochs (the state already
        initialised), scoring ``X_val`` after each epoch, from ``position`` when resuming."""
        state, train_cfg, cfg = self.state, self.train_cfg, self.state.cfg
        n = source.shape[0]
        total_steps = train_cfg.epochs * math.ceil(n / train_cfg.batch_size)
        if train_cfg.k_start is not None and not cfg.k <= train_cfg.k_start <= cfg.n_latents:
            raise ValueError(f"k_start: expected k = {cfg.k} <= k_start <= n_latents = "
                             f"{cfg.n_latents}, got {train_cfg.k_start}")
        pos = position or TrainingPosition(
            stopper=EarlyStopping(train_cfg.early_stopping_patience, train_cfg.early_stopping_min_delta)
            if train_cfg.early_stopping_patience else None)
        if position is None:
            self.save(pos)  # step 0: a crash before the first periodic save can still resume
        with _InterruptFlag() as interrupt:
            self._epochs(source, X_val, pos, total_steps, interrupt)
        if pos.stopper is not None and train_cfg.restore_best_weights \
                and pos.stopper.best_params is not None:
            with state.changing():
                for name, best in pos.stopper.best_params.items():
                    np.copyto(state.params[name], best)
        if cfg.sparsity == "batchtopk":
            state.calibrate_threshold(source.sample())
        return TrainingOutcome(pos.epoch - 1 if pos.stopped else None,
                               pos.stopper.best_epoch if pos.stopper is not None else None)

    def _epochs(self, source: BatchSource, X_val: np.ndarray | None, pos: TrainingPosition,
                total_steps: int, interrupt: _InterruptFlag) -> None:
        state, train_cfg, cfg, optimizer = self.state, self.train_cfg, self.state.cfg, self.optimizer
        d = source.shape[1]
        schedule = make_schedule(train_cfg.schedule, train_cfg.lr, total_steps=total_steps,
                                 warmup_steps=train_cfg.warmup_steps, step_size=train_cfg.lr_step_size,
                                 gamma=train_cfg.lr_gamma, min_lr=train_cfg.min_lr)
        variance_per_sample = source.total_variance(state.n_threads) / source.shape[0]
        k = curriculum_k(cfg.k, train_cfg, state.n_iter, total_steps)
        while pos.epoch <= train_cfg.epochs and not pos.stopped:
            if pos.batches_done == 0:
                pos.epoch_seed = int(state.rng.integers(2**63)) if train_cfg.shuffle else None
                pos.epoch_stats = RunningStats(cfg.n_latents, d)
                pos.step_stats = RunningStats(cfg.n_latents, d)
            for batch in source.batches(train_cfg.batch_size, pos.epoch_seed, pos.batches_done,
                                        state.n_threads):
                optimizer.lr = schedule(optimizer.n_steps)
                k = curriculum_k(cfg.k, train_cfg, state.n_iter, total_steps)
                result = train_step(state, batch, optimizer, train_cfg, k)
                pos.batches_done += 1
                pos.epoch_stats.add(result)
                if train_cfg.resample_every and state.n_iter % train_cfg.resample_every == 0:
                    pos.epoch_stats.resampled += resample_dead_latents(state, batch, train_cfg,
                                                                       optimizer)
                if train_cfg.log_every:
                    self._log_step(pos, result, k, variance_per_sample)
                if interrupt.requested:
                    self.save(pos)
                    raise TrainingInterrupted(state.n_iter, self.checkpoint)
                if train_cfg.checkpoint_every and state.n_iter % train_cfg.checkpoint_every == 0:
                    self.save(pos)
            self._end_epoch(pos, k, variance_per_sample, X_val)
            if interrupt.requested:
                raise TrainingInterrupted(state.n_iter, self.checkpoint)

    def _log_step(self, pos: TrainingPosition, result: Any, k: int,
                  variance_per_sample: float) -> None:
        pos.step_stats.add(result)
        if self.state.n_iter % self.train_cfg.log_every == 0:
            record = {"event": "step", "epoch": pos.epoch, "step": self.state.n_iter, "k": k,
                      "lr": self.optimizer.lr, **pos.step_stats.record(variance_per_sample)}
            append(self.step_history, record)
            self.emit(record)
            pos.step_stats = RunningStats(self.state.cfg.n_latents, pos.step_stats.n_features)

    def _end_epoch(self, pos: TrainingPosition, k: int, variance_per_sample: float,
                   X_val: np.ndarray | None) -> None:
        record = {"event": "epoch", "epoch": pos.epoch, "step": self.state.n_iter, "k": k,
                  "lr": self.optimizer.lr, **pos.epoch_stats.record(variance_per_sample)}
        if X_val is not None:
            record.update(validation_record(self.state, X_val))
        append(self.history, record)
        stop_early = (pos.stopper is not None
                      and pos.stopper.update(pos.epoch, record["val_loss"], self.state.params))
        pos.epoch, pos.batches_done, pos.epoch_seed = pos.epoch + 1, 0, None
        pos.stopped = stop_early
        self.save(pos)
        self.emit(record)
