"""``ksae.export_model``: a ksae model written in SAELens's or sparsify's format, exactly what
their ``load_from_disk`` reads (``ksae.interchange`` holds the formats, what is the same model
in each, and the reading back)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as save_safetensors_bytes

from . import __version__
from .config import ModelConfig
from .interchange import (FOREIGN_CONFIG, FORMATS, METADATA_KEYS, SAELENS_VERSION, SAELENS_WEIGHTS,
                          SPARSIFY_WEIGHTS, read_any, read_json_object)
from .serialization import atomic_write_bytes
from .state import ModelState


def export_model(model: Any, out_dir: str | os.PathLike, format: str = "saelens", *,
                 overwrite: bool = False) -> Path:
    """Write ``model`` (a fitted ``SparseAutoencoder``, a ``ModelState``, or the directory of
    a saved model or of a ``ksae train`` run) to the directory ``out_dir`` in ``format``:
    'saelens' (``cfg.json`` + ``sae_weights.safetensors``, for ``sae_lens.SAE.load_from_disk``)
    or 'sparsify' (``cfg.json`` + ``sae.safetensors``, for ``sparsify.Sae.load_from_disk``).
    A non-empty ``out_dir`` is refused unless ``overwrite``. Raises ValueError for a model
    the format cannot represent exactly (see the module docstring). Returns ``out_dir``."""
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    cfg, params, threshold, metadata = _export_source(model)
    directory = Path(out_dir)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"out_dir: {str(directory)!r} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise ValueError(f"out_dir: {str(directory)!r} is not empty (pass overwrite=True, "
                         "or --force on the command line, to write into it)")
    if format == "saelens":
        config, tensors, weights_file = _saelens_export(cfg, params, threshold, metadata)
    else:
        config, tensors, weights_file = _sparsify_export(cfg, params)
    blob = save_safetensors_bytes({name: np.ascontiguousarray(t) for name, t in tensors.items()})
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / weights_file, blob)
    atomic_write_bytes(directory / FOREIGN_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    return directory


def _export_source(model: Any) -> tuple[ModelConfig, dict[str, np.ndarray], float | None, dict[str, Any]]:
    """(cfg, params, batchtopk threshold, source metadata) of what ``export_model`` takes."""
    if isinstance(model, (str, os.PathLike)):
        directory, metadata = _model_directory(Path(model))
        state, config = read_any(directory)
        meta = config.get("metadata")
        return state.cfg, state.params, state.threshold, meta if isinstance(meta, dict) else metadata
    if isinstance(model, ModelState):
        return model.cfg, model.params, model.threshold, {}
    if hasattr(type(model), "state_") and hasattr(model, "config"):
        state, cfg = model.state_, model.config  # NotFittedError before fitting
        if (cfg.sparsity == "jumprelu") != ("log_threshold" in state.params):
            raise ValueError(f"sparsity: the model's weights are not those of a sparsity="
                             f"{cfg.sparsity!r} model; call fit to re-initialise")
        return cfg, state.params, state.threshold, {}
    raise TypeError("model: expected a SparseAutoencoder, a ModelState or a model directory, "
                    f"got {type(model).__name__}")


def _model_directory(path: Path) -> tuple[Path, dict[str, Any]]:
    """The saved model of ``path`` (itself, or a run directory's ``model/``) and, for a run
    trained on an activation store, the store's metadata (model, layer)."""
    if not (path / "model").is_dir():
        return path, {}
    metadata: dict[str, Any] = {}
    run_file = path / "config.json"
    if run_file.is_file():
        data = read_json_object(run_file).get("data") or {}
        if isinstance(data, dict) and data.get("dataset") == "store" and data.get("path"):
            manifest = Path(data["path"]) / "manifest.json"
            if manifest.is_file():
                found = read_json_object(manifest).get("metadata")
                metadata = found if isinstance(found, dict) else {}
    return path / "model", metadata


def _check_exportable(cfg: ModelConfig, format: str) -> None:
    """Raise a ValueError naming what of ``cfg`` the format cannot represent."""
    sparsities = ("topk", "batchtopk", "jumprelu", "l1") if format == "saelens" else ("topk",)
    if cfg.sparsity not in sparsities:
        raise ValueError(f"sparsity: {format} has no model equal to ksae's {cfg.sparsity!r} "
                         f"(exportable: {', '.join(sparsities)})")
    if cfg.activation != "relu":
        raise ValueError(f"activation: {format} encodes with relu; this model uses {cfg.activation!r}")
    if cfg.output_activation != "linear":
        raise ValueError(f"output_activation: {format} decodes linearly; this model applies "
                         f"{cfg.output_activation!r} to its output")
    if cfg.inference_k_scale != 1.0:
        raise ValueError(f"inference_k_scale: {format} keeps exactly the k latents it was trained "
                         f"with; this model encodes with {cfg.inference_k_scale} * k "
                         "(set_params(inference_k_scale=1.0) to export it)")
    if cfg.sparsity in ("batchtopk", "jumprelu") and (cfg.max_k or 4 * cfg.k) < cfg.n_latents:
        raise ValueError(
            f"max_k: SAELens's jumprelu keeps every latent above its threshold, but this "
            f"{cfg.sparsity} model keeps at most max_k={min(cfg.max_k or 4 * cfg.k, cfg.n_latents)} "
            f"per sample; set_params(max_k={cfg.n_latents}) to export it without the cap")


def _file_weights(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"W_enc": params["W_enc_t"].T, "b_enc": params["b_enc"], "W_dec": params["W_dec"],
            "b_dec": params["b_dec"]}


def _saelens_export(cfg: ModelConfig, params: dict[str, np.ndarray], threshold: float | None,
                    metadata: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """SAELens 6's cfg.json, tensors and weights file name for a ksae model."""
    _check_exportable(cfg, "saelens")
    tensors = _file_weights(params)
    architecture = {"topk": "topk", "l1": "standard"}.get(cfg.sparsity, "jumprelu")
    if cfg.sparsity == "jumprelu":
        tensors["threshold"] = np.exp(params["log_threshold"])
    elif cfg.sparsity == "batchtopk":  # ksae keeps values >= t, SAELens pre > t: one float below
        t = np.asarray(threshold or 0.0, dtype=cfg.dtype)
        tensors["threshold"] = np.full(cfg.n_latents, np.nextafter(t, -np.inf), dtype=cfg.dtype)
    config: dict[str, Any] = {
        "d_in": int(params["b_dec"].shape[0]), "d_sae": cfg.n_latents, "dtype": cfg.dtype,
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none", "metadata": _saelens_metadata(cfg, metadata),
        "architecture": architecture}
    if architecture == "topk":
        config.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    return config, tensors, SAELENS_WEIGHTS


def _saelens_metadata(cfg: ModelConfig, source: dict[str, Any]) -> dict[str, Any]:
    """SAELens's metadata: its version, ksae's, and model/hook names found in ``source``."""
    metadata: dict[str, Any] = {"sae_lens_version": SAELENS_VERSION,
                                "sae_lens_training_version": SAELENS_VERSION}
    for name, keys in METADATA_KEYS.items():
        value = next((source[key] for key in keys if source.get(key) is not None), None)
        if value is not None:
            if name != "context_size":
                metadata[name] = str(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                metadata[name] = value
    metadata.update(ksae_version=__version__, ksae_sparsity=cfg.sparsity, ksae_k=cfg.k)
    return metadata


def _sparsify_export(cfg: ModelConfig, params: dict[str, np.ndarray]
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """sparsify's cfg.json (SparseCoderConfig's fields and d_in), tensors and file name."""
    _check_exportable(cfg, "sparsify")
    d_in, n = int(params["b_dec"].shape[0]), cfg.n_latents
    config = {"activation": "topk", "expansion_factor": max(1, n // d_in),
              "normalize_decoder": cfg.normalize_decoder, "num_latents": n, "k": cfg.k,
              "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d_in}
    tensors = {"encoder.weight": params["W_enc_t"], "encoder.bias": params["b_enc"],
               "W_dec": params["W_dec"], "b_dec": params["b_dec"]}
    return config, tensors, SPARSIFY_WEIGHTS
