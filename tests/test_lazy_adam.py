"""Lazy Adam: only the rows that received gradient are updated; the rest stay bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import ksae
from ksae import _core, reference
from ksae.buffers import aligned_copy


def _arrays(rng, shape, dtype):
    param = rng.standard_normal(shape).astype(dtype)
    grad = rng.standard_normal(shape).astype(dtype)
    m = (0.1 * rng.standard_normal(shape)).astype(dtype)
    v = np.abs(0.1 * rng.standard_normal(shape)).astype(dtype)
    return param, grad, m, v


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, unit_norm", [((37, 19), False), ((37, 19), True),
                                               ((200, 64), False), ((200, 64), True),
                                               ((53,), False)])  # a vector has no rows to normalise
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_lazy_adam_matches_reference_and_leaves_other_rows_alone(rng, dtype, shape, unit_norm, n_threads):
    rows = np.flatnonzero(rng.random(shape[0]) < 0.3).astype(np.int64)
    param, grad, m, v = _arrays(rng, shape, dtype)
    got = [aligned_copy(a) for a in (param, m, v)]
    _core.adam_update(got[0], grad, got[1], got[2], 1e-2, 0.9, 0.999, 1e-8, 0.01, 7, unit_norm,
                      n_threads, rows)
    want = [a.astype(np.float64) for a in (param, m, v)]
    reference.adam_update(want[0], grad.astype(np.float64), want[1], want[2], lr=1e-2,
                          weight_decay=0.01, step=7, unit_norm_rows=unit_norm, rows=rows)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    untouched = np.setdiff1d(np.arange(shape[0]), rows)
    for g, original in zip(got, (param, m, v)):
        np.testing.assert_array_equal(g[untouched], original[untouched])


def test_lazy_adam_on_every_row_is_plain_adam(rng):
    param, grad, m, v = _arrays(rng, (30, 8), np.float32)
    lazy = [aligned_copy(a) for a in (param, m, v)]
    full = [aligned_copy(a) for a in (param, m, v)]
    _core.adam_update(lazy[0], grad, lazy[1], lazy[2], 1e-3, 0.9, 0.999, 1e-8, 0.0, 3, True, 1,
                      np.arange(30, dtype=np.int64))
    _core.adam_update(full[0], grad, full[1], full[2], 1e-3, 0.9, 0.999, 1e-8, 0.0, 3, True, 1)
    for a, b in zip(lazy, full):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rows, message", [
    (np.array([3, 1], dtype=np.int64), "strictly increasing"),
    (np.array([1, 1], dtype=np.int64), "strictly increasing"),
    (np.array([0, 30], dtype=np.int64), r"in \[0, 30\)"),
    (np.array([-1], dtype=np.int64), r"in \[0, 30\)"),
    (np.array([[1]], dtype=np.int64), "1-D"),
    (np.array([1], dtype=np.int32), "int64"),
    ([1, 2], "int64"),
])
def test_lazy_adam_rows_are_checked(rng, rows, message):
    param, grad, m, v = _arrays(rng, (30, 4), np.float32)
    with pytest.raises((ValueError, TypeError), match=message):
        _core.adam_update(param, grad, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False, 1, rows)


def test_lazy_training_updates_only_the_selected_latents(rng):
    X = rng.standard_normal((40, 12)).astype(np.float32)
    sae = ksae.SparseAutoencoder(64, 2, random_state=0, n_threads=1)
    sae.partial_fit(X[:8], lazy_adam=True)
    before = {name: getattr(sae, name).copy() for name in ("W_enc_", "W_dec_", "b_enc_")}
    selected = np.unique(sae.encode(X[8:12]).indices)
    sae.partial_fit(X[8:12], lazy_adam=True)
    others = np.setdiff1d(np.arange(64), selected)
    assert others.size > 30
    np.testing.assert_array_equal(sae.W_dec_[others], before["W_dec_"][others])
    np.testing.assert_array_equal(sae.W_enc_[:, others], before["W_enc_"][:, others])
    np.testing.assert_array_equal(sae.b_enc_[others], before["b_enc_"][others])
    assert not np.array_equal(sae.W_dec_[selected], before["W_dec_"][selected])


def test_lazy_training_with_every_latent_selected_is_plain_training(rng):
    X = rng.standard_normal((64, 10)).astype(np.float32)
    lazy = ksae.SparseAutoencoder(8, 8, random_state=0, n_threads=1, activation="linear").fit(
        X, epochs=2, batch_size=16, lazy_adam=True)
    plain = ksae.SparseAutoencoder(8, 8, random_state=0, n_threads=1, activation="linear").fit(
        X, epochs=2, batch_size=16)
    np.testing.assert_array_equal(lazy.W_dec_, plain.W_dec_)
    np.testing.assert_array_equal(lazy.W_enc_, plain.W_enc_)


def test_lazy_adam_learns_about_as_well_as_adam():
    data = ksae.make_sparse_dictionary(n_samples=3000, d_in=32, n_components=64, n_active=3)
    scores = {}
    for lazy in (False, True):
        sae = ksae.SparseAutoencoder(128, 4, random_state=0).fit(
            data.X, epochs=5, batch_size=64, lr=3e-3, lazy_adam=lazy)
        assert sae.history_["loss"][-1] < 0.6 * sae.history_["loss"][0]
        scores[lazy] = sae.score(data.X)
    assert scores[True] > scores[False] - 0.03, scores


def test_lazy_adam_needs_adam():
    with pytest.raises(ValueError, match="lazy_adam: lazy updates are for adam and adamw, not 'sgd'"):
        ksae.TrainConfig(optimizer="sgd", lazy_adam=True)
    with pytest.raises(TypeError, match="lazy_adam: expected a bool"):
        ksae.TrainConfig(lazy_adam=1)
