"""Saved models and training checkpoints, back as estimators: ``load``, ``load_checkpoint``
and ``resume`` (a run continued from its checkpoint, bit for bit as if never stopped)."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, Callable, NamedTuple

from .batches import fingerprint, training_rows
from .checkpoint import read_checkpoint
from .config import TrainConfig
from .estimator import SparseAutoencoder
from .normalization import normalized
from .interchange import read_any
from .progress import TrainingPosition
from .training import Trainer
from .validation import as_float_matrix


def load(path: str | os.PathLike) -> SparseAutoencoder:
    """Load a model saved with ``SparseAutoencoder.save``, or by SAELens (``cfg.json`` +
    ``sae_weights.safetensors``) or sparsify (``cfg.json`` + ``sae.safetensors``): the format
    is told by the files (``ksae.interchange``). Raises ``FileNotFoundError`` when a file is
    missing and ``ValueError`` when a file is damaged, tampered with, from an unknown format
    version, or holds a model ksae cannot represent exactly."""
    state, config = read_any(path)
    return SparseAutoencoder.from_state(state, history=config.get("history", {}))


class Checkpoint(NamedTuple):
    """A checkpoint read back by ``load_checkpoint``."""

    model: SparseAutoencoder
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


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by ``fit(..., checkpoint=path)``. Raises FileNotFoundError
    when it is missing and ValueError when it is damaged, tampered with, or from another
    format version."""
    saved = read_checkpoint(path)
    model = SparseAutoencoder.from_state(saved.state, history=saved.history,
                                         step_history=saved.step_history, optimizer=saved.optimizer)
    return Checkpoint(model, saved.train_config, saved.position, saved.data)


def resume(path: str | os.PathLike, X: Any, *, validation_data: Any = None,
           callback: Callable[[dict[str, Any]], None] | None = None,
           epochs: int | None = None) -> SparseAutoencoder:
    """Continue the training run whose checkpoint is ``path`` on the same data ``X`` (and the
    same ``validation_data``, if the run had any), saving further checkpoints to ``path``.
    With the same thread count the result equals that of the uninterrupted run, bit for bit.
    ``epochs`` raises the run's epoch count (the learning-rate schedule and k curriculum
    then follow the new length). Returns the model."""
    ckpt = read_checkpoint(path)
    state, train_cfg = ckpt.state, ckpt.train_config
    model = SparseAutoencoder.from_state(state, history=ckpt.history,
                                         step_history=ckpt.step_history, optimizer=ckpt.optimizer)
    if epochs is not None:
        train_cfg = TrainConfig(**{**asdict(train_cfg), "epochs": epochs})
    source = training_rows(X, state.cfg.dtype, state.d_in)
    if fingerprint(source) != ckpt.data["fingerprint"]:
        raise ValueError(f"X: not the data the checkpoint {path} was trained on (expected shape "
                         f"{tuple(ckpt.data['fingerprint']['shape'])} and the same rows, got "
                         f"shape {source.shape})")
    held_out = ckpt.data["validation_rows"]
    X_val = None
    if held_out is not None:
        if validation_data is not None:
            raise ValueError("validation_data: this run holds out validation_split of X; "
                             "resume it without validation_data")
        source, X_val = source.split(held_out)
    elif validation_data is not None:
        X_val = as_float_matrix(validation_data, "validation_data", state.cfg.dtype, source.shape[1])
    if train_cfg.early_stopping_patience and X_val is None:
        raise ValueError("validation_data: this run uses early stopping; resume it with the "
                         "same validation_data")
    source, X_val, scale = normalized(source, X_val, train_cfg, state.cfg)
    trainer = Trainer(state, ckpt.optimizer, train_cfg, callback=callback, checkpoint=path,
                      data=ckpt.data, history=model.history_, step_history=model.step_history_)
    return model.train_with(trainer, source, X_val, ckpt.position, input_scale=scale)
