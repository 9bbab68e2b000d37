"""Models in SAELens's and sparsify's formats: export to them, read from them.

Three directory formats hold a sparse autoencoder:

    ksae      config.json + model.safetensors       (``ksae.serialization``)
    SAELens   cfg.json    + sae_weights.safetensors (SAELens 6: ``SAE.load_from_disk``)
    sparsify  cfg.json    + sae.safetensors         (sparsify 1.x: ``Sae.load_from_disk``)

``detect_format`` tells them apart by their files and ``read_any`` reads each into a
``ModelState`` (``ksae.load`` uses it); ``ksae.exporting.export_model`` writes a ksae model in
either foreign format. Only what means the same model is converted, so that the codes agree to
float rounding; everything else is refused with a ValueError that says what and why.

The models, in each library's own terms (``pre = (x - b_dec) @ W_enc + b_enc``):

    ksae topk (relu)    relu, keep the k largest                 X_hat = z @ W_dec + b_dec
    SAELens topk        k largest pre, then relu (the same z); with
                        rescale_acts_by_decoder_norm, pre * |W_dec_j| and z / |W_dec_j|
                        before the decoder, which folds into the weights
    sparsify topk       relu, keep the k largest (encoder.weight is W_enc transposed)
    ksae jumprelu       pre where pre > theta_j (theta_j > 0), at most max_k per sample
    SAELens jumprelu    relu(pre) where pre > threshold_j, no cap
    ksae batchtopk      relu, the max_k largest, those >= threshold (one for all latents)
    ksae l1             relu(pre), every latent
    SAELens standard    relu(pre), every latent

So ksae topk goes to both libraries; ksae jumprelu and batchtopk go to SAELens's jumprelu
(batchtopk with the threshold one float below its own, so that ``>=`` becomes ``>``) when
their per-sample cap max_k is n_latents, as SAELens's has none; ksae l1 goes to SAELens's
standard. Back, SAELens topk, jumprelu (as ksae jumprelu with max_k = n_latents) and standard
(as l1), and sparsify topk load. SAELens's ``rescale_acts_by_decoder_norm`` and
``apply_b_dec_to_input: false`` are folded into the weights (``b_enc += b_dec @ W_enc``);
sparsify's ``multi_topk`` only changes the training loss, and loads as plain topk (noted).
Refused: SAELens's gated, abstopk, transcoder and other architectures, ``normalize_activations``
other than "none" (their scaling is not in the file), decoder rows of zero norm to fold;
sparsify's groupmax activation, ``skip_connection`` and ``transcode``; ksae models with kl,
a non-relu activation, a sigmoid output or ``inference_k_scale != 1``.

Half-precision weights (float16, bfloat16) are read as float32, exactly. No torch here:
the files are read and written with ``safetensors.numpy``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors_bytes

from .config import ModelConfig
from .serialization import CONFIG_FILE, WEIGHTS_FILE, read_json, read_model
from .state import ModelState

FORMATS = ("saelens", "sparsify")
"""The foreign formats ``export_model`` writes (``ksae`` is the estimator's ``save``)."""
FOREIGN_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_VERSION = "6.54.12"
"""The SAELens release whose ``cfg.json`` this module writes (SAELens reads a config without
``metadata.sae_lens_version`` as a pre-6.0 one)."""
SAELENS_ARCHITECTURES = {"topk": "topk", "jumprelu": "jumprelu", "standard": "l1"}
"""SAELens architecture -> the ksae sparsity that is the same model."""
_BASE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
_SPARSIFY_TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
METADATA_KEYS = {"model_name": ("model_name", "model"), "hook_name": ("hook_name", "hook", "layer"),
                  "context_size": ("context_size", "context_length"), "dataset_path": ("dataset_path", "dataset")}
"""SAELens metadata field <- the keys of a ksae model's (or its activation store's) metadata."""


# ------------------------------------------------------------------------------ detection
def detect_format(path: str | os.PathLike) -> str:
    """'ksae', 'saelens' or 'sparsify': the format of the model directory ``path``, from the
    files it holds. Raises FileNotFoundError when it holds none of them."""
    directory = Path(path)
    if (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file():
        return "ksae"
    found = _foreign_format(directory)
    if found is None:
        raise FileNotFoundError(
            f"path: {str(directory)!r} holds no saved model: expected {CONFIG_FILE} + "
            f"{WEIGHTS_FILE} (ksae), {FOREIGN_CONFIG} + {SAELENS_WEIGHTS} (SAELens) or "
            f"{FOREIGN_CONFIG} + {SPARSIFY_WEIGHTS} (sparsify)")
    return found


def _foreign_format(directory: Path) -> str | None:
    """'saelens' or 'sparsify' where ``directory`` holds that format's files, else None; with
    both weights files, cfg.json decides (SAELens's has d_sae)."""
    found = [name for name, weights in (("saelens", SAELENS_WEIGHTS), ("sparsify", SPARSIFY_WEIGHTS))
             if (directory / weights).is_file()]
    if not (directory / FOREIGN_CONFIG).is_file() or not found:
        return None
    if len(found) == 1:
        return found[0]
    return "saelens" if "d_sae" in read_json_object(directory / FOREIGN_CONFIG) else "sparsify"


def read_any(path: str | os.PathLike) -> tuple[ModelState, dict[str, Any]]:
    """The model in the directory ``path``, whichever of the three formats it is in: its state
    and its configuration (ksae's ``config.json``; for the others a dict with ``format``,
    ``source`` (their config) and ``notes`` (what the conversion changed)). A directory in
    neither foreign format is read as ksae's, whose errors name the missing file."""
    directory = Path(path)
    is_ksae = (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()
    found = None if is_ksae else _foreign_format(directory)
    reader = {None: read_model, "saelens": read_saelens, "sparsify": read_sparsify}[found]
    return reader(directory)


# ------------------------------------------------------------------------------ file helpers
def read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"path: {str(path)!r} not found")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")  # noqa: TRY004 (a damaged file)
    return config


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file; float16 and bfloat16 ones as float32 (exactly)."""
    if not path.is_file():
        raise FileNotFoundError(f"path: {str(path)!r} not found")
    blob = path.read_bytes()
    try:
        header = _safetensors_header(blob)
        if any(entry.get("dtype") == "BF16" for entry in header.values()):
            return _read_with_bfloat16(blob, header)
        tensors = load_safetensors_bytes(blob)
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    return {name: t.astype(np.float32) if t.dtype == np.float16 else t for name, t in tensors.items()}


def _safetensors_header(blob: bytes) -> dict[str, dict[str, Any]]:
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + size])
    header.pop("__metadata__", None)
    return header


def _read_with_bfloat16(blob: bytes, header: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    """safetensors.numpy has no bfloat16: the tensors of ``blob`` read by hand, bfloat16 as the
    upper halves of float32 bit patterns (exact)."""
    start = 8 + struct.unpack("<Q", blob[:8])[0]
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        raw = blob[start + begin:start + end]
        if entry["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << np.uint32(16)
            array = bits.view(np.float32)
        else:
            dtype = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}[entry["dtype"]]
            array = np.frombuffer(raw, dtype=dtype).astype(np.float32 if dtype == "<f2" else dtype)
        tensors[name] = array.reshape(entry["shape"])
    return tensors


def _check_tensor(where: Path, name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ValueError(f"{where}: tensor {name} has shape {array.shape}, expected {shape}")
    if array.dtype.kind != "f":
        raise ValueError(f"{where}: tensor {name} has dtype {array.dtype}, expected a float type")
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: tensor {name} holds NaN or infinity")


def _check_names(where: Path, tensors: dict[str, np.ndarray], expected: tuple[str, ...]) -> None:
    if set(tensors) != set(expected):
        raise ValueError(f"{where}: expected tensors {sorted(expected)}, found {sorted(tensors)}")


def _field(where: Path, config: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """``config[name]`` checked to be a ``kind`` (``default`` when absent and not None)."""
    if name not in config:
        if default is None:
            raise ValueError(f"{where}: missing the field {name!r}")
        return default
    value = config[name]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ValueError(f"{where}: field {name!r} should be {kind.__name__}, got {value!r}")
    return value


def _ksae_dtype(dtype: Any) -> str:
    """ksae's dtype for weights a library computes with in ``dtype``: float64 stays, the
    rest (float32, float16, bfloat16) become float32."""
    return "float64" if str(dtype).removeprefix("torch.") == "float64" else "float32"


def _state(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> ModelState:
    """A model state from weights named as in files (W_enc (d_in, n_latents))."""
    dtype = np.dtype(cfg.dtype)
    params = {name: np.ascontiguousarray(w, dtype=dtype) for name, w in weights.items()}
    params["W_enc_t"] = np.ascontiguousarray(params.pop("W_enc").T)
    return ModelState(cfg, params)


# ------------------------------------------------------------------------------ SAELens
def read_saelens(path: str | os.PathLike) -> tuple[ModelState, dict[str, Any]]:
    """The SAELens model saved in the directory ``path`` (``cfg.json`` +
    ``sae_weights.safetensors``) as a ksae model state, and ``{"format": "saelens", "source":
    cfg.json's contents, "notes": [...]}``. Raises FileNotFoundError when a file is missing
    and ValueError for a damaged file or a model ksae cannot represent exactly."""
    directory = Path(path)
    config_path, weights_path = directory / FOREIGN_CONFIG, directory / SAELENS_WEIGHTS
    source = read_json_object(config_path)
    architecture, d_in, n = _saelens_shape(config_path, source)
    _check_saelens_options(config_path, source, architecture)
    tensors = _read_tensors(weights_path)
    names = _BASE_TENSORS + (("threshold",) if architecture == "jumprelu" else ())
    _check_names(weights_path, tensors, names)
    shapes = {"W_enc": (d_in, n), "b_enc": (n,), "W_dec": (n, d_in), "b_dec": (d_in,), "threshold": (n,)}
    for name in names:
        _check_tensor(weights_path, name, tensors[name], shapes[name])
    dtype = _ksae_dtype(source.get("dtype", "float32"))
    weights = {name: tensors[name].astype(dtype) for name in names}
    notes = _fold_saelens(weights_path, source, weights)
    if source.get("reshape_activations") == "hook_z":
        notes.append("reshape_activations 'hook_z': ksae takes the (n_heads * d_head) rows flattened")
    sparsity = SAELENS_ARCHITECTURES[architecture]
    k = _saelens_k(config_path, source, architecture, n)
    extra: dict[str, Any] = {}
    if architecture == "jumprelu":
        weights["log_threshold"] = _log_threshold(weights.pop("threshold"), notes)
        extra["max_k"] = n
        notes.append("SAELens's jumprelu keeps every latent above its threshold: max_k = n_latents")
    cfg = ModelConfig(n_latents=n, k=k, sparsity=sparsity, dtype=dtype, **extra)
    return _state(cfg, weights), {"format": "saelens", "source": source, "notes": notes, "history": {}}


def _saelens_shape(where: Path, source: dict[str, Any]) -> tuple[str, int, int]:
    """(architecture, d_in, d_sae) of a SAELens config, or a ValueError naming the field."""
    architecture = _field(where, source, "architecture", str)
    if architecture not in SAELENS_ARCHITECTURES:
        known = ", ".join(map(repr, SAELENS_ARCHITECTURES))
        raise ValueError(f"{where}: SAELens architecture {architecture!r} has no ksae equivalent "
                         f"(ksae reads {known})")
    d_in, n = _field(where, source, "d_in", int), _field(where, source, "d_sae", int)
    if d_in < 1 or n < 1:
        raise ValueError(f"{where}: d_in and d_sae should be >= 1, got {d_in} and {n}")
    return architecture, d_in, n


def _check_saelens_options(where: Path, source: dict[str, Any], architecture: str) -> None:
    norm = source.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise ValueError(
            f"{where}: normalize_activations is {norm!r}; ksae reads only 'none' (SAELens keeps "
            "the scaling outside the weights file: fold it first, e.g. with "
            "sae.fold_activation_norm_scaling_factor(factor), and save again)")
    if source.get("rescale_acts_by_decoder_norm") and architecture != "topk":
        raise ValueError(f"{where}: rescale_acts_by_decoder_norm is true for architecture "
                         f"{architecture!r}; ksae folds it only for 'topk'")
    if source.get("finetuning_scaling_factor"):
        raise ValueError(f"{where}: finetuning_scaling_factor is set; ksae has no such scale")


def _saelens_k(where: Path, source: dict[str, Any], architecture: str, n: int) -> int:
    """k: the config's for topk (required: SAELens silently takes 100 without it); for the
    others, where k only sets defaults in ksae, the k recorded in the metadata (ksae's
    export, or SAELens's training details), if any, else min(32, d_sae)."""
    if architecture == "topk":
        if "k" not in source:
            raise ValueError(f"{where}: a topk model without the field 'k' (SAELens would "
                             "silently use k=100); add the k it was trained with")
        k = _field(where, source, "k", int)
        if not 1 <= k <= n:
            raise ValueError(f"{where}: field 'k' should be in [1, d_sae={n}], got {k}")
        return k
    metadata = source.get("metadata") if isinstance(source.get("metadata"), dict) else {}
    details = metadata.get("training_architecture_details")
    for k in (metadata.get("ksae_k"), details.get("k") if isinstance(details, dict) else None):
        if isinstance(k, (int, float)) and not isinstance(k, bool) and k >= 1:
            return int(min(n, round(k)))
    return min(32, n)


def _fold_saelens(where: Path, source: dict[str, Any], w: dict[str, np.ndarray]) -> list[str]:
    """Fold decoder-norm rescaling and ``apply_b_dec_to_input: false`` into ``w`` (in place);
    returns notes saying what was folded."""
    notes = []
    if source.get("rescale_acts_by_decoder_norm"):
        norms = np.linalg.norm(w["W_dec"], axis=1)
        if not (norms > 0).all():
            raise ValueError(f"{where}: rescale_acts_by_decoder_norm with decoder rows of zero "
                             f"norm (latents {np.flatnonzero(norms == 0)[:5].tolist()}...); "
                             "the rescaling divides by them and cannot be folded")
        w["W_enc"] = w["W_enc"] * norms
        w["b_enc"] = w["b_enc"] * norms
        w["W_dec"] = w["W_dec"] / norms[:, None]
        notes.append("rescale_acts_by_decoder_norm folded: W_enc, b_enc times and W_dec rows "
                     "divided by the decoder row norms")
    if source.get("apply_b_dec_to_input", True) is False:
        w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]
        notes.append("apply_b_dec_to_input false folded: b_enc += b_dec @ W_enc")
    return notes


def _log_threshold(threshold: np.ndarray, notes: list[str]) -> np.ndarray:
    """log of jumprelu thresholds; ``relu(pre) * (pre > t)`` with t <= 0 is relu, which ksae's
    positive thresholds represent with the smallest positive float (noted)."""
    tiny = np.nextafter(threshold.dtype.type(0), threshold.dtype.type(1))
    low = threshold <= 0
    if low.any():
        notes.append(f"{int(low.sum())} threshold(s) <= 0 (plain relu) set to {float(tiny):.3g}")
    with np.errstate(divide="ignore"):
        return np.log(np.where(low, tiny, threshold))


# ------------------------------------------------------------------------------ sparsify
def read_sparsify(path: str | os.PathLike) -> tuple[ModelState, dict[str, Any]]:
    """The sparsify model saved in the directory ``path`` (``cfg.json`` + ``sae.safetensors``)
    as a ksae topk model state, and ``{"format": "sparsify", "source": cfg.json's contents,
    "notes": [...]}``. Raises FileNotFoundError when a file is missing and ValueError for a
    damaged file or a model ksae cannot represent exactly."""
    directory = Path(path)
    config_path, weights_path = directory / FOREIGN_CONFIG, directory / SPARSIFY_WEIGHTS
    source = read_json_object(config_path)
    d_in, n, k = _sparsify_shape(config_path, source)
    notes = _check_sparsify_options(config_path, source)
    tensors = _read_tensors(weights_path)
    _check_names(weights_path, tensors, _SPARSIFY_TENSORS)
    shapes = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    for name, shape in shapes.items():
        _check_tensor(weights_path, name, tensors[name], shape)
    dtype = _ksae_dtype(tensors["encoder.weight"].dtype)
    weights = {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"],
               "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    normalize = _field(config_path, source, "normalize_decoder", bool, True)
    cfg = ModelConfig(n_latents=n, k=k, dtype=dtype, normalize_decoder=normalize)
    return _state(cfg, weights), {"format": "sparsify", "source": source, "notes": notes, "history": {}}


def _sparsify_shape(where: Path, source: dict[str, Any]) -> tuple[int, int, int]:
    """(d_in, num_latents, k): num_latents, or when 0 d_in * expansion_factor, as sparsify."""
    d_in = _field(where, source, "d_in", int)
    num_latents = _field(where, source, "num_latents", int, 0)
    n = num_latents or d_in * _field(where, source, "expansion_factor", int, 32)
    k = _field(where, source, "k", int, 32)
    if d_in < 1 or n < 1 or not 1 <= k <= n:
        raise ValueError(f"{where}: expected d_in >= 1, num_latents >= 1 and 1 <= k <= "
                         f"num_latents, got d_in={d_in}, num_latents={n}, k={k}")
    return d_in, n, k


def _check_sparsify_options(where: Path, source: dict[str, Any]) -> list[str]:
    """Refuse what ksae cannot represent; returns notes on what loads with a change."""
    activation = _field(where, source, "activation", str, "topk")
    if activation != "topk":
        raise ValueError(f"{where}: activation {activation!r}; ksae reads sparsify's 'topk' only")
    for name, what in (("skip_connection", "a linear skip connection (W_skip)"),
                       ("transcode", "a transcoder (input and output differ)")):
        if _field(where, source, name, bool, False):
            raise ValueError(f"{where}: {name} is true: {what}, which a ksae model does not have")
    if _field(where, source, "multi_topk", bool, False):
        return ["multi_topk: a training loss only; loaded as plain topk with the same k"]
    return []
