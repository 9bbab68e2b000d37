"""Saving and loading models: safetensors for the weights, JSON for the configuration.

No pickle anywhere: a model directory holds ``model.safetensors`` (W_enc as (d_in, n_latents),
b_enc, W_dec as (n_latents, d_in), b_dec) and ``config.json`` (format version, constructor
arguments, training counters, and the SHA-256 of the weights file so a mismatched or damaged
pair is detected). Each file is written to a temporary name, flushed and renamed into place,
so an interrupted save never leaves a half-written file under the final name, and gets the
permissions any program's new file gets under the user's umask (0644 under umask 022).

What defines the model (``params``, ``n_iter``, ``threshold``) is sealed: the weights file's
metadata holds a SHA-256 of each of these fields (``seal``), and the weights file is itself
covered by ``weights_sha256``, so editing one of them in ``config.json`` is refused with the
file and field named. The other fields (``history``, ``ksae_version``, anything added, such as
``metadata`` for ``ksae.export_model``) may be edited. Files saved before sealing have no seal
and are refused.

A jumprelu model's weights file also holds ``log_threshold`` (n_latents,). The format version
stays 1: files without it (the other sparsities, and every earlier file) load as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from . import __version__
from .config import (
    FORMAT_VERSION,
    ModelConfig,
    check_int,
    check_known_keys,
    field_names,
)
from .state import ModelState

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SEAL_KEY = "ksae_seal"
"""The safetensors metadata key of a file's seal (``seal``): a model's weights file seals
``MODEL_SEALED`` of its ``config.json``, a checkpoint seals all of its metadata."""
MODEL_SEALED = ("params", "n_iter", "threshold")
"""The fields of ``config.json`` that define the model, sealed by its weights file."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of
    the new: temporary file in the same directory, fsync, rename. The file gets the mode any
    program's new file gets (0o666 less the umask; see ``_create_temporary``)."""
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_temporary(path: Path) -> tuple[int, Path]:
    """An open descriptor and the name of a new, empty file beside ``path``. Created as
    ``open(..., 'w')`` creates a file, with mode 0o666 that the kernel masks by the umask
    (and a directory's default ACL): nothing reads or sets the process-wide umask, which
    ``os.umask`` can only do by changing it, racing with other threads. O_EXCL under a
    random name, as ``mkstemp`` (whose 0600 made every saved file private)."""
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
             | getattr(os, "O_BINARY", 0))
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: no free temporary name in {path.parent}")


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _fields(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The leaves of ``document`` by dotted path (``position.epoch``); a list, a scalar and
    an empty object are leaves."""
    leaves: dict[str, Any] = {}
    for key, value in document.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            leaves.update(_fields(value, f"{path}."))
        else:
            leaves[path] = value
    return leaves


def seal(document: dict[str, Any]) -> dict[str, str]:
    """The seal of a JSON ``document``: the SHA-256 of each field (dotted path) and its
    canonical JSON, taken as the document reads back from JSON, so that ``check_seal``
    can name the field that changed."""
    leaves = _fields(json.loads(json.dumps(document)))
    return {path: hashlib.sha256(path.encode() + b"\0" + _canonical(value)).hexdigest()
            for path, value in leaves.items()}


def check_seal(document: dict[str, Any], sealed: Any, where: str, rule: str) -> None:
    """Raise a ValueError naming ``where`` and the first field of ``document`` that was
    changed, added or removed since ``sealed = seal(document)``; ``rule`` says what may be
    edited."""
    if not isinstance(sealed, dict):
        raise ValueError(f"{where}: no seal of its fields (saved before ksae sealed its files, "  # noqa: TRY004 (a damaged file)
                         f"during 0.1.0's development, or damaged); {rule}")
    found = seal(document)
    for path in sorted(set(found) | set(sealed)):
        how = ("added" if path not in sealed else "removed" if path not in found
               else "changed" if found[path] != sealed[path] else None)
        if how:
            raise ValueError(f"{where}: field {path} was {how} after saving; {rule}")


def read_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (the numpy loader does not return it); {}
    when it has none. ValueError when the header is not readable."""
    if len(blob) < 8:
        raise ValueError("file too short")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise ValueError("header runs past the end of the file")
    header = json.loads(blob[8:8 + size])
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


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
    sealed = json.dumps(seal({name: meta[name] for name in MODEL_SEALED}))
    blob = save_safetensors_bytes({name: np.ascontiguousarray(w) for name, w in weights.items()},
                                  metadata={"format": "ksae", "format_version": str(FORMAT_VERSION),
                                            SEAL_KEY: sealed})
    config = {"format": "ksae", "format_version": FORMAT_VERSION, "ksae_version": __version__,
              "weights_sha256": hashlib.sha256(blob).hexdigest(), **meta}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / WEIGHTS_FILE, blob)
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return directory


def read_model(path: str | os.PathLike) -> tuple[ModelState, dict[str, Any]]:
    """Read a model saved by ``save_model``: its state and its ``config.json`` (whose
    ``history`` is the training history). Raises ``FileNotFoundError`` when a file is
    missing and ``ValueError`` naming the file (and field) when a file is damaged, edited
    where it is sealed (``MODEL_SEALED``), or from an unknown format version."""
    directory = Path(path)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"path: {str(p)!r} not found; is {str(directory)!r} a saved ksae model?")
    config = _read_config(config_path)
    blob = weights_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != config.get("weights_sha256"):
        raise ValueError(f"{weights_path}: contents do not match the checksum in {CONFIG_FILE} "
                         "(truncated, corrupted or from another save)")
    try:
        weights = load_safetensors_bytes(blob)
        sealed = read_metadata(blob).get(SEAL_KEY)
        sealed = None if sealed is None else json.loads(sealed)
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    cfg = _model_config(config, config_path)
    _check_weights(weights, cfg, weights_path)
    state = ModelState(cfg, {"W_enc_t": weights["W_enc"].T, **weights})
    state.n_iter, state.threshold = _counters(config, config_path)
    check_seal({name: config[name] for name in MODEL_SEALED if name in config}, sealed,
               str(config_path), f"params, n_iter and threshold are sealed by {WEIGHTS_FILE} "
               "(the other fields, such as history, may be edited)")
    return state, config


def _read_config(config_path: Path) -> dict[str, Any]:
    """A ``config.json`` of this format version."""
    config = read_json(config_path)
    if not isinstance(config, dict) or config.get("format") != "ksae":
        raise ValueError(f"{config_path}: not a ksae model configuration")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {config.get('format_version')!r} is not "
                         f"supported by ksae {__version__} (expected {FORMAT_VERSION})")
    return config


def _model_config(config: dict[str, Any], config_path: Path) -> ModelConfig:
    """The ``params`` of a ``config.json`` as a ModelConfig; errors name the file and field."""
    params = config.get("params")
    if not isinstance(params, dict):
        raise ValueError(f"{config_path}: missing the 'params' object")  # noqa: TRY004 (a damaged file)
    check_known_keys(f"{config_path}: params", params, field_names(ModelConfig))
    try:
        return ModelConfig(**params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path}: params.{exc}") from None


def _counters(config: dict[str, Any], config_path: Path) -> tuple[int, float | None]:
    """(n_iter, threshold) of a ``config.json``; errors name the file and field."""
    threshold = config.get("threshold")
    try:
        n_iter = check_int("n_iter", config.get("n_iter", 0), 0)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path}: {exc}") from None
    if threshold is None:
        return n_iter, None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"{config_path}: threshold: expected null or a finite number, got {threshold!r}")
    return n_iter, float(threshold)


def _check_weights(weights: dict[str, np.ndarray], cfg: ModelConfig, where: Path) -> None:
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"}
    if cfg.sparsity == "jumprelu":
        expected.add("log_threshold")
    if set(weights) != expected:
        raise ValueError(f"{where}: expected tensors {sorted(expected)}, found {sorted(weights)} "
                         f"({CONFIG_FILE}'s params.sparsity is {cfg.sparsity!r})")
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
                             f"expected {shape} and {cfg.dtype} ({CONFIG_FILE}'s params.n_latents "
                             f"is {n} and params.dtype {cfg.dtype!r})")
        if not np.isfinite(w).all():
            raise ValueError(f"{where}: tensor {name} holds NaN or infinity")
