"""ksae against the real SAELens and sparsify (each test skips where its library is not
installed): models exported by ksae load in them with the same codes, and models saved by
them load in ksae with the same codes (max abs difference <= 1e-5 in float32)."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType

import ksae
import numpy as np
import pytest
from conftest import make_weights
from ksae.cli import main
from ksae.config import ModelConfig
from ksae.state import ModelState

torch = pytest.importorskip("torch")

D_IN, N, K = 32, 128, 8
TOL = 1e-5
"""Largest absolute code difference where ksae's weights go to a library unchanged; where a
conversion folds a rescaling into the weights (rounding once more), relative to the largest
code (``folded``)."""


def import_quietly(name: str) -> ModuleType:
    """``pytest.importorskip(name)``, its import-time deprecation warnings silenced (the suite
    turns warnings into errors; transformer_lens warns on import)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(name)


@pytest.fixture
def sae_lens() -> ModuleType:
    return import_quietly("sae_lens")


@pytest.fixture
def sparsify() -> ModuleType:
    return import_quietly("sparsify")


@pytest.fixture
def X(rng) -> np.ndarray:
    return rng.standard_normal((256, D_IN)).astype(np.float32)


def ksae_model(rng: np.random.Generator, **params) -> ksae.SparseAutoencoder:
    cfg = ModelConfig(**{"n_latents": N, "k": K, **params})
    weights = make_weights(rng, D_IN, N, np.float32)
    if cfg.sparsity == "jumprelu":
        weights["log_threshold"] = np.log(rng.uniform(0.05, 0.5, N)).astype(np.float32)
    return ksae.SparseAutoencoder.from_state(ModelState(cfg, weights))


def codes(sae: ksae.SparseAutoencoder, X: np.ndarray) -> np.ndarray:
    return np.asarray(sae.transform(X), dtype=np.float64)


def folded(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Largest code difference relative to the largest code (at least 1)."""
    return float(np.abs(ours - theirs).max() / max(1.0, np.abs(theirs).max()))


def torch_codes(acts) -> np.ndarray:
    return acts.detach().to(torch.float64).numpy()


def randomize(module, rng: np.random.Generator) -> None:
    """Give a library's SAE nonzero biases and decoder rows of unequal norms."""
    with torch.no_grad():
        module.b_dec.copy_(torch.from_numpy(0.1 * rng.standard_normal(D_IN).astype(np.float32)))
        bias = module.encoder.bias if hasattr(module, "encoder") else module.b_enc
        bias.copy_(torch.from_numpy(0.1 * rng.standard_normal(N).astype(np.float32)))
        module.W_dec.mul_(torch.from_numpy(rng.uniform(0.5, 2.0, (N, 1)).astype(np.float32)))


# ------------------------------------------------------------------------------ SAELens
@pytest.mark.parametrize("params", [{}, {"sparsity": "jumprelu", "max_k": N},
                                    {"sparsity": "batchtopk", "max_k": N}, {"sparsity": "l1"}])
def test_ksae_export_loads_in_saelens(tmp_path, rng, X, sae_lens, params):
    sae = ksae_model(rng, **params)
    if sae.get_params()["sparsity"] == "batchtopk":
        sae.state_.threshold = 0.3
    sae.save(tmp_path / "ksae")
    assert main(["export", "--format", "saelens", str(tmp_path / "ksae"), str(tmp_path / "sl")]) == 0
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sl", device="cpu")
    assert theirs.cfg.d_sae == N and theirs.cfg.d_in == D_IN
    if not params:
        assert theirs.cfg.architecture() == "topk" and theirs.cfg.k == K
    with torch.no_grad():
        acts = theirs.encode(torch.from_numpy(X))
        recon = theirs.decode(acts)
    assert np.abs(torch_codes(acts) - codes(sae, X)).max() <= TOL
    assert np.abs(torch_codes(recon) - sae.reconstruct(X)).max() <= TOL


def _saelens_topk(sae_lens, rng, **fields):
    theirs = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=N, k=K, **fields))
    randomize(theirs, rng)
    return theirs


@pytest.mark.parametrize("fields", [{}, {"rescale_acts_by_decoder_norm": True},
                                    {"apply_b_dec_to_input": False}])
def test_saelens_topk_loads_in_ksae(tmp_path, rng, X, sae_lens, fields):
    theirs = _saelens_topk(sae_lens, rng, **fields)
    theirs.save_model(tmp_path / "sl")
    ours = ksae.load(tmp_path / "sl")
    assert ours.get_params()["sparsity"] == "topk" and ours.get_params()["k"] == K
    with torch.no_grad():
        acts = theirs.encode(torch.from_numpy(X))
        recon = theirs.decode(acts)
    assert folded(codes(ours, X), torch_codes(acts)) <= TOL
    assert folded(ours.reconstruct(X), torch_codes(recon)) <= TOL


def test_saelens_training_topk_inference_save_loads_in_ksae(tmp_path, rng, X, sae_lens):
    cfg = sae_lens.TopKTrainingSAEConfig(d_in=D_IN, d_sae=N, k=K)  # rescales by decoder norm
    theirs = sae_lens.TopKTrainingSAE(cfg)
    randomize(theirs, rng)
    theirs.save_inference_model(tmp_path / "sl")
    with torch.no_grad():
        acts = theirs.encode(torch.from_numpy(X))
    assert folded(codes(ksae.load(tmp_path / "sl"), X), torch_codes(acts)) <= TOL


@pytest.mark.parametrize("architecture", ["jumprelu", "standard"])
def test_saelens_jumprelu_and_standard_load_in_ksae(tmp_path, rng, X, sae_lens, architecture):
    if architecture == "jumprelu":
        theirs = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=N))
        with torch.no_grad():
            theirs.threshold.copy_(torch.from_numpy(rng.uniform(0.0, 0.3, N).astype(np.float32)))
    else:
        theirs = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=N))
    randomize(theirs, rng)
    theirs.save_model(tmp_path / "sl")
    ours = ksae.load(tmp_path / "sl")
    with torch.no_grad():
        acts = theirs.encode(torch.from_numpy(X))
    assert np.abs(codes(ours, X) - torch_codes(acts)).max() <= TOL


def test_saelens_batchtopk_inference_save_loads_in_ksae(tmp_path, rng, X, sae_lens):
    cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=N, k=K)
    theirs = sae_lens.BatchTopKTrainingSAE(cfg)
    randomize(theirs, rng)
    theirs.topk_threshold.fill_(0.2)
    theirs.save_inference_model(tmp_path / "sl")  # saved as jumprelu, threshold 0.2 everywhere
    inference = sae_lens.SAE.load_from_disk(tmp_path / "sl", device="cpu")
    ours = ksae.load(tmp_path / "sl")
    assert ours.get_params()["sparsity"] == "jumprelu" and ours.get_params()["k"] == K
    with torch.no_grad():
        acts = inference.encode(torch.from_numpy(X))
    assert np.abs(codes(ours, X) - torch_codes(acts)).max() <= TOL


# ------------------------------------------------------------------------------ sparsify
def _sparsify_dense(out) -> np.ndarray:
    dense = torch.zeros(out.top_acts.shape[0], N, dtype=torch.float64)
    dense.scatter_(1, out.top_indices, out.top_acts.detach().to(torch.float64))
    return dense.numpy()


def test_ksae_export_loads_in_sparsify(tmp_path, rng, X, sparsify):
    sae = ksae_model(rng)
    sae.save(tmp_path / "ksae")
    assert main(["export", "--format", "sparsify", str(tmp_path / "ksae"), str(tmp_path / "sp")]) == 0
    theirs = sparsify.Sae.load_from_disk(tmp_path / "sp", device="cpu")
    assert theirs.num_latents == N and theirs.cfg.k == K
    with torch.no_grad():
        out = theirs.encode(torch.from_numpy(X))
        recon = theirs.decode(out.top_acts, out.top_indices)
    assert np.abs(_sparsify_dense(out) - codes(sae, X)).max() <= TOL
    assert np.abs(torch_codes(recon) - sae.reconstruct(X)).max() <= TOL


@pytest.mark.parametrize("fields", [{"num_latents": N}, {"expansion_factor": N // D_IN, "multi_topk": True}])
def test_sparsify_sae_loads_in_ksae(tmp_path, rng, X, sparsify, fields):
    torch.manual_seed(0)
    theirs = sparsify.Sae(D_IN, sparsify.SaeConfig(k=K, **fields), device="cpu")
    randomize(theirs, rng)
    theirs.save_to_disk(tmp_path / "sp")
    ours = ksae.load(tmp_path / "sp")
    assert ours.get_params()["k"] == K and ours.get_params()["n_latents"] == N
    with torch.no_grad():
        out = theirs.encode(torch.from_numpy(X))
        recon = theirs.decode(out.top_acts, out.top_indices)
    assert np.abs(codes(ours, X) - _sparsify_dense(out)).max() <= TOL
    assert np.abs(ours.reconstruct(X) - torch_codes(recon)).max() <= TOL


def test_sparsify_bfloat16_sae_loads_in_ksae(tmp_path, rng, X, sparsify):
    theirs = sparsify.Sae(D_IN, sparsify.SaeConfig(k=K, num_latents=N), device="cpu", dtype=torch.bfloat16)
    randomize(theirs, rng)
    theirs.save_to_disk(tmp_path / "sp")
    ours = ksae.load(tmp_path / "sp")
    assert ours.get_params()["dtype"] == "float32"
    assert np.array_equal(ours.W_dec_, theirs.W_dec.detach().float().numpy())
    as32 = sparsify.Sae.load_from_disk(Path(tmp_path / "sp"), device="cpu").to(torch.float32)
    with torch.no_grad():
        out = as32.encode(torch.from_numpy(X))
    assert np.abs(codes(ours, X) - _sparsify_dense(out)).max() <= TOL
