"""NaN and infinity in a model's weights or in a code are refused with a ValueError that
names the tensor (or argument) and where, by every read: encode, transform, reconstruct,
score, decode and inverse_transform (issue 27, item 5)."""

from __future__ import annotations

import numpy as np
import pytest

import ksae

SPARSITIES = [{"sparsity": "topk"}, {"sparsity": "jumprelu"}, {"sparsity": "batchtopk"},
              {"sparsity": "l1"}, {"sparsity": "topk", "activation": "tanh"}]
SPARSITY_IDS = ["topk", "jumprelu", "batchtopk", "l1", "topk-tanh"]
# The public weight attributes, where each gets its bad entry, and the name the error gives.
WEIGHTS = [("W_enc_", (3, 5), "W_enc"), ("b_enc_", (5,), "b_enc"), ("W_dec_", (5, 3), "W_dec"),
           ("b_dec_", (3,), "b_dec")]
BAD = [np.nan, np.inf, -np.inf]
READS = {
    "encode": lambda sae, X: sae.encode(X),
    "transform": lambda sae, X: sae.transform(X),
    "reconstruct": lambda sae, X: sae.reconstruct(X),
    "score": lambda sae, X: sae.score(X),
    "decode": lambda sae, X: sae.decode(np.ones((2, 4), np.float32), np.arange(8).reshape(2, 4)),
    "inverse_transform": lambda sae, X: sae.inverse_transform(np.ones((2, 30), np.float32)),
}


@pytest.fixture
def X(rng):
    return rng.standard_normal((16, 12)).astype(np.float32)


def fitted(X, **params):
    return ksae.SparseAutoencoder(n_latents=30, k=4, random_state=0, n_threads=1,
                                  **params).partial_fit(X)


@pytest.mark.parametrize("params", SPARSITIES, ids=SPARSITY_IDS)
@pytest.mark.parametrize("attribute,where,name", WEIGHTS, ids=[w[2] for w in WEIGHTS])
@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
def test_every_read_refuses_a_non_finite_weight(X, params, attribute, where, name, bad):
    sae = fitted(X, **params)
    sae.encode(X)  # the weights are checked, and found finite, at this version
    getattr(sae, attribute)[where] = bad
    for read in READS.values():
        with pytest.raises(ValueError, match=f"^{name} holds NaN or infinity"):
            read(sae, X)


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
def test_a_non_finite_threshold_is_refused(X, bad):
    sae = fitted(X, sparsity="jumprelu")
    sae.log_threshold_[7] = bad
    with pytest.raises(ValueError, match=r"^log_threshold holds NaN or infinity \(latent 7\)"):
        sae.encode(X)


def test_the_message_names_the_latent_and_feature(X):
    sae = fitted(X)
    sae.W_enc_[3, 5] = np.nan  # input feature 3 of latent 5
    with pytest.raises(ValueError, match=r"W_enc holds NaN or infinity \(latent 5, input feature 3\)"):
        sae.encode(X)


def test_reads_work_again_once_the_weights_are_finite(X):
    sae = fitted(X)
    want = sae.encode(X)
    old = sae.W_dec_[2, 1]
    sae.W_dec_[2, 1] = np.nan
    with pytest.raises(ValueError, match="W_dec"):
        sae.encode(X)
    sae.W_dec_[2, 1] = old
    np.testing.assert_array_equal(sae.encode(X).values, want.values)


@pytest.mark.parametrize("name", ["W_enc_t", "b_enc", "W_dec", "b_dec"])
def test_weights_changed_makes_any_in_place_edit_visible(X, name):
    sae = fitted(X)
    state = sae.state_
    sae.encode(X)
    state.params[name].reshape(-1)[4] = np.nan
    state.weights_changed()
    with pytest.raises(ValueError, match="holds NaN or infinity"):
        sae.encode(X)


def test_an_unannounced_nan_bias_shows_in_the_code(X):
    # The symptom (every row latents 0..k-1, value 0) written straight into the
    # state: the rows of zeros make the encode look at the weights again.
    sae = fitted(X)
    sae.encode(X)
    sae.state_.params["b_dec"][0] = np.nan
    with pytest.raises(ValueError, match=r"^b_dec holds NaN or infinity \(feature 0\)"):
        sae.encode(X)


def test_an_unannounced_nan_decoder_row_shows_in_the_decode(X):
    sae = fitted(X)
    values, indices = sae.encode(X)
    sae.state_.params["W_dec"][indices[0, 0], 2] = np.nan
    with pytest.raises(ValueError, match="^W_dec holds NaN or infinity"):
        sae.decode(values, indices)


def test_genuine_rows_of_zeros_are_not_an_error(X):
    sae = fitted(X)
    sae.b_enc_[:] = -1e3  # no latent is positive: every row's code is zeros
    sae.b_enc_[:4] = -2e3  # even with latents 0..3 last
    values, indices = sae.encode(X)
    assert not values.any() and not np.isin(indices, np.arange(4)).any()
    assert np.isfinite(sae.reconstruct(X)).all()


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decode_refuses_non_finite_values(X, bad, dtype):
    sae = fitted(X)
    values, indices = sae.encode(X)
    values = values.astype(dtype)
    values[3, 1] = bad
    with pytest.raises(ValueError, match=r"^values: row 3 holds NaN or infinity"):
        sae.decode(values, indices)


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
def test_inverse_transform_refuses_non_finite_codes(X, bad):
    sae = fitted(X)
    Z = sae.transform(X)
    Z[5, 0] = bad
    with pytest.raises(ValueError, match=r"^X: row 5 contains NaN or infinity"):
        sae.inverse_transform(Z)


def test_finite_training_never_trips_the_check(X):
    sae = fitted(X)
    for _ in range(5):
        sae.partial_fit(X)
        assert np.isfinite(sae.reconstruct(X)).all()
