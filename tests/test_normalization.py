"""normalize_activations="mean_norm": train on rows scaled to mean norm sqrt(d_in), then fold
the scale into the weights so the fitted model takes raw rows."""

from __future__ import annotations

import numpy as np
import pytest

import ksae
from ksae.normalization import mean_norm_scale


def _rows(n: int = 1200, d: int = 24, scale: float = 400.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((48, d))
    codes = rng.exponential(1.0, (n, 48)) * (rng.random((n, 48)) < 0.1)
    return (scale * (codes @ atoms + 0.05 * rng.standard_normal((n, d)))).astype(np.float32)


def test_scale_gives_mean_norm_sqrt_d():
    X = _rows()
    s = mean_norm_scale(X)
    assert np.linalg.norm(X.astype(np.float64) * s, axis=1).mean() == pytest.approx(np.sqrt(24), rel=1e-9)


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "jumprelu"])
def test_folded_model_on_raw_rows_is_the_scaled_model_divided_by_the_scale(sparsity):
    X = _rows()
    s = np.float32(mean_norm_scale(X))
    kwargs = dict(n_latents=64, k=6, sparsity=sparsity, random_state=3, b_dec_init="mean")
    folded = ksae.SparseAutoencoder(**kwargs).fit(X, epochs=3, batch_size=100,
                                                  normalize_activations="mean_norm")
    plain = ksae.SparseAutoencoder(**kwargs).fit(X * s, epochs=3, batch_size=100)
    np.testing.assert_array_equal(folded.W_enc_, plain.W_enc_)  # the same training, bit for bit
    np.testing.assert_array_equal(folded.W_dec_, plain.W_dec_)
    got, want = folded.transform(X), plain.transform(X * s) / s
    off = ~np.isclose(got, want, rtol=2e-5, atol=1e-6 * float(want.max()))
    assert off.sum() <= 1e-3 * np.count_nonzero(want)  # a latent at a threshold may round across it
    same = ~off.any(axis=1)
    np.testing.assert_allclose(folded.reconstruct(X[same]), plain.reconstruct(X[same] * s) / s,
                               rtol=1e-4, atol=1e-4 * float(np.abs(X).max()))


def test_normalization_makes_training_independent_of_the_input_scale():
    X = _rows(scale=1.0)
    fits = [ksae.SparseAutoencoder(n_latents=64, k=6, random_state=1).fit(
        X * c, epochs=4, batch_size=100, normalize_activations="mean_norm") for c in (1.0, 1000.0)]
    np.testing.assert_allclose(fits[0].W_dec_, fits[1].W_dec_, atol=2e-4)
    fvu = [1 - ksae.fraction_of_variance_explained(X * c, f.reconstruct(X * c)) for f, c in zip(fits, (1.0, 1000.0))]
    assert fvu[0] == pytest.approx(fvu[1], rel=1e-3)


def test_resume_with_normalization_equals_the_uninterrupted_run(tmp_path):
    X = _rows()
    kwargs = dict(n_latents=64, k=6, random_state=2)
    whole = ksae.SparseAutoencoder(**kwargs).fit(X, epochs=4, batch_size=100, normalize_activations="mean_norm")
    ksae.SparseAutoencoder(**kwargs).fit(X, epochs=2, batch_size=100, normalize_activations="mean_norm",
                                         checkpoint=tmp_path / "ckpt")
    resumed = ksae.resume(tmp_path / "ckpt", X, epochs=4)
    for name in ("W_enc_", "b_enc_", "W_dec_", "b_dec_"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name))


def test_saved_model_takes_raw_rows(tmp_path):
    X = _rows()
    sae = ksae.SparseAutoencoder(n_latents=64, k=6, random_state=0).fit(
        X, epochs=2, batch_size=100, normalize_activations="mean_norm")
    loaded = ksae.load(sae.save(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.reconstruct(X), sae.reconstruct(X))
    assert 1 - ksae.fraction_of_variance_explained(X, loaded.reconstruct(X)) < 0.9


@pytest.mark.parametrize("kwargs", [dict(activation="tanh"), dict(output_activation="sigmoid")])
def test_a_model_the_scale_cannot_fold_into_is_refused(kwargs):
    with pytest.raises(ValueError, match="normalize_activations: 'mean_norm' folds"):
        ksae.SparseAutoencoder(n_latents=16, k=2, **kwargs).fit(
            _rows(200), epochs=1, normalize_activations="mean_norm")


def test_unknown_normalization_is_named():
    with pytest.raises(ValueError, match="normalize_activations"):
        ksae.SparseAutoencoder(n_latents=16, k=2).fit(_rows(200), epochs=1, normalize_activations="l2")
