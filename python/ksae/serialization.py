"""Saving and loading models: safetensors for the weights, JSON for the configuration.

No pickle anywhere: a model directory holds ``model.safetensors`` (W_enc as (d_in, n_latents),
b_enc, W_dec as (n_latents, d_in), b_dec) and ``config.json`` (format version, constructor
arguments, training counters, and the SHA-256 of the weights file so a mismatched or damaged
pair is detected). Each file is written to a temporary name, flushed and renamed into place,
so an interrupted save never leaves a half-written file under the final name.

A jumprelu model's weights file also holds ``log_threshold`` (n_latents,). The format version
stays 1: files without it (the other sparsities, and every earlier file) load as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from dataclasses import asdict
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from . import __version__
from .config import FORMAT_VERSION, ModelConfig
from .state import ModelState

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of
    the new: temporary file in the same directory, fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    """The JSON document in ``path``; ValueError naming the file when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def save_model(state: ModelState, path: str | os.PathLike,
               history: dict[str, list] | None = None) -> Path:
    """Save a model state (and its training ``history``) to the directory ``path``; returns
    the directory."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"path: {str(directory)!r} exists and is not a directory")
    meta = {"params": asdict(state.cfg), "n_iter": state.n_iter, "threshold": state.threshold,
            "history": history or {}}
    p = state.params
    weights = {"W_enc": np.ascontiguousarray(p["W_enc_t"].T), "b_enc": p["b_enc"],
               "W_dec": p["W_dec"], "b_dec": p["b_dec"]}
    if "log_threshold" in p:  # jumprelu
        weights["log_threshold"] = p["log_threshold"]
    blob = save_safetensors_bytes({name: np.ascontiguousarray(w) for name, w in weights.items()},
                                  metadata={"format": "ksae", "format_version": str(FORMAT_VERSION)})
    config = {"format": "ksae", "format_version": FORMAT_VERSION, "ksae_version": __version__,
              "weights_sha256": hashlib.sha256(blob).hexdigest(), **meta}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / WEIGHTS_FILE, blob)
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return directory


def read_model(path: str | os.PathLike) -> tuple[ModelState, dict[str, Any]]:
    """Read a model saved by ``save_model``: its state and its ``config.json`` (whose
    ``history`` is the training history). Raises ``FileNotFoundError`` when a file is
    missing and ``ValueError`` when a file is damaged, tampered with or from an unknown
    format version."""
    directory = Path(path)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"path: {str(p)!r} not found; is {str(directory)!r} a saved ksae model?")
    config = read_json(config_path)
    if not isinstance(config, dict) or config.get("format") != "ksae":
        raise ValueError(f"{config_path}: not a ksae model configuration")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {config.get('format_version')!r} is not "
                         f"supported by ksae {__version__} (expected {FORMAT_VERSION})")
    blob = weights_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != config.get("weights_sha256"):
        raise ValueError(f"{weights_path}: contents do not match the checksum in {CONFIG_FILE} "
                         "(truncated, corrupted or from another save)")
    try:
        weights = load_safetensors_bytes(blob)
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    params = config.get("params")
    if not isinstance(params, dict):
        raise ValueError(f"{config_path}: missing the 'params' object")
    try:
        cfg = ModelConfig(**params)
    except TypeError as exc:
        raise ValueError(f"{config_path}: bad params ({exc})") from None
    _check_weights(weights, cfg, weights_path)
    state = ModelState(cfg, {"W_enc_t": weights["W_enc"].T, **weights})
    state.n_iter = int(config.get("n_iter", 0))
    threshold = config.get("threshold")
    state.threshold = None if threshold is None else float(threshold)
    return state, config


def _check_weights(weights: dict[str, np.ndarray], cfg: ModelConfig, where: Path) -> None:
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"}
    if cfg.sparsity == "jumprelu":
        expected.add("log_threshold")
    if set(weights) != expected:
        raise ValueError(f"{where}: expected tensors {sorted(expected)}, found {sorted(weights)}")
    n = cfg.n_latents
    d = weights["b_dec"].shape[0] if weights["b_dec"].ndim == 1 else -1
    shapes: dict[str, tuple[Any, ...]] = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,),
                                          "log_threshold": (n,)}
    for name, shape in shapes.items():
        if name not in expected:
            continue
        w = weights[name]
        if w.shape != shape or w.dtype != np.dtype(cfg.dtype):
            raise ValueError(f"{where}: tensor {name} has shape {w.shape} and dtype {w.dtype}, "
                             f"expected {shape} and {cfg.dtype}")
        if not np.isfinite(w).all():
            raise ValueError(f"{where}: tensor {name} holds NaN or infinity")
