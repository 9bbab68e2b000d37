"""The sparsity mechanisms beyond top-k: relu codes with an L1 penalty (``sparsity="l1"``),
sigmoid codes with a KL-divergence penalty (``sparsity="kl"``), JumpReLU's learned thresholds
(``sparsity="jumprelu"``). Their gradients are checked in test_gradients.py (finite
differences, and the thresholds' straight-through estimate against the reference); here: the
penalties and the estimate against the float64 reference, what training with them does,
saving, and validation."""

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


# ------------------------------------------------------------------------------ jumprelu
BANDWIDTH = 0.1


def jumprelu_case(rng, batch, n_latents, dtype):
    """Dense pre-activations, thresholds, dL/dz; entries kept off the kernel's band edges
    (|pre - theta| = bandwidth / 2) so float32 rounding cannot move one across."""
    threshold = rng.uniform(0.05, 0.5, n_latents)
    pre = threshold + rng.uniform(-0.3, 0.3, (batch, n_latents))
    edge = np.abs(np.abs(pre - threshold) - BANDWIDTH / 2) < 1e-3
    pre[edge] += 3e-3
    grad_z = rng.standard_normal((batch, n_latents))
    return pre, threshold, grad_z


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("l0_coef", [0.0, 0.7])
def test_jumprelu_threshold_gradient_matches_reference(rng, dtype, l0_coef):
    # The code holds every latent in decreasing pre - theta (the cap does not bind), as the
    # encode with bias b_enc - theta returns it.
    pre, threshold, grad_z = jumprelu_case(rng, 30, 12, dtype)
    log_threshold = np.log(threshold).astype(dtype)
    threshold = np.exp(log_threshold.astype(np.float64))
    gap64 = pre - threshold
    indices = np.argsort(-gap64, axis=1, kind="stable")
    gap = np.take_along_axis(gap64, indices, axis=1).astype(dtype)
    values = sparsity.jumprelu_values(gap, indices, np.exp(log_threshold))
    assert values.dtype == dtype
    z = ref.jumprelu(pre, threshold)
    assert rel_err(values, np.take_along_axis(z, indices, axis=1)) < tol(dtype)
    out = np.full(12, np.nan, dtype=dtype)
    sparsity.jumprelu_threshold_gradient(gap, indices, np.take_along_axis(grad_z, indices, 1).astype(dtype),
                                         log_threshold, BANDWIDTH, l0_coef, out)
    want = ref.jumprelu_threshold_gradient(pre, threshold, grad_z, BANDWIDTH, l0_coef)
    assert np.count_nonzero(want) > 6
    assert rel_err(out, want) < tol(dtype)


def fit_jumprelu(X, epochs=6, **options):
    sae = ksae.SparseAutoencoder(n_latents=48, k=4, sparsity="jumprelu", random_state=0,
                                 n_threads=1, **{k: options.pop(k) for k in ("max_k", "jumprelu_init_threshold")
                                                 if k in options})
    return sae.fit(X, epochs=epochs, batch_size=100, lr=1e-2, **options)


def test_jumprelu_l0_penalty_lowers_l0_and_raises_the_thresholds(data):
    free = fit_jumprelu(data, l0_coef=0.0)
    penalised = fit_jumprelu(data, l0_coef=0.2)
    assert penalised.history_["l0"][-1] < 0.8 * free.history_["l0"][-1]
    assert np.median(penalised.log_threshold_) > np.median(free.log_threshold_) + 0.05
    assert penalised.history_["sparsity_loss"][-1] == pytest.approx(0.2 * penalised.history_["l0"][-1])
    assert free.history_["sparsity_loss"] == [0.0] * 6


def test_jumprelu_thresholds_learn_from_the_reconstruction(data):
    # Without a penalty the straight-through gradient alone moves the thresholds (down:
    # more latents reconstruct better), so L0 grows from the calibrated start.
    sae = ksae.SparseAutoencoder(n_latents=48, k=4, sparsity="jumprelu", random_state=0, n_threads=1)
    start = sae.partial_fit(data, lr=1e-300).log_threshold_.copy()  # fit's initial thresholds
    sae.fit(data, epochs=6, batch_size=100, lr=1e-2, l0_coef=0.0)
    moved = (sae.log_threshold_ - start)[sae.log_threshold_ != start]  # latents seen near theirs
    assert moved.size > 20 and np.mean(moved < 0) > 0.7
    assert sae.history_["l0"][-1] > sae.history_["l0"][0]


def test_jumprelu_code_and_default_threshold(data):
    sae = ksae.SparseAutoencoder(n_latents=48, k=4, sparsity="jumprelu", random_state=0, n_threads=1)
    sae.partial_fit(data[:1000], lr=1e-300)  # initialises: thresholds calibrated on this batch
    theta = np.exp(sae.log_threshold_)
    assert np.all(theta == theta[0]) and theta[0] > 0
    values, indices = sae.encode(data[:1000])
    assert values.shape == (1000, 16)  # the cap: max_k = 4 * k
    assert np.count_nonzero(values) / 1000 == pytest.approx(4, rel=0.05)  # k per sample on average
    pre = ref.pre_activations(data[:1000].astype(np.float64), sae.W_enc_.astype(np.float64),
                              sae.b_enc_, sae.b_dec_)
    z = ref.jumprelu(pre, theta)
    assert np.all(np.count_nonzero(z, axis=1) < 16)  # the cap does not bind here: exact
    assert rel_err(sae.transform(data[:1000]), z) < tol(np.float32)
    fixed = ksae.SparseAutoencoder(n_latents=48, k=4, sparsity="jumprelu", jumprelu_init_threshold=0.25,
                                   random_state=0).partial_fit(data[:100], lr=1e-300)
    np.testing.assert_allclose(np.exp(fixed.log_threshold_), 0.25, rtol=1e-6)


def test_jumprelu_encoding_of_one_sample_does_not_depend_on_its_batch(data):
    sae = fit_jumprelu(data, epochs=2, l0_coef=0.01)
    values, indices = sae.encode(data[:50])
    for i in (0, 17, 49):
        one = sae.encode(data[i:i + 1])  # the same up to the product's rounding
        np.testing.assert_allclose(one.values[0], values[i], rtol=1e-6)
        np.testing.assert_array_equal(one.indices[0], indices[i])


def test_jumprelu_max_k_caps_the_code(data):
    sae = fit_jumprelu(data, epochs=1, max_k=2, jumprelu_init_threshold=1e-3)
    values, _ = sae.encode(data[:200])
    assert values.shape == (200, 2) and np.all(values > 0)  # low thresholds: the cap binds


def test_jumprelu_saves_its_thresholds(data, tmp_path):
    sae = fit_jumprelu(data, epochs=1)
    loaded = ksae.load(sae.save(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.log_threshold_, sae.log_threshold_)
    np.testing.assert_array_equal(loaded.transform(data[:20]), sae.transform(data[:20]))
    # A topk model's file has no thresholds, and a jumprelu config cannot do without them.
    topk = ksae.SparseAutoencoder(n_latents=48, k=4, random_state=0).fit(data, epochs=1)
    path = topk.save(tmp_path / "topk")
    with pytest.raises(AttributeError, match="only jumprelu models have thresholds"):
        ksae.load(path).log_threshold_
    config = (path / "config.json").read_text().replace('"sparsity": "topk"', '"sparsity": "jumprelu"')
    (path / "config.json").write_text(config)
    with pytest.raises(ValueError, match=r"expected tensors \['W_dec', 'W_enc', 'b_dec', 'b_enc', 'log_threshold'\]"):
        ksae.load(path)


def test_jumprelu_validation(data):
    with pytest.raises(ValueError, match=r"^activation: jumprelu needs 'relu'.*got 'sigmoid'"):
        ksae.ModelConfig(sparsity="jumprelu", activation="sigmoid")
    with pytest.raises(ValueError, match="^jumprelu_init_threshold: expected a finite number > 0"):
        ksae.ModelConfig(sparsity="jumprelu", jumprelu_init_threshold=0.0)
    with pytest.raises(ValueError, match="^jumprelu_bandwidth: expected a finite number > 0"):
        ksae.TrainConfig(jumprelu_bandwidth=0)
    with pytest.raises(ValueError, match="^l0_coef: expected a finite number >= 0"):
        ksae.TrainConfig(l0_coef=-0.1)
    ksae.ModelConfig(sparsity="jumprelu", k=8, max_k=2)  # the cap may be below k
    topk = ksae.SparseAutoencoder(n_latents=48, k=4, random_state=0).fit(data, epochs=1)
    topk.set_params(sparsity="jumprelu")
    with pytest.raises(ValueError, match="^sparsity: the model's weights are not those of a "
                                         "sparsity='jumprelu' model"):
        topk.encode(data[:5])


def test_jumprelu_lazy_adam_leaves_unselected_thresholds_alone(rng):
    # lazy_adam updates only the latents a step selected: their thresholds too. (A dense
    # update would move the others' on the momentum of earlier steps.)
    X = rng.standard_normal((40, 12)).astype(np.float32)
    sae = ksae.SparseAutoencoder(64, 1, sparsity="jumprelu", max_k=2, random_state=0, n_threads=1)
    options = dict(lazy_adam=True, jumprelu_bandwidth=1.0, l0_coef=0.1)
    sae.partial_fit(X[:32], **options)
    before = sae.log_threshold_.copy()
    selected = np.unique(sae.encode(X[32:34]).indices)
    sae.partial_fit(X[32:34], **options)
    others = np.setdiff1d(np.arange(64), selected)
    assert np.count_nonzero(sae._optimizer.state["log_threshold"]["exp_avg"][others]) > 10
    np.testing.assert_array_equal(sae.log_threshold_[others], before[others])
    assert not np.array_equal(sae.log_threshold_[selected], before[selected])
