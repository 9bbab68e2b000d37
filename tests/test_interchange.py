"""SAELens and sparsify formats without the libraries: fixture directories written from the
formats' documented fields, round trips through ksae.export_model and ksae.load, each
refusal, and ``ksae export``'s one-line errors. (tests/test_hf_interchange.py checks the same
against the real libraries where they are installed.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import ksae
import numpy as np
import pytest
from conftest import make_weights
from ksae.cli import main
from ksae.config import ModelConfig
from ksae.interchange import detect_format, read_saelens, read_sparsify
from ksae.state import ModelState
from safetensors.numpy import save_file

D_IN, N, K = 12, 40, 4


def model(rng: np.random.Generator, dtype: str = "float32", **params: Any) -> ksae.SparseAutoencoder:
    """A fitted-looking estimator with random weights (no training needed)."""
    cfg = ModelConfig(**{"n_latents": N, "k": K, "dtype": dtype, **params})
    weights = make_weights(rng, D_IN, N, dtype)
    if cfg.sparsity == "jumprelu":
        weights["log_threshold"] = np.log(rng.uniform(0.05, 0.5, N)).astype(dtype)
    return ksae.SparseAutoencoder.from_state(ModelState(cfg, weights))


def dense(sae: ksae.SparseAutoencoder, X: np.ndarray) -> np.ndarray:
    return np.asarray(sae.transform(X))


def data(rng: np.random.Generator, dtype: str = "float32") -> np.ndarray:
    return rng.standard_normal((64, D_IN)).astype(dtype)


def saelens_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """SAELens's tensors: W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec."""
    w = make_weights(rng, D_IN, N, np.float32)
    return {"W_enc": np.ascontiguousarray(w["W_enc_t"].T), "b_enc": w["b_enc"],
            "W_dec": w["W_dec"] * rng.uniform(0.5, 2.0, (N, 1)).astype(np.float32), "b_dec": w["b_dec"]}


def write_saelens(directory: Path, weights: dict[str, np.ndarray], **fields: Any) -> Path:
    """A SAELens 6 directory: cfg.json with the SAEConfig fields + sae_weights.safetensors."""
    cfg = {"d_in": D_IN, "d_sae": N, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.3.hook_resid_post"},
           "architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": False, **fields}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(directory / "sae_weights.safetensors"))
    return directory


def saelens_codes(cfg: dict[str, Any], w: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """SAELens 6's encode in float64: pre = (x - b_dec * apply) @ W_enc + b_enc; topk: pre
    times |W_dec_j| if rescaled, the k largest, relu; jumprelu: relu(pre) * (pre > t);
    standard: relu(pre)."""
    w = {name: t.astype(np.float64) for name, t in w.items()}
    pre = (X - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)) @ w["W_enc"] + w["b_enc"]
    arch = cfg["architecture"]
    if arch == "jumprelu":
        return np.maximum(pre, 0) * (pre > w["threshold"])
    if arch == "standard":
        return np.maximum(pre, 0)
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * np.linalg.norm(w["W_dec"], axis=1)
    return topk_dense(pre, cfg["k"])


def topk_dense(pre: np.ndarray, k: int) -> np.ndarray:
    keep = np.argsort(-pre, axis=1)[:, :k]
    out = np.zeros_like(pre)
    np.put_along_axis(out, keep, np.maximum(np.take_along_axis(pre, keep, axis=1), 0), axis=1)
    return out


def write_sparsify(directory: Path, rng: np.random.Generator, dtype=np.float32, **fields: Any) -> dict:
    """A sparsify directory: cfg.json (SparseCoderConfig's fields and d_in) + sae.safetensors."""
    w = make_weights(rng, D_IN, N, dtype)
    tensors = {"encoder.weight": w["W_enc_t"], "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": N,
           "k": K, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN, **fields}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(directory / "sae.safetensors"))
    return tensors


def sparsify_codes(t: dict[str, np.ndarray], X: np.ndarray, k: int = K) -> np.ndarray:
    """sparsify's encode in float64: relu((x - b_dec) @ encoder.weight.T + encoder.bias), top k."""
    t = {name: a.astype(np.float64) for name, a in t.items()}
    return topk_dense(np.maximum((X - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"], 0), k)


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_topk_round_trip_gives_identical_codes(tmp_path, rng, fmt, dtype):
    sae, X = model(rng, dtype, normalize_decoder=False), data(rng, dtype)
    sae.save(tmp_path / "ksae")
    assert ksae.export_model(tmp_path / "ksae", tmp_path / fmt, fmt) == tmp_path / fmt
    assert detect_format(tmp_path / fmt) == fmt
    back = ksae.load(tmp_path / fmt)
    assert back.get_params()["k"] == K and back.get_params()["dtype"] == dtype
    assert back.get_params()["normalize_decoder"] == (fmt == "saelens")  # SAELens has no such field
    for name in ("W_enc_", "b_enc_", "W_dec_", "b_dec_"):
        assert np.array_equal(getattr(back, name), getattr(sae, name))
    a, b = sae.encode(X), back.encode(X)
    assert np.array_equal(a.values, b.values) and np.array_equal(a.indices, b.indices)


@pytest.mark.parametrize("sparsity", ["jumprelu", "batchtopk", "l1"])
def test_saelens_round_trip_of_other_sparsities(tmp_path, rng, sparsity):
    sae, X = model(rng, sparsity=sparsity, max_k=None if sparsity == "l1" else N), data(rng)
    if sparsity == "batchtopk":
        sae.state_.threshold = 0.2
    ksae.export_model(sae, tmp_path / "out", "saelens")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == {"l1": "standard"}.get(sparsity, "jumprelu")
    back = ksae.load(tmp_path / "out")
    assert back.get_params()["k"] == K  # from the metadata ksae writes
    # the same latents; values to rounding (jumprelu computes pre - t + t; log(exp(log t)))
    assert np.array_equal(dense(back, X) > 0, dense(sae, X) > 0)
    assert np.abs(dense(back, X) - dense(sae, X)).max() <= 1e-6


def test_batchtopk_threshold_keeps_ties_as_ksae_does(tmp_path, rng):
    # ksae keeps a candidate equal to the threshold; SAELens's jumprelu keeps pre > t, so the
    # exported threshold is one float below.
    sae = model(rng, sparsity="batchtopk", max_k=N)
    sae.state_.threshold = 0.25
    ksae.export_model(sae, tmp_path / "out", "saelens")
    from safetensors.numpy import load_file

    t = load_file(str(tmp_path / "out" / "sae_weights.safetensors"))["threshold"]
    assert t.dtype == np.float32 and (t < np.float32(0.25)).all()
    assert (t == np.nextafter(np.float32(0.25), np.float32(-1))).all()


def test_export_takes_an_estimator_a_state_and_a_run_directory(tmp_path, rng):
    sae = model(rng)
    ksae.export_model(sae.state_, tmp_path / "from_state", "sparsify")
    run = tmp_path / "run"
    sae.save(run / "model")
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"metadata": {"model": "gpt2", "layer": 3}}))
    (run / "config.json").write_text(json.dumps({"data": {"dataset": "store", "path": str(store)}}))
    ksae.export_model(run, tmp_path / "from_run", "saelens")
    metadata = json.loads((tmp_path / "from_run" / "cfg.json").read_text())["metadata"]
    assert metadata["model_name"] == "gpt2" and metadata["hook_name"] == "3"
    assert metadata["sae_lens_version"].startswith("6.")
    assert np.array_equal(ksae.load(tmp_path / "from_state").W_dec_, sae.W_dec_)


def test_saelens_config_has_every_field_load_from_disk_needs(tmp_path, rng):
    ksae.export_model(model(rng), tmp_path / "out", "saelens")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert {"d_in": D_IN, "d_sae": N, "architecture": "topk", "k": K, "dtype": "float32",
            "apply_b_dec_to_input": True, "normalize_activations": "none",
            "rescale_acts_by_decoder_norm": False}.items() <= cfg.items()


# ------------------------------------------------------------------------------ fixtures in
@pytest.mark.parametrize("fields", [{}, {"rescale_acts_by_decoder_norm": True},
                                    {"apply_b_dec_to_input": False},
                                    {"rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False}])
def test_saelens_topk_fixture_loads_with_its_codes(tmp_path, rng, fields):
    w, X = saelens_weights(rng), data(rng)
    directory = write_saelens(tmp_path / "sl", w, **fields)
    cfg = json.loads((directory / "cfg.json").read_text())
    sae = ksae.load(directory)
    assert np.abs(dense(sae, X) - saelens_codes(cfg, w, X)).max() <= 1e-5
    _, config = read_saelens(directory)
    assert len(config["notes"]) == len(fields) and config["source"]["metadata"]["hook_name"]


def test_saelens_jumprelu_and_standard_fixtures_load(tmp_path, rng):
    X = data(rng)
    w = {**saelens_weights(rng), "threshold": rng.uniform(0.0, 0.4, N).astype(np.float32)}
    w["threshold"][:3] = [0.0, -0.1, 0.0]  # plain relu latents
    directory = write_saelens(tmp_path / "jr", w, architecture="jumprelu")
    sae = ksae.load(directory)
    assert sae.get_params()["sparsity"] == "jumprelu" and sae.get_params()["max_k"] == N
    assert np.abs(dense(sae, X) - saelens_codes({"architecture": "jumprelu"}, w, X)).max() <= 1e-5
    del w["threshold"]
    sae = ksae.load(write_saelens(tmp_path / "std", w, architecture="standard"))
    assert sae.get_params()["sparsity"] == "l1"
    assert np.abs(dense(sae, X) - saelens_codes({"architecture": "standard"}, w, X)).max() <= 1e-5


@pytest.mark.parametrize("fields", [{}, {"multi_topk": True}])
def test_sparsify_fixture_loads_with_its_codes(tmp_path, rng, fields):
    t, X = write_sparsify(tmp_path / "sp", rng, **fields), data(rng)
    sae = ksae.load(tmp_path / "sp")
    assert np.abs(dense(sae, X) - sparsify_codes(t, X)).max() <= 1e-5
    assert len(read_sparsify(tmp_path / "sp")[1]["notes"]) == int(bool(fields.get("multi_topk")))


def test_sparsify_expansion_factor(tmp_path, rng):
    # num_latents 0 means d_in * expansion_factor, as sparsify's SparseCoder reads it
    directory = tmp_path / "sp"
    write_sparsify(directory, rng)
    cfg = json.loads((directory / "cfg.json").read_text())
    (directory / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 0, "expansion_factor": 2}))
    with pytest.raises(ValueError, match=r"sae\.safetensors: tensor encoder\.weight has shape \(40, 12\), expected \(24, 12\)"):
        ksae.load(directory)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_weights_load_as_float32(tmp_path, rng, half):
    t = write_sparsify(tmp_path / "sp", rng)
    stored = {name: a.astype(np.float16) for name, a in t.items()}
    if half == "bfloat16":  # safetensors.numpy cannot write bfloat16: write the file by hand
        _write_bfloat16(tmp_path / "sp" / "sae.safetensors", t)
        stored = {name: _round_to_bfloat16(a) for name, a in t.items()}
    else:
        save_file(stored, str(tmp_path / "sp" / "sae.safetensors"))
    sae = ksae.load(tmp_path / "sp")
    assert sae.get_params()["dtype"] == "float32"
    assert np.array_equal(sae.W_dec_, stored["W_dec"].astype(np.float32))


def _round_to_bfloat16(a: np.ndarray) -> np.ndarray:
    bits = a.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def _write_bfloat16(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, chunks, offset = {}, [], 0
    for name, a in tensors.items():
        raw = (_round_to_bfloat16(a).view(np.uint32) >> np.uint32(16)).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(("params", "fmt", "match"), [
    ({"sparsity": "kl", "activation": "sigmoid"}, "saelens", "sparsity: saelens has no model equal to ksae's 'kl'"),
    ({"sparsity": "l1"}, "sparsify", "sparsity: sparsify has no model equal to ksae's 'l1'"),
    ({"sparsity": "batchtopk", "max_k": N}, "sparsify", "sparsify has no model equal"),
    ({"activation": "linear"}, "saelens", "activation: saelens encodes with relu; this model uses 'linear'"),
    ({"activation": "tanh"}, "sparsify", "activation: sparsify encodes with relu"),
    ({"output_activation": "sigmoid"}, "saelens", "output_activation: saelens decodes linearly"),
    ({"inference_k_scale": 2.0}, "sparsify", "inference_k_scale: sparsify keeps exactly the k"),
    ({"sparsity": "batchtopk"}, "saelens", r"max_k: .* at most max_k=16 per sample; set_params\(max_k=40\)"),
    ({"sparsity": "jumprelu", "max_k": 10}, "saelens", "max_k: SAELens's jumprelu keeps every latent"),
])
def test_export_refuses_what_the_format_cannot_represent(tmp_path, rng, params, fmt, match):
    with pytest.raises(ValueError, match=match):
        ksae.export_model(model(rng, **params), tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_directory_and_a_bad_format(tmp_path, rng):
    sae = model(rng)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="out_dir: .* is not empty"):
        ksae.export_model(sae, tmp_path / "out", "saelens")
    ksae.export_model(sae, tmp_path / "out", "saelens", overwrite=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="format: expected one of 'saelens', 'sparsify', got 'torch'"):
        ksae.export_model(sae, tmp_path / "other", "torch")
    with pytest.raises(TypeError, match="model: expected a SparseAutoencoder"):
        ksae.export_model(42, tmp_path / "other")
    with pytest.raises(ksae.NotFittedError):
        ksae.export_model(ksae.SparseAutoencoder(), tmp_path / "other")


@pytest.mark.parametrize(("fields", "match"), [
    ({"architecture": "gated"}, "SAELens architecture 'gated' has no ksae equivalent"),
    ({"architecture": "batchtopk"}, "SAELens architecture 'batchtopk' has no ksae equivalent"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations is 'layer_norm'; ksae reads only 'none'"),
    ({"normalize_activations": "expected_average_only_in"}, "fold_activation_norm_scaling_factor"),
    ({"k": None}, "a topk model without the field 'k' .*k=100"),
    ({"k": 0}, r"field 'k' should be in \[1, d_sae=40\]"),
    ({"k": 2.5}, "field 'k' should be int"),
    ({"d_sae": "40"}, "field 'd_sae' should be int"),
    ({"finetuning_scaling_factor": True}, "finetuning_scaling_factor is set"),
])
def test_read_saelens_refuses(tmp_path, rng, fields, match):
    if fields.get("k", 1) is None:
        directory = write_saelens(tmp_path / "sl", saelens_weights(rng))
        cfg = json.loads((directory / "cfg.json").read_text())
        del cfg["k"]
        (directory / "cfg.json").write_text(json.dumps(cfg))
    else:
        directory = write_saelens(tmp_path / "sl", saelens_weights(rng), **fields)
    with pytest.raises(ValueError, match=match):
        ksae.load(directory)


def test_read_saelens_refuses_damaged_weights(tmp_path, rng):
    w = saelens_weights(rng)
    w["W_dec"][3] = 0
    directory = write_saelens(tmp_path / "zero", w, rescale_acts_by_decoder_norm=True)
    with pytest.raises(ValueError, match=r"decoder rows of zero norm \(latents \[3\]"):
        ksae.load(directory)
    w["W_dec"][3, 0] = np.nan
    with pytest.raises(ValueError, match=r"nan/sae_weights\.safetensors: tensor W_dec holds NaN"):
        ksae.load(write_saelens(tmp_path / "nan", w))
    bad = {**saelens_weights(rng), "b_enc": np.zeros(N + 1, np.float32)}
    with pytest.raises(ValueError, match=r"tensor b_enc has shape \(41,\), expected \(40,\)"):
        ksae.load(write_saelens(tmp_path / "shape", bad))
    extra = {**saelens_weights(rng), "threshold": np.zeros(N, np.float32)}
    with pytest.raises(ValueError, match=r"expected tensors \['W_dec', 'W_enc', 'b_dec', 'b_enc'\], found"):
        ksae.load(write_saelens(tmp_path / "extra", extra))
    ints = {**saelens_weights(rng), "b_dec": np.zeros(D_IN, np.int32)}
    with pytest.raises(ValueError, match="tensor b_dec has dtype int32, expected a float type"):
        ksae.load(write_saelens(tmp_path / "ints", ints))
    (tmp_path / "ints" / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ksae.load(tmp_path / "ints")
    (tmp_path / "ints" / "cfg.json").write_text("{")
    with pytest.raises(ValueError, match="cfg.json: not valid JSON"):
        ksae.load(tmp_path / "ints")


@pytest.mark.parametrize(("fields", "match"), [
    ({"activation": "groupmax"}, "activation 'groupmax'; ksae reads sparsify's 'topk' only"),
    ({"skip_connection": True}, "skip_connection is true: a linear skip connection"),
    ({"transcode": True}, "transcode is true: a transcoder"),
    ({"k": N + 1}, "expected d_in >= 1, num_latents >= 1 and 1 <= k <= num_latents"),
    ({"d_in": None}, "field 'd_in' should be int"),
])
def test_read_sparsify_refuses(tmp_path, rng, fields, match):
    write_sparsify(tmp_path / "sp", rng, **fields)
    with pytest.raises(ValueError, match=match):
        ksae.load(tmp_path / "sp")


def test_read_sparsify_needs_the_decoder(tmp_path, rng):
    t = write_sparsify(tmp_path / "sp", rng)
    del t["W_dec"]
    save_file(t, str(tmp_path / "sp" / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"sae\.safetensors: expected tensors .* found"):
        ksae.load(tmp_path / "sp")


def test_detect_format(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="holds no saved model"):
        detect_format(tmp_path)
    model(rng).save(tmp_path / "k")
    assert detect_format(tmp_path / "k") == "ksae"
    write_sparsify(tmp_path / "both", rng)
    assert detect_format(tmp_path / "both") == "sparsify"
    save_file(saelens_weights(rng), str(tmp_path / "both" / "sae_weights.safetensors"))
    assert detect_format(tmp_path / "both") == "sparsify"  # cfg.json has no d_sae
    with pytest.raises(FileNotFoundError, match="config.json' not found"):
        ksae.load(tmp_path)  # neither format: ksae's own message


def test_import_ksae_does_not_import_torch():
    code = "import sys, ksae, ksae.interchange, ksae.cli.export; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------ command line
def _usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("ksae export: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_export(tmp_path, rng, capsys):
    sae = model(rng)
    sae.save(tmp_path / "m")
    assert main(["export", "--format", "sparsify", str(tmp_path / "m"), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert np.array_equal(ksae.load(tmp_path / "out").W_enc_, sae.W_enc_)
    line = _usage_error(capsys, ["export", "--format", "saelens", str(tmp_path / "m"), str(tmp_path / "out")])
    assert "OUT_DIR: " in line and "is not empty (pass --force" in line
    assert main(["export", "--format", "saelens", "--force", str(tmp_path / "m"), str(tmp_path / "out")]) == 0
    assert detect_format(tmp_path / "out") == "saelens"  # cfg.json now SAELens's


def test_cli_export_errors(tmp_path, rng, capsys):
    model(rng, sparsity="kl", activation="sigmoid").save(tmp_path / "kl")
    line = _usage_error(capsys, ["export", "--format", "saelens", str(tmp_path / "kl"), str(tmp_path / "o")])
    assert "sparsity: saelens has no model equal to ksae's 'kl'" in line
    line = _usage_error(capsys, ["export", "--format", "saelens", str(tmp_path / "none"), str(tmp_path / "o")])
    assert "MODEL_DIR: " in line and "is not a directory" in line
    line = _usage_error(capsys, ["export", "--format", "saelens", str(tmp_path), str(tmp_path / "o")])
    assert "not found" in line
    with pytest.raises(SystemExit):
        main(["export", "--format", "onnx", str(tmp_path / "kl"), str(tmp_path / "o")])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
