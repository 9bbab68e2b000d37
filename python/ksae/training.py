"""The training loop behind ``SparseAutoencoder.fit``: epochs over shuffled mini-batches with a
learning-rate schedule, gradient clipping, validation, early stopping and history records.

One record is a dict; per epoch it holds ``epoch``, ``step``, ``loss``, ``fve``, ``l0``,
``dead_fraction``, ``lr`` and ``time`` (and ``val_loss``, ``val_fve``, ``val_l0``,
``val_dead_fraction`` when there is validation data), and ``event: "epoch"``; every
``log_every`` steps a record with ``event: "step"`` holds the same training figures over the
steps since the last one. Records go to ``history_`` / ``step_history_`` (dicts of lists) and
to the user's callback, which also receives ``event: "checkpoint"`` (``step``, ``epoch``,
``path``) after each checkpoint is saved.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from . import _core
from .config import ModelConfig, TrainConfig
from .metrics import fraction_of_variance_explained
from .schedules import make_schedule
from .sparsity import active_mask
from .validation import as_float_matrix

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
        self.elapsed_before = 0.0  # seconds spent in this span before a resume
        self.started = time.perf_counter()

    def add(self, result) -> None:
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

    SCALARS = ("samples", "sse", "auxk", "sparsity_loss", "active", "resampled")

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


CANCELLATION_LIMIT = 1e-6
"""total_variance's shortcut stands when the deviations' squares are at least this fraction
of the values' squares: float64 sums then lose at most about eps64 / 1e-6 ~ 2e-10 of it."""


def total_variance(X: np.ndarray, n_threads: int = 0, chunk: int = 8192) -> float:
    """``sum((X - X.mean(axis=0))**2)`` in float64 for a C-contiguous float32/float64 ``X``.

    Computed as ``sum(X**2) - n * sum(mean**2)``, the column sums and the squares summed in
    double by one multi-threaded kernel pass (``_core.sums_and_squares``) instead of NumPy's
    mean and a float64 copy of every chunk, which made a one-epoch fit on 51200 x 784 rows
    0.1 s slower. Where that difference cancels (data far from zero for its spread) the
    deviations are summed directly, ``chunk`` rows at a time."""
    sums, squares = _core.sums_and_squares(X, n_threads)
    mean = sums / X.shape[0]
    total = squares - X.shape[0] * float(mean @ mean)
    if total >= CANCELLATION_LIMIT * squares:
        return total
    total = 0.0
    for start in range(0, X.shape[0], chunk):
        centered = X[start:start + chunk] - mean
        total += float(np.einsum("ij,ij->", centered, centered))
    return total


INIT_SAMPLE_ROWS = 65536
"""Rows of a stream used where a whole in-memory array would be (b_dec_init, batchtopk's
threshold calibration): the first ones of the file."""


class ArrayRows:
    """Training data held in memory: batches are rows gathered in each epoch's order."""

    def __init__(self, X: np.ndarray) -> None:
        self.X = X
        self.shape: tuple[int, int] = X.shape

    def batches(self, batch_size: int, seed: int | None, skip: int = 0,
                n_threads: int = 0) -> Iterator[np.ndarray]:
        """The epoch whose shuffle is drawn from ``seed`` (None: in order), without its first
        ``skip`` batches. A shuffled batch's rows are copied by ``_core.take_rows`` on
        ``n_threads``: NumPy's ``X[rows]`` took 133-143 us of a 3.8 ms step at
        (256, 784, 1000, 25), take_rows on 2 threads 62-68 us."""
        order = epoch_order(self.shape[0], seed)
        for start in range(skip * batch_size, self.shape[0], batch_size):
            stop = min(start + batch_size, self.shape[0])
            yield (_core.take_rows(self.X, order[start:stop], n_threads) if order is not None
                   else self.X[start:stop])

    def total_variance(self, n_threads: int = 0) -> float:
        return total_variance(self.X, n_threads)

    def sample(self) -> np.ndarray:
        """The rows that stand for the data in one-off estimates: all of them."""
        return self.X

    def row(self, i: int) -> np.ndarray:
        return self.X[i]


class StreamRows:
    """Training data streamed from a .npy file (``ksae.NpyRowStream``) a window at a time, so
    memory stays far below the file's size. The whole file is read once up front, for its
    column statistics, which also proves it holds no NaN or infinity. Shuffling is by
    blocks within a window (see ``NpyRowStream.iter_batches``)."""

    def __init__(self, stream: Any, dtype: np.dtype | str, name: str = "X") -> None:
        self.stream, self.dtype = stream, np.dtype(dtype)
        self.shape = (stream.n_rows, stream.n_features)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite data: reported below
            stats = stream.column_statistics()
        self._total_variance = float(stats.variance.sum() * stats.n_rows)
        if not (np.isfinite(stats.mean).all() and np.isfinite(self._total_variance)):
            self._raise_first_bad_row(name)

    def _raise_first_bad_row(self, name: str) -> None:
        start = 0
        for chunk in self.stream.iter_chunks(4096):
            bad = np.flatnonzero(~np.isfinite(chunk).all(axis=1))
            if bad.size:
                raise ValueError(f"{name}: row {start + int(bad[0])} of {self.stream.path} contains "
                                 "NaN or infinity; clean or drop such rows first")
            start += len(chunk)
        raise ValueError(f"{name}: the values of {self.stream.path} overflow float64 sums; rescale the data")

    def batches(self, batch_size: int, seed: int | None, skip: int = 0,
                n_threads: int = 0) -> Iterator[np.ndarray]:
        batches = self.stream.iter_batches(batch_size, shuffle=seed is not None, rng=seed)
        for index, batch in enumerate(batches):
            if index >= skip:
                yield np.ascontiguousarray(batch, dtype=self.dtype)

    def total_variance(self, n_threads: int = 0) -> float:
        return self._total_variance  # from the statistics read up front

    def sample(self) -> np.ndarray:
        rows = self.stream.read(0, min(self.shape[0], INIT_SAMPLE_ROWS))
        return np.ascontiguousarray(rows, dtype=self.dtype)

    def row(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(self.stream.read(i, i + 1)[0], dtype=self.dtype)


def training_rows(X: Any, dtype: np.dtype | str, n_features: int | None = None) -> ArrayRows | StreamRows:
    """Training data as rows to draw batches from: an ``NpyRowStream`` is streamed, anything
    else is checked and converted once by ``as_float_matrix``."""
    from .array_files import NpyRowStream

    if isinstance(X, NpyRowStream):
        if n_features is not None and X.n_features != n_features:
            raise ValueError(f"X: expected {n_features} features (the model's d_in), got "
                             f"{X.n_features} in {X.path}")
        return StreamRows(X, dtype)
    return ArrayRows(as_float_matrix(X, "X", dtype, n_features))


def validation_rows(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of ``fraction`` of ``n`` rows, chosen at random, to hold out."""
    n_val = int(round(n * fraction))
    if n_val < 1 or n_val >= n:
        raise ValueError(f"validation_split: {fraction} of {n} samples leaves no "
                         "training or no validation data")
    return np.sort(rng.permutation(n)[:n_val])


def split_rows(X: np.ndarray, held_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the rows of X not in ``held_out``, the rows in it), each in their original order."""
    keep = np.ones(X.shape[0], dtype=bool)
    keep[held_out] = False
    return X[keep], X[held_out]


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


def epoch_order(n: int, seed: int | None) -> np.ndarray | None:
    """The row order of an epoch: a permutation drawn from ``seed``, or None (in order)."""
    return None if seed is None else np.random.default_rng(seed).permutation(n)


def train(model: "SparseAutoencoder", rows: ArrayRows | StreamRows, X_val: np.ndarray | None,
          train_cfg: TrainConfig, cfg: ModelConfig, callback: Callback | None, *,
          position: TrainingPosition | None = None, checkpoint: Path | None = None,
          save: Callable[[Path, TrainingPosition], None] | None = None) -> None:
    """Run ``model`` on the training ``rows`` up to ``train_cfg.epochs`` epochs (already
    validated and initialised), from ``position`` when resuming. With ``checkpoint``, ``save(checkpoint,
    position)`` is called every ``checkpoint_every`` steps, at the end of each epoch and when
    Ctrl-C stops training (which then raises TrainingInterrupted)."""
    n, d = rows.shape
    total_steps = train_cfg.epochs * math.ceil(n / train_cfg.batch_size)
    if train_cfg.k_start is not None and not cfg.k <= train_cfg.k_start <= cfg.n_latents:
        raise ValueError(f"k_start: expected k = {cfg.k} <= k_start <= n_latents = "
                         f"{cfg.n_latents}, got {train_cfg.k_start}")
    schedule = make_schedule(train_cfg.schedule, train_cfg.lr, total_steps=total_steps,
                             warmup_steps=train_cfg.warmup_steps, step_size=train_cfg.lr_step_size,
                             gamma=train_cfg.lr_gamma, min_lr=train_cfg.min_lr)
    variance_per_sample = rows.total_variance(model._threads(cfg)) / n
    pos = position or TrainingPosition(
        stopper=EarlyStopping(train_cfg.early_stopping_patience, train_cfg.early_stopping_min_delta)
        if train_cfg.early_stopping_patience else None)
    emit = callback or (lambda record: None)
    optimizer = model._optimizer
    k = curriculum_k(cfg.k, train_cfg, model.n_iter_, total_steps)

    def save_now() -> None:
        if checkpoint is not None and save is not None:
            save(checkpoint, pos)
            emit({"event": "checkpoint", "epoch": pos.epoch, "step": model.n_iter_,
                  "path": str(checkpoint)})

    if position is None:
        save_now()  # step 0: a crash before the first periodic save can still resume
    with _InterruptFlag() as interrupt:
        while pos.epoch <= train_cfg.epochs and not pos.stopped:
            if pos.batches_done == 0:
                pos.epoch_seed = int(model._rng.integers(2**63)) if train_cfg.shuffle else None
                pos.epoch_stats = RunningStats(cfg.n_latents, d)
                pos.step_stats = RunningStats(cfg.n_latents, d)
            for batch in rows.batches(train_cfg.batch_size, pos.epoch_seed, pos.batches_done,
                                      model._threads(cfg)):
                optimizer.lr = schedule(optimizer.n_steps)
                k = curriculum_k(cfg.k, train_cfg, model.n_iter_, total_steps)
                result = model._train_step(batch, cfg, train_cfg, k)
                pos.batches_done += 1
                pos.epoch_stats.add(result)
                if train_cfg.resample_every and model.n_iter_ % train_cfg.resample_every == 0:
                    pos.epoch_stats.resampled += model._resample_dead_latents(batch, train_cfg)
                if train_cfg.log_every:
                    pos.step_stats.add(result)
                    if model.n_iter_ % train_cfg.log_every == 0:
                        record = {"event": "step", "epoch": pos.epoch, "step": model.n_iter_,
                                  "k": k, "lr": optimizer.lr,
                                  **pos.step_stats.record(variance_per_sample)}
                        append(model.step_history_, record)
                        emit(record)
                        pos.step_stats = RunningStats(cfg.n_latents, d)
                if interrupt.requested:
                    save_now()
                    raise TrainingInterrupted(model.n_iter_, checkpoint)
                if train_cfg.checkpoint_every and model.n_iter_ % train_cfg.checkpoint_every == 0:
                    save_now()
            record = {"event": "epoch", "epoch": pos.epoch, "step": model.n_iter_, "k": k,
                      "lr": optimizer.lr, **pos.epoch_stats.record(variance_per_sample)}
            if X_val is not None:
                record.update(validation_record(model, X_val))
            append(model.history_, record)
            stop_early = (pos.stopper is not None
                          and pos.stopper.update(pos.epoch, record["val_loss"], model._params))
            pos.epoch, pos.batches_done, pos.epoch_seed = pos.epoch + 1, 0, None
            pos.stopped = stop_early
            save_now()
            emit(record)
            if interrupt.requested:
                raise TrainingInterrupted(model.n_iter_, checkpoint)
    if pos.stopped:
        model.stopped_epoch_ = pos.epoch - 1
    if pos.stopper is not None:
        model.best_epoch_ = pos.stopper.best_epoch
        if train_cfg.restore_best_weights and pos.stopper.best_params is not None:
            for name, best in pos.stopper.best_params.items():
                np.copyto(model._params[name], best)
    if cfg.sparsity == "batchtopk":
        model.calibrate_threshold(rows.sample())
