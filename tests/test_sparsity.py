"""The sparsity mechanisms beyond top-k: relu codes with an L1 penalty (``sparsity="l1"``),
sigmoid codes with a KL-divergence penalty (``sparsity="kl"``). Their gradients are checked by
finite differences in test_gradients.py; here: the penalties against the float64 reference,
what training with them does, and their validation."""

from __future__ import annotations

import numpy as np
import pytest

import ksae
from ksae import reference as ref
from ksae import sparsity

from conftest import DTYPES, rel_err, tol


@pytest.fixture(scope="module")
def data():
    return ksae.make_sparse_dictionary(n_samples=1500, d_in=16, n_components=32, n_active=3,
                                       random_state=0).X


def sparse_code(rng, batch, n_latents, width, dtype, low=0.0):
    """A random code: per row `width` distinct latents with values in (low, 1)."""
    indices = np.argsort(rng.random((batch, n_latents)), axis=1)[:, :width]
    values = rng.uniform(low, 1, (batch, width))
    return values.astype(dtype), indices.astype(np.int64)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("width", [3, 20])
def test_l1_penalty_matches_reference(rng, dtype, width):
    values, indices = sparse_code(rng, 7, 20, width, dtype, low=-1.0)
    loss, grad = sparsity.l1_penalty(values, 0.3)
    Z = ref.densify(values.astype(np.float64), indices, 20)
    want_loss, want_grad = ref.l1_penalty(Z, 0.3)
    assert grad.dtype == dtype and grad.shape == values.shape
    assert loss == pytest.approx(want_loss, rel=tol(dtype))
    assert rel_err(grad, np.take_along_axis(want_grad, indices, axis=1)) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("width", [3, 20])
def test_kl_penalty_matches_reference(rng, dtype, width):
    # Latents a row's code omits count as 0 in the batch mean (width 3 of 20: most of them).
    values, indices = sparse_code(rng, 40, 20, width, dtype, low=0.05)
    loss, grad = sparsity.kl_penalty(values, indices, 20, 0.1, 0.3)
    Z = ref.densify(values.astype(np.float64), indices, 20)
    want_loss, want_grad = ref.kl_penalty(Z, 0.1, 0.3)
    assert grad.dtype == dtype and grad.shape == values.shape
    assert loss == pytest.approx(want_loss, rel=tol(dtype))
    assert rel_err(grad, np.take_along_axis(want_grad, indices, axis=1)) < tol(dtype)


def test_kl_penalty_is_zero_at_the_target_and_finite_when_saturated():
    indices = np.tile(np.arange(4), (5, 1))
    loss, grad = sparsity.kl_penalty(np.full((5, 4), 0.2), indices, 4, 0.2, 1.0)
    assert loss == pytest.approx(0.0, abs=1e-15) and np.allclose(grad, 0.0, atol=1e-12)
    values = np.ones((5, 4), dtype=np.float32)  # a latent saturated on the whole batch
    loss, grad = sparsity.kl_penalty(values, indices, 4, 0.2, 1.0)
    assert np.isfinite(loss) and np.all(np.isfinite(grad)) and np.all(grad > 0)


def fit_dense(X, sparsity_name, **options):
    activation = "sigmoid" if sparsity_name == "kl" else "relu"
    sae = ksae.SparseAutoencoder(n_latents=48, sparsity=sparsity_name, activation=activation,
                                 random_state=0, n_threads=1)
    return sae.fit(X, epochs=4, batch_size=100, lr=1e-2, **options)


def test_l1_codes_are_dense_width_and_the_penalty_makes_them_sparser(data):
    weak = fit_dense(data, "l1", l1_coef=0.0)
    strong = fit_dense(data, "l1", l1_coef=0.03)
    values, indices = strong.encode(data[:10])
    assert values.shape == indices.shape == (10, 48)  # every latent: a dense code
    np.testing.assert_array_equal(np.sort(indices, axis=1), np.tile(np.arange(48), (10, 1)))
    assert np.all(values >= 0) and np.all(np.diff(values, axis=1) <= 0)
    Z = strong.transform(data)
    assert strong.history_["l0"][-1] == pytest.approx(np.count_nonzero(Z) / len(data), rel=0.2)
    assert strong.history_["l0"][-1] < 0.6 * weak.history_["l0"][-1]
    assert strong.history_["sparsity_loss"][-1] > 0 and weak.history_["sparsity_loss"] == [0.0] * 4
    assert strong.score(data) > 0.6  # still reconstructs


def test_kl_penalty_pulls_the_mean_activation_toward_the_target(data):
    free = fit_dense(data, "kl", kl_coef=0.0)
    pulled = fit_dense(data, "kl", kl_coef=0.03, kl_target=0.05)
    mean_free = free.transform(data).mean()
    mean_pulled = pulled.transform(data).mean()
    assert abs(mean_pulled - 0.05) < 0.5 * abs(mean_free - 0.05)
    assert pulled.history_["sparsity_loss"][-1] < pulled.history_["sparsity_loss"][0]


def test_kl_l0_counts_activations_above_one_half(data):
    # Every sigmoid activation is non-zero; L0 counts those above 0.5 (pre-activation > 0).
    sae = fit_dense(data, "kl", validation_data=data[:200])
    Z = sae.transform(data[:200])
    assert np.all(Z > 0)
    assert sae.history_["val_l0"][-1] == pytest.approx((Z > 0.5).sum(axis=1).mean())
    assert sae.history_["val_l0"][-1] < 48


def test_dense_sparsities_ignore_k_and_validate_their_activation():
    ksae.SparseAutoencoder(n_latents=8, sparsity="l1").fit(np.eye(8, dtype=np.float32), epochs=1)
    with pytest.raises(ValueError, match=r"^activation: kl needs 'sigmoid'.*got 'relu'"):
        ksae.ModelConfig(sparsity="kl")
    with pytest.raises(ValueError, match=r"^activation: l1 needs 'relu'.*got 'tanh'"):
        ksae.ModelConfig(sparsity="l1", activation="tanh")
    with pytest.raises(ValueError, match="^kl_target: expected 0 < kl_target < 1, got 1.0"):
        ksae.TrainConfig(kl_target=1.0)
    with pytest.raises(ValueError, match="^l1_coef: expected a finite number >= 0"):
        ksae.TrainConfig(l1_coef=-1)
    with pytest.raises(ValueError, match="^auxk_coef: AuxK revives dead latents.*'l1'"):
        ksae.SparseAutoencoder(n_latents=8, sparsity="l1").fit(
            np.eye(8, dtype=np.float32), epochs=2, auxk_coef=0.1, dead_after_samples=1)
