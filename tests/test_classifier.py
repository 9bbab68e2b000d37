"""ksae.SparseClassifier: a k-sparse encoder fine-tuned with a softmax head. Its gradient is
checked by finite differences in test_gradients.py; here: what fine-tuning achieves, the
autoencoder left alone, and input validation."""

from __future__ import annotations

import numpy as np
import pytest

import ksae


@pytest.fixture(scope="module")
def task():
    """Six classes, the strongest of six planted directions, on data with 24 directions, two
    active per sample; a 24-latent k=3 autoencoder trained on it without labels."""
    data = ksae.make_sparse_dictionary(n_samples=3000, d_in=16, n_components=24, n_active=2,
                                       noise=0.02, random_state=1)
    y = np.argmax(np.abs(data.codes[:, :6]), axis=1)
    X = data.X
    sae = ksae.SparseAutoencoder(24, 3, random_state=0, n_threads=1).fit(X[:2400], epochs=5,
                                                                         batch_size=100)
    return sae, X[:2400], y[:2400], X[2400:], y[2400:]


def test_fine_tuning_beats_a_probe_on_the_frozen_codes(task):
    sae, X, y, X_test, y_test = task
    encoder_before = sae.W_enc_.copy()
    probe = ksae.LinearProbe(epochs=30, random_state=0).fit(sae.transform(X), y)
    probe_accuracy = probe.score(sae.transform(X_test), y_test)
    clf = ksae.SparseClassifier(sae, 6, random_state=0).fit(X, y, epochs=20, batch_size=100, lr=3e-3)
    accuracy = clf.score(X_test, y_test)
    assert accuracy > 0.9 and accuracy > probe_accuracy + 0.08
    assert clf.history_["loss"][-1] < clf.history_["loss"][0]
    assert clf.history_["accuracy"][-1] > clf.history_["accuracy"][0]
    assert clf.n_iter_ == 20 * 24
    np.testing.assert_array_equal(sae.W_enc_, encoder_before)  # the autoencoder is untouched
    assert not np.array_equal(clf.W_enc_, encoder_before)  # the encoder was fine-tuned
    np.testing.assert_array_equal(clf.b_dec_, sae.b_dec_)  # the centering is not trained
    proba = clf.predict_proba(X_test[:7])
    assert proba.shape == (7, 6) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(clf.predict(X_test[:7]), np.argmax(proba, axis=1))
    assert clf.W_head_.shape == (24, 6) and clf.b_head_.shape == (6,)


def test_schedules_clipping_and_optimizers_apply(task):
    sae, X, y, _, _ = task
    a = ksae.SparseClassifier(sae, 6, random_state=0).fit(X, y, epochs=1, batch_size=100, lr=0.1,
                                                          optimizer="sgd")
    b = ksae.SparseClassifier(sae, 6, random_state=0).fit(X, y, epochs=1, batch_size=100, lr=0.1,
                                                          optimizer="sgd", clip_grad_norm=1e-3)
    c = ksae.SparseClassifier(sae, 6, random_state=0).fit(X, y, epochs=1, batch_size=100, lr=0.1,
                                                          optimizer="sgd", schedule="cosine",
                                                          warmup_steps=5)
    assert np.linalg.norm(b.W_head_) < 0.5 * np.linalg.norm(a.W_head_)
    assert not np.allclose(c.W_head_, a.W_head_)
    same = ksae.SparseClassifier(sae, 6, random_state=0).fit(X, y, epochs=1, batch_size=100, lr=0.1,
                                                             optimizer="sgd")
    np.testing.assert_array_equal(same.W_head_, a.W_head_)  # seeded: reproducible


def test_bad_input(task):
    sae, X, y, _, _ = task
    clf = ksae.SparseClassifier(sae, 6)
    with pytest.raises(RuntimeError, match="not fitted"):
        clf.predict(X[:3])
    with pytest.raises(TypeError, match=r"^y: expected integer class labels 0..5, got dtype float64"):
        clf.fit(X, y.astype(np.float64))
    with pytest.raises(ValueError, match=r"^y: expected 2400 labels .*got shape \(10,\)"):
        clf.fit(X, y[:10])
    with pytest.raises(ValueError, match=r"^y: expected labels in \[0, 6\).*got values in \[1, 6\]"):
        clf.fit(X, np.where(y == 0, 6, y))
    with pytest.raises(ValueError, match="^n_classes: expected an integer >= 2"):
        ksae.SparseClassifier(sae, 1).fit(X, y)
    with pytest.raises(ValueError, match=r"^X: expected 16 features"):
        clf.fit(X[:, :5], y)
    with pytest.raises(ValueError, match="^fit: unknown option.*'auxk_coef'"):
        clf.fit(X, y, auxk_coef=0.1)
    with pytest.raises(TypeError, match="^autoencoder: expected a fitted ksae.SparseAutoencoder"):
        ksae.SparseClassifier("sae", 6).fit(X, y)
    with pytest.raises(RuntimeError, match="not fitted"):
        ksae.SparseClassifier(ksae.SparseAutoencoder(24, 3), 6).fit(X, y)
    batchtopk = ksae.SparseAutoencoder(24, 3, sparsity="batchtopk").fit(X, epochs=1)
    with pytest.raises(ValueError, match="^autoencoder: SparseClassifier fine-tunes a topk encoder"):
        ksae.SparseClassifier(batchtopk, 6).fit(X, y)
    fitted = ksae.SparseClassifier(sae, 6).fit(X[:200], y[:200], epochs=1)
    with pytest.raises(ValueError, match=r"^y: expected 3 labels"):
        fitted.score(X[:3], y[:4])
