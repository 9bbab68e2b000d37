"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is one safetensors file: the arrays (weights, optimizer state, dead-latent
counters, the in-progress epoch's statistics, early stopping's best weights, the rows held
out for validation) as tensors, and everything else (configurations, optimizer settings and
step count, the random generator's state, the position within the epoch, history) as JSON in
the file's metadata, with the SHA-256 of the tensors. That JSON is sealed (``seal``: a SHA-256
of each field, under the metadata key ``ksae_seal``): a checkpoint whose metadata was edited
(``optimizer.n_steps``, ``position.epoch``, ``rng_state``, a history...) is refused with the
file and field named, and one saved before sealing is refused too. It is written with
``atomic_write_bytes``, so a process killed while saving leaves the previous checkpoint whole.

Resuming from it (``ksae.resume``) with the same data and thread count gives the weights an
uninterrupted run would have given, bit for bit. This module reads and writes a model state
with its trainer's state; ``ksae.load_checkpoint`` and ``ksae.resume`` give an estimator.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from . import __version__
from .buffers import as_aligned
from .config import ModelConfig, TrainConfig
from .optim import Optimizer, make_optimizer
from .progress import EarlyStopping, RunningStats, TrainingPosition
from .serialization import SEAL_KEY, atomic_write_bytes, check_seal, read_metadata, seal
from .state import ModelState

CHECKPOINT_FORMAT_VERSION = 1
_META_KEY = "ksae_checkpoint"


class TrainingCheckpoint(NamedTuple):
    """A checkpoint read back by ``read_checkpoint``: a model state and what its trainer
    needs to go on."""

    state: ModelState
    """The model at the saved step, with its firing counters and random generator."""
    optimizer: Optimizer
    """The optimizer with its state (moments, step count, learning rate)."""
    train_config: TrainConfig
    """The training configuration of the run."""
    position: TrainingPosition
    """Where in the run the checkpoint was taken."""
    history: dict[str, list]
    step_history: dict[str, list]
    data: dict[str, Any]
    """``fingerprint`` of the training data, and ``validation_rows`` (held-out row indices,
    or None)."""


def _payload_hash(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: ModelState, optimizer: Optimizer,
                    train_cfg: TrainConfig, position: TrainingPosition,
                    history: dict[str, list], step_history: dict[str, list],
                    data: dict[str, Any]) -> Path:
    """Write a checkpoint of a run in the middle of training to the file ``path``
    (replacing any previous one atomically). Refuses to write non-finite weights."""
    path = Path(path)
    tensors: dict[str, np.ndarray] = {}
    for name, param in state.params.items():
        if not np.isfinite(param).all():
            raise FloatingPointError(f"checkpoint: parameter {name} holds NaN or infinity; "
                                     f"not overwriting {path}")
        tensors[f"param/{name}"] = param
    for name, slot in optimizer.state.items():
        for key, buffer in slot.items():
            tensors[f"optim/{name}/{key}"] = buffer
    tensors["samples_since_fired"] = state.samples_since_fired
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
        "model_config": asdict(state.cfg), "train_config": asdict(train_cfg),
        "optimizer": {"n_steps": optimizer.n_steps, "lr": optimizer.lr},
        "rng_state": state.rng.bit_generator.state,
        "n_iter": state.n_iter, "threshold": state.threshold,
        "history": history, "step_history": step_history,
        "position": {"epoch": position.epoch, "batches_done": position.batches_done,
                     "epoch_seed": position.epoch_seed, "stopped": position.stopped},
        "stats": stats, "stopper": stopper, "fingerprint": data["fingerprint"],
        "payload_sha256": _payload_hash(tensors),
    }
    blob = save_safetensors_bytes({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                  metadata={_META_KEY: json.dumps(meta), SEAL_KEY: json.dumps(seal(meta))})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, blob)
    return path


def read_checkpoint(path: str | os.PathLike) -> TrainingCheckpoint:
    """Read a checkpoint written during training (``fit(..., checkpoint=path)``). Raises
    FileNotFoundError when it is missing and ValueError when it is damaged, tampered with,
    or from another format version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {str(path)!r} not found")
    blob = path.read_bytes()
    try:
        tensors = load_safetensors_bytes(blob)
        metadata = read_metadata(blob)
        meta = json.loads(metadata[_META_KEY])
        sealed = json.loads(metadata[SEAL_KEY]) if SEAL_KEY in metadata else None
    except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint: {path} is not a readable ksae checkpoint ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint: {path} is not a readable ksae checkpoint (its metadata "  # noqa: TRY004 (a damaged file)
                         "is not an object)")
    if meta.get("format") != "ksae-checkpoint" or meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"checkpoint: {path} has format {meta.get('format')!r} version "
                         f"{meta.get('format_version')!r}; ksae {__version__} reads "
                         f"ksae-checkpoint version {CHECKPOINT_FORMAT_VERSION}")
    check_seal(meta, sealed, f"checkpoint: {path}", "a checkpoint's metadata is sealed: "
               "resume it as saved, or train again")
    if _payload_hash(tensors) != meta.get("payload_sha256"):
        raise ValueError(f"checkpoint: {path} does not match its own checksum (corrupted)")
    try:
        return _contents(meta, tensors)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint: {path} is inconsistent ({type(exc).__name__}: {exc})") from None


def _contents(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> TrainingCheckpoint:
    cfg = ModelConfig(**meta["model_config"])
    train_cfg = TrainConfig(**meta["train_config"])
    params = {key.split("/", 1)[1]: value for key, value in tensors.items()
              if key.startswith("param/")}  # PARAM_NAMES, and log_threshold for jumprelu
    rng = np.random.default_rng()
    rng.bit_generator.state = meta["rng_state"]
    state = ModelState(cfg, params, rng)
    state.n_iter = int(meta["n_iter"])
    state.threshold = meta["threshold"]
    state.samples_since_fired = np.array(tensors["samples_since_fired"], dtype=np.int64)
    optimizer = make_optimizer(train_cfg)
    optimizer.n_steps, optimizer.lr = int(meta["optimizer"]["n_steps"]), meta["optimizer"]["lr"]
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, name, slot = key.split("/")
            optimizer.state.setdefault(name, {})[slot] = as_aligned(value, value.dtype)
    position = _position(meta, tensors, state.d_in)
    rows = tensors.get("validation_rows")
    return TrainingCheckpoint(state, optimizer, train_cfg, position, meta["history"],
                              meta["step_history"],
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
