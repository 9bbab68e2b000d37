"""Output activations, losses, weight penalties, denoising, the inference-k rule and the
linear probe."""

from __future__ import annotations

import numpy as np
import pytest

import ksae
from ksae.losses import add_weight_penalties, bce_with_logits, sigmoid, sigmoid_mse


def numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        gflat[i] = (up - f()) / (2 * eps)
        flat[i] = old
    return g


@pytest.mark.parametrize("loss_fn", [bce_with_logits, sigmoid_mse])
def test_sigmoid_losses_match_finite_differences(rng, loss_fn):
    logits = rng.standard_normal((4, 5)) * 3
    X = rng.random((4, 5))
    loss, grad = loss_fn(logits.copy(), X)
    np.testing.assert_allclose(grad, numeric_grad(lambda: loss_fn(logits.copy(), X)[0], logits),
                               rtol=1e-6, atol=1e-9)
    s = 1 / (1 + np.exp(-logits))
    expected = (np.mean(-(X * np.log(s) + (1 - X) * np.log(1 - s))) if loss_fn is bce_with_logits
                else np.mean((s - X) ** 2))
    assert loss == pytest.approx(expected, rel=1e-10)


def test_sigmoid_and_bce_are_stable_for_huge_logits():
    logits = np.array([[-1e4, 1e4, 0.0]])
    np.testing.assert_allclose(sigmoid(logits.copy()), [[0.0, 1.0, 0.5]], atol=1e-30)
    loss, grad = bce_with_logits(logits, np.array([[0.0, 1.0, 0.5]]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))


def test_weight_penalty_gradients(rng):
    params = {"W_enc_t": rng.standard_normal((5, 3)), "W_dec": rng.standard_normal((5, 3)),
              "b_enc": rng.standard_normal(5), "b_dec": rng.standard_normal(3)}
    grads = {name: np.zeros_like(p) for name, p in params.items()}
    add_weight_penalties(params, grads, l1=0.3, l2=0.7)
    for name in ("W_enc_t", "W_dec"):
        W = params[name]
        penalty = lambda: 0.3 * np.abs(W).sum() + 0.7 * (W ** 2).sum()  # noqa: E731
        np.testing.assert_allclose(grads[name], numeric_grad(penalty, W), rtol=1e-6)
    assert not grads["b_enc"].any() and not grads["b_dec"].any()


def test_l2_penalty_shrinks_the_encoder():
    data = ksae.make_sparse_dictionary(n_samples=2000, d_in=16, n_components=24, n_active=3)
    # Plain SGD: each step multiplies W by (1 - 2 * lr * l2) on top of the loss gradient.
    common = dict(epochs=3, batch_size=100, optimizer="sgd", momentum=0.0, lr=0.05)
    plain = ksae.SparseAutoencoder(48, 3, random_state=0).fit(data.X, **common)
    shrunk = ksae.SparseAutoencoder(48, 3, random_state=0).fit(data.X, l2_weight=0.5, **common)
    sparse = ksae.SparseAutoencoder(48, 3, random_state=0).fit(data.X, l1_weight=0.05, **common)
    assert np.linalg.norm(shrunk.W_enc_) < 0.5 * np.linalg.norm(plain.W_enc_)
    assert np.abs(sparse.W_enc_).sum() < 0.8 * np.abs(plain.W_enc_).sum()


def test_sigmoid_output_with_bce_learns_data_in_the_unit_interval(rng):
    data = ksae.make_sparse_dictionary(n_samples=3000, d_in=20, n_components=30, n_active=3,
                                       random_state=1)
    X = np.clip(0.5 + 0.3 * data.X, 0, 1).astype(np.float32)
    sae = ksae.SparseAutoencoder(64, 4, output_activation="sigmoid", random_state=0)
    sae.fit(X, epochs=8, batch_size=100, lr=3e-3, loss="bce")
    # BCE against soft targets cannot go below their entropy: compare the excess over it.
    Xc = np.clip(X.astype(np.float64), 1e-12, 1 - 1e-12)
    floor = float(np.mean(-(Xc * np.log(Xc) + (1 - Xc) * np.log(1 - Xc))))
    excess = [loss - floor for loss in sae.history_["loss"]]
    assert excess[-1] < 0.5 * excess[0]
    X_hat = sae.reconstruct(X)
    assert X_hat.min() >= 0 and X_hat.max() <= 1
    assert sae.score(X) > 0.5
    with pytest.raises(ValueError, match="bce"):
        ksae.SparseAutoencoder(8, 2).fit(X, epochs=1, loss="bce")


def test_sigmoid_output_with_mse_trains():
    data = ksae.make_sparse_dictionary(n_samples=2000, d_in=20, n_components=30, n_active=3)
    X = np.clip(0.5 + 0.3 * data.X, 0, 1).astype(np.float32)
    sae = ksae.SparseAutoencoder(64, 4, output_activation="sigmoid", random_state=0)
    sae.fit(X, epochs=6, batch_size=100, lr=3e-3)
    assert sae.history_["loss"][-1] < 0.7 * sae.history_["loss"][0]


def test_input_dropout_trains_a_denoising_model(rng):
    data = ksae.make_sparse_dictionary(n_samples=4000, d_in=32, n_components=24, n_active=2,
                                       noise=0.0, random_state=2)
    X = data.X
    common = dict(epochs=8, batch_size=100, lr=3e-3)
    plain = ksae.SparseAutoencoder(64, 2, random_state=0).fit(X, **common)
    denoising = ksae.SparseAutoencoder(64, 2, random_state=0).fit(X, input_dropout=0.3, **common)
    masked = X * (rng.random(X.shape) >= 0.3)
    err = lambda m: np.mean((m.reconstruct(masked) - X) ** 2)  # noqa: E731
    assert err(denoising) < 0.8 * err(plain)


def test_inference_k_scale_keeps_more_latents_at_encode_time():
    data = ksae.make_sparse_dictionary(n_samples=500, d_in=16, n_components=24, n_active=3)
    sae = ksae.SparseAutoencoder(48, 4, inference_k_scale=1.5, random_state=0)
    sae.fit(data.X, epochs=1, batch_size=100, log_every=1)
    assert all(v == pytest.approx(4) or v <= 4 for v in sae.step_history_["l0"])  # training: k
    values, indices = sae.encode(data.X[:10])
    assert values.shape == (10, 6) and sae.inference_k(sae.config) == 6
    with pytest.raises(ValueError, match="inference_k_scale"):
        ksae.SparseAutoencoder(48, 4, inference_k_scale=0).fit(data.X, epochs=1)


# ------------------------------------------------------------------------- linear probe
def labelled_codes(n=1500, seed=0):
    data = ksae.make_sparse_dictionary(n_samples=n, d_in=16, n_components=6, n_active=1,
                                       noise=0.02, random_state=seed)
    return data.X, np.argmax(data.codes, axis=1)


def test_linear_probe_reads_labels_from_the_codes():
    X, y = labelled_codes()
    sae = ksae.SparseAutoencoder(32, 2, random_state=0).fit(X[:1200], epochs=5, batch_size=100)
    probe = ksae.LinearProbe(epochs=30, random_state=0).fit(sae.transform(X[:1200]), y[:1200])
    assert probe.score(sae.transform(X[1200:]), y[1200:]) > 0.95
    assert probe.history_["loss"][-1] < probe.history_["loss"][0]
    proba = probe.predict_proba(sae.transform(X[:5]))
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)
    assert set(probe.predict(sae.transform(X[:50]))) <= set(range(6))


def test_linear_probe_gradient_matches_finite_differences(rng):
    Z = rng.standard_normal((7, 4))
    y = np.array([0, 1, 2, 1, 0, 2, 2])
    params = {"W": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    loss, grads = ksae.LinearProbe._loss_and_grads(params, Z, y, l2=0.1)

    def total():  # cross-entropy plus the L2 penalty, whose gradient the probe includes
        logits = Z @ params["W"] + params["b"]
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return -np.mean(logp[np.arange(7), y]) + 0.1 * np.sum(params["W"] ** 2)

    assert loss == pytest.approx(total() - 0.1 * np.sum(params["W"] ** 2))  # reported: cross-entropy
    np.testing.assert_allclose(grads["W"], numeric_grad(total, params["W"]), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(grads["b"], numeric_grad(total, params["b"]), rtol=1e-6, atol=1e-9)


def test_linear_probe_bad_input():
    with pytest.raises(ValueError, match="y"):
        ksae.LinearProbe().fit(np.zeros((5, 2), np.float32), [0, 1])
    with pytest.raises(ValueError, match="classes"):
        ksae.LinearProbe().fit(np.zeros((3, 2), np.float32), [1, 1, 1])
    with pytest.raises(RuntimeError, match="not fitted"):
        ksae.LinearProbe().predict(np.zeros((3, 2), np.float32))
