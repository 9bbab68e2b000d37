"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is one safetensors file: the arrays (weights, optimizer state, dead-latent
counters, the in-progress epoch's statistics, early stopping's best weights, the rows held
out for validation) as tensors, and everything else (configurations, optimizer settings and
step count, the random generator's state, the position within the epoch, history) as JSON in
the file's metadata, with the SHA-256 of the tensors. It is written with
``atomic_write_bytes``, so a process killed while saving leaves the previous checkpoint whole.

Resuming from it (``ksae.resume``) with the same data and thread count gives the weights an
uninterrupted run would have given, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from . import __version__
from .buffers import as_aligned
from .config import ModelConfig, TrainConfig
from .optim import make_optimizer
from .serialization import atomic_write_bytes
from .training import ArrayRows, EarlyStopping, RunningStats, StreamRows, TrainingPosition

if TYPE_CHECKING:
    from .model import SparseAutoencoder

CHECKPOINT_FORMAT_VERSION = 1
_META_KEY = "ksae_checkpoint"


class Checkpoint(NamedTuple):
    """A checkpoint read back by ``load_checkpoint``."""

    model: "SparseAutoencoder"
    """The model at the saved step, with its optimizer state and random generator."""
    train_config: TrainConfig
    """The training configuration of the run."""
    position: TrainingPosition
    """Where in the run the checkpoint was taken."""
    data: dict[str, Any]
    """``fingerprint`` of the training data, and ``validation_rows`` (held-out row indices,
    or None)."""

    @property
    def step(self) -> int:
        """Optimizer steps completed."""
        return self.model.n_iter_


def data_fingerprint(rows: "ArrayRows | StreamRows") -> dict[str, Any]:
    """Shape and a hash of three rows of the training data: enough to catch resuming on
    other data without reading all of it."""
    n = rows.shape[0]
    h = hashlib.sha256()
    for i in sorted({0, n // 2, n - 1}):
        h.update(np.ascontiguousarray(rows.row(i)).tobytes())
    return {"shape": list(rows.shape), "rows_sha256": h.hexdigest()}


def _payload_hash(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: "SparseAutoencoder", train_cfg: TrainConfig,
                    position: TrainingPosition, data: dict[str, Any]) -> Path:
    """Write a checkpoint of ``model`` in the middle of training to the file ``path``
    (replacing any previous one atomically). Refuses to write non-finite weights."""
    path = Path(path)
    tensors: dict[str, np.ndarray] = {}
    for name, param in model._fitted().items():
        if not np.isfinite(param).all():
            raise FloatingPointError(f"checkpoint: parameter {name} holds NaN or infinity; "
                                     f"not overwriting {path}")
        tensors[f"param/{name}"] = param
    optimizer = model._optimizer
    for name, slot in optimizer.state.items():
        for key, buffer in slot.items():
            tensors[f"optim/{name}/{key}"] = buffer
    tensors["samples_since_fired"] = model.samples_since_fired_
    stats: dict[str, Any] = {}
    for which in ("epoch", "step"):
        running = getattr(position, f"{which}_stats")
        if running is not None:
            stats[which], tensors[f"stats/{which}/fired"] = running.state()
    stopper = None
    if position.stopper is not None:
        s = position.stopper
        stopper = {"patience": s.patience, "min_delta": s.min_delta, "best_loss": s.best_loss,
                   "best_epoch": s.best_epoch, "waited": s.waited}
        for name, best in (s.best_params or {}).items():
            tensors[f"best/{name}"] = best
    if data.get("validation_rows") is not None:
        tensors["validation_rows"] = np.asarray(data["validation_rows"], dtype=np.int64)
    meta = {
        "format": "ksae-checkpoint", "format_version": CHECKPOINT_FORMAT_VERSION,
        "ksae_version": __version__,
        "model_config": asdict(model.config), "train_config": asdict(train_cfg),
        "optimizer": {"n_steps": optimizer.n_steps, "lr": optimizer.lr},
        "rng_state": model._rng.bit_generator.state,
        "n_iter": model.n_iter_, "threshold": model.threshold_,
        "history": model.history_, "step_history": model.step_history_,
        "position": {"epoch": position.epoch, "batches_done": position.batches_done,
                     "epoch_seed": position.epoch_seed, "stopped": position.stopped},
        "stats": stats, "stopper": stopper, "fingerprint": data["fingerprint"],
        "payload_sha256": _payload_hash(tensors),
    }
    blob = save_safetensors_bytes({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                  metadata={_META_KEY: json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, blob)
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by ``fit(..., checkpoint=path)``. Raises FileNotFoundError
    when it is missing and ValueError when it is damaged, tampered with, or from another
    format version."""
    from .model import SparseAutoencoder

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {str(path)!r} not found")
    blob = path.read_bytes()
    try:
        tensors = load_safetensors_bytes(blob)
        meta = json.loads(_read_metadata(blob)[_META_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint: {path} is not a readable ksae checkpoint ({exc})") from None
    if meta.get("format") != "ksae-checkpoint" or meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"checkpoint: {path} has format {meta.get('format')!r} version "
                         f"{meta.get('format_version')!r}; ksae {__version__} reads "
                         f"ksae-checkpoint version {CHECKPOINT_FORMAT_VERSION}")
    if _payload_hash(tensors) != meta.get("payload_sha256"):
        raise ValueError(f"checkpoint: {path} does not match its own checksum (corrupted)")
    try:
        cfg = ModelConfig(**meta["model_config"])
        train_cfg = TrainConfig(**meta["train_config"])
        model = SparseAutoencoder(**asdict(cfg))
        dtype = np.dtype(cfg.dtype)
        params = {key.split("/", 1)[1]: value for key, value in tensors.items()
                  if key.startswith("param/")}  # PARAM_NAMES, and log_threshold for jumprelu
        model._set_weights(params, dtype)
        model._reset_training_state(cfg.n_latents)
        model.n_iter_ = int(meta["n_iter"])
        model.threshold_ = meta["threshold"]
        model.history_, model.step_history_ = meta["history"], meta["step_history"]
        model.samples_since_fired_ = np.array(tensors["samples_since_fired"], dtype=np.int64)
        model._rng = np.random.default_rng()
        model._rng.bit_generator.state = meta["rng_state"]
        optimizer = make_optimizer(train_cfg)
        optimizer.n_steps, optimizer.lr = int(meta["optimizer"]["n_steps"]), meta["optimizer"]["lr"]
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, name, slot = key.split("/")
                optimizer.state.setdefault(name, {})[slot] = as_aligned(value, value.dtype)
        model._optimizer = optimizer
        position = _position(meta, tensors, model.n_features_in_)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint: {path} is inconsistent ({type(exc).__name__}: {exc})") from None
    rows = tensors.get("validation_rows")
    return Checkpoint(model, train_cfg, position,
                      {"fingerprint": meta["fingerprint"], "validation_rows": rows})


def _position(meta: dict[str, Any], tensors: dict[str, np.ndarray], n_features: int) -> TrainingPosition:
    p = meta["position"]
    position = TrainingPosition(epoch=int(p["epoch"]), batches_done=int(p["batches_done"]),
                                epoch_seed=p["epoch_seed"], stopped=bool(p["stopped"]))
    for which, scalars in meta["stats"].items():
        setattr(position, f"{which}_stats",
                RunningStats.from_state(scalars, tensors[f"stats/{which}/fired"], n_features))
    s = meta["stopper"]
    if s is not None:
        stopper = EarlyStopping(s["patience"], s["min_delta"])
        stopper.best_loss, stopper.best_epoch, stopper.waited = s["best_loss"], s["best_epoch"], s["waited"]
        best = {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith("best/")}
        stopper.best_params = best or None
        position.stopper = stopper
    return position


def _read_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (the numpy loader does not return it)."""
    if len(blob) < 8:
        raise ValueError("file too short")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise ValueError("header runs past the end of the file")
    header = json.loads(blob[8:8 + size])
    return header["__metadata__"]


def resume(path: str | os.PathLike, X: Any, *, validation_data: Any = None,
           callback: Callable[[dict[str, Any]], None] | None = None,
           epochs: int | None = None) -> "SparseAutoencoder":
    """Continue the training run whose checkpoint is ``path`` on the same data ``X`` (and the
    same ``validation_data``, if the run had any), saving further checkpoints to ``path``.
    With the same thread count the result equals that of the uninterrupted run, bit for bit.
    ``epochs`` raises the run's epoch count (the learning-rate schedule and k curriculum
    then follow the new length). Returns the model."""
    from .training import split_rows, training_rows
    from .validation import as_float_matrix

    ckpt = load_checkpoint(path)
    model, train_cfg = ckpt.model, ckpt.train_config
    if epochs is not None:
        train_cfg = TrainConfig(**{**asdict(train_cfg), "epochs": epochs})
    cfg = model.config
    rows = training_rows(X, cfg.dtype, model.n_features_in_)
    if data_fingerprint(rows) != ckpt.data["fingerprint"]:
        raise ValueError(f"X: not the data the checkpoint {path} was trained on (expected shape "
                         f"{tuple(ckpt.data['fingerprint']['shape'])} and the same rows, got "
                         f"shape {rows.shape})")
    held_out = ckpt.data["validation_rows"]
    X_val = None
    if held_out is not None:
        if validation_data is not None:
            raise ValueError("validation_data: this run holds out validation_split of X; "
                             "resume it without validation_data")
        train_X, X_val = split_rows(rows.X, held_out)
        rows = ArrayRows(train_X)
    elif validation_data is not None:
        X_val = as_float_matrix(validation_data, "validation_data", cfg.dtype, rows.shape[1])
    if train_cfg.early_stopping_patience and X_val is None:
        raise ValueError("validation_data: this run uses early stopping; resume it with the "
                         "same validation_data")
    model._train(rows, X_val, train_cfg, callback, Path(path), ckpt.data, ckpt.position)
    return model
