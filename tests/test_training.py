"""Training and inference through the estimator, ``ksae.SparseAutoencoder``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import ksae
from ksae import reference as ref
from ksae.state import encode_chunk_rows
from ksae.steps import fuses_adam

from conftest import ACTIVATIONS, THREADS, rel_err


@pytest.fixture(scope="module")
def small_data():
    return ksae.make_sparse_dictionary(n_samples=2000, d_in=16, n_components=24, n_active=2,
                                       noise=0.01, random_state=1)


def fitted(X, *, dtype="float32", n_threads=1, epochs=3, random_state=0, fit_kwargs=None,
           **params):
    params = {"n_latents": 48, "k": 3, **params}
    sae = ksae.SparseAutoencoder(dtype=dtype, n_threads=n_threads, random_state=random_state,
                                 **params)
    return sae.fit(X, epochs=epochs, batch_size=64, lr=1e-2, **(fit_kwargs or {}))


def weights_of(sae):
    """Copies of the fitted weights in the public layout."""
    return {"W_enc": sae.W_enc_.copy(), "b_enc": sae.b_enc_.copy(),
            "W_dec": sae.W_dec_.copy(), "b_dec": sae.b_dec_.copy()}


def initialised(X, random_state=0, **params):
    """A float64 model initialised by one step that leaves its weights (all but the zero
    biases, which move by ~1e-300) unchanged, and no optimizer state worth keeping: SGD
    without momentum at lr = 1e-300. The next Adam step starts Adam afresh."""
    sae = ksae.SparseAutoencoder(dtype="float64", n_threads=1, random_state=random_state,
                                 **params)
    sae.partial_fit(X, optimizer="sgd", momentum=0.0, lr=1e-300)
    return sae


# --------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("n_threads", THREADS)
def test_loss_falls(small_data, n_threads):
    sae = fitted(small_data.X, n_threads=n_threads, epochs=5)
    loss = sae.history_["loss"]
    assert len(loss) == 5
    assert loss[-1] < 0.5 * loss[0]
    assert sae.score(small_data.X) > 0.8


# Model seeds other than the data's: make_sparse_dictionary(random_state=s) draws its
# directions as default_rng(s).standard_normal((n_components, d_in)), and the tied init of a
# model with random_state=s draws W_dec the same way, so with equal seeds the first
# n_components decoder rows ARE the planted directions before any training.
@pytest.mark.parametrize("seed", [1, 2])
def test_planted_dictionary_is_recovered(seed):
    data = ksae.make_sparse_dictionary(n_samples=8000, d_in=32, n_components=48, n_active=3,
                                       noise=0.01, random_state=0)
    sae = ksae.SparseAutoencoder(n_latents=128, k=3, random_state=seed, n_threads=1)
    sae.fit(data.X, epochs=10, batch_size=128, lr=3e-3)
    assert ksae.dictionary_recovery(data.directions, sae.W_dec_) > 0.95
    assert sae.score(data.X) > 0.9


def test_untrained_model_does_not_recover_the_dictionary():
    # The recovery figure is not trivially high for a random dictionary of the same size.
    data = ksae.make_sparse_dictionary(n_samples=100, d_in=32, n_components=48, n_active=3,
                                       noise=0.01, random_state=0)
    sae = initialised(data.X, n_latents=128, k=3, random_state=1)
    assert ksae.dictionary_recovery(data.directions, sae.W_dec_) < 0.8


# --------------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("normalize_decoder", [True, False])
def test_partial_fit_steps_equal_dense_numpy_reference(rng, activation, normalize_decoder):
    X = rng.standard_normal((96, 13))
    sae = initialised(X[:8], n_latents=40, k=5, activation=activation,
                      normalize_decoder=normalize_decoder)
    w = weights_of(sae)
    dense = ref.DenseNumpySAE(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], k=5,
                              activation=activation, lr=1e-2, normalize_decoder=normalize_decoder)
    for step, batch in enumerate(np.split(X, 3), start=1):
        sae.partial_fit(batch, lr=1e-2)
        dense.step(batch)
        got = weights_of(sae)
        for name, want in dense.params.items():
            assert rel_err(got[name], want) < 1e-10, f"{name} after step {step}"
    assert sae.n_iter_ == 4  # the initialising step and three Adam steps
    if normalize_decoder:
        np.testing.assert_allclose(np.linalg.norm(sae.W_dec_, axis=1), 1.0, atol=1e-12)


def test_fit_equals_dense_numpy_reference_and_partial_fit_continues_it(rng):
    X = rng.standard_normal((90, 13))
    probe = initialised(X, n_latents=40, k=5)
    w = weights_of(probe)  # fit starts from the same initial weights (same random_state)
    dense = ref.DenseNumpySAE(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], k=5, lr=2e-2)
    sae = ksae.SparseAutoencoder(n_latents=40, k=5, dtype="float64", n_threads=1, random_state=0)
    sae.fit(X, epochs=1, batch_size=32, lr=2e-2, shuffle=False)
    losses = [dense.step(X[start:start + 32]) for start in range(0, 90, 32)]
    assert sae.n_iter_ == 3
    got = weights_of(sae)
    for name, want in dense.params.items():
        assert rel_err(got[name], want) < 1e-10, name
    expected_loss = (32 * losses[0] + 32 * losses[1] + 26 * losses[2]) / 90
    assert sae.history_["loss"][0] == pytest.approx(expected_loss, rel=1e-10)
    # partial_fit carries Adam's state on, with the new learning rate from this step.
    dense.lr = 5e-3
    dense.step(X[:20])
    sae.partial_fit(X[:20], lr=5e-3)
    assert sae.n_iter_ == 4
    got = weights_of(sae)
    for name, want in dense.params.items():
        assert rel_err(got[name], want) < 1e-10, name


def test_partial_fit_with_another_optimizer_starts_it_afresh(rng):
    X = rng.standard_normal((30, 7))
    sae = initialised(X, n_latents=12, k=2)
    w = weights_of(sae)
    sae.partial_fit(X, lr=1e-2)  # Adam, fresh: its first step has |update| ~ lr per entry
    dense = ref.DenseNumpySAE(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], k=2, lr=1e-2)
    dense.step(X)
    for name, want in dense.params.items():
        assert rel_err(weights_of(sae)[name], want) < 1e-10, name


def test_partial_fit_reuses_its_settings_only_while_they_repeat(rng):
    # partial_fit keeps its validated settings and optimizer between calls with the same
    # arguments; any change of arguments or of the model's parameters must still be seen.
    X = rng.standard_normal((40, 9))
    sae = initialised(X, n_latents=16, k=3)
    sae.partial_fit(X, lr=1e-2)
    adam = sae._optimizer
    sae.partial_fit(X, lr=1e-2)
    sae.partial_fit(X, lr=5e-3)  # only lr changed: the same Adam, its state carried on
    assert sae._optimizer is adam and adam.n_steps == 3 and adam.lr == 5e-3
    sae.partial_fit(X, lr=5e-3, optimizer="sgd", momentum=0.9)
    assert type(sae._optimizer).__name__ == "SGD" and sae._optimizer.momentum == 0.9
    sae.partial_fit(X, lr=5e-3, optimizer="sgd", momentum=0.5)  # another setting: afresh
    assert sae._optimizer.momentum == 0.5 and sae._optimizer.n_steps == 1
    sae.partial_fit(X, lr=5e-3)  # back to Adam: a fresh one, not the first
    assert sae._optimizer is not adam and sae._optimizer.n_steps == 1
    with pytest.raises(ValueError, match="momentum"):
        sae.partial_fit(X, lr=5e-3, optimizer="sgd", momentum=-1.0)
    sae.partial_fit(X, lr=5e-3, lazy_adam=True)
    with pytest.raises(TypeError, match="lazy_adam"):  # 1 == True, but it is no bool
        sae.partial_fit(X, lr=5e-3, lazy_adam=1)
    # The model's parameters are read on every call.
    sae.set_params(k=5)
    sae.partial_fit(X, lr=5e-3)
    assert (sae.transform(X) != 0).sum(axis=1).max() == 5
    cfg = sae.config
    cfg.k = 1  # a copy: changing it changes nothing
    assert sae.config.k == 5 and sae.encode(X).values.shape[1] == 5


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "l1"])
def test_the_fused_adam_step_trains_exactly_as_the_separate_kernels(rng, optimizer, sparsity):
    # A plain Adam step runs backward and the update as one kernel (backward_adam); with a
    # setting that needs the gradients first (here clipping at a norm never reached) the
    # step runs them apart. Both must train to the same weights, bit for bit.
    X = rng.standard_normal((96, 12)).astype(np.float32)
    models = []
    for clip in (None, 1e30):
        sae = ksae.SparseAutoencoder(n_latents=40, k=4, sparsity=sparsity, random_state=0,
                                     n_threads=2)
        sae.fit(X, epochs=3, batch_size=16, lr=1e-2, optimizer=optimizer, clip_grad_norm=clip)
        models.append(sae)
    fused, separate = models
    assert fuses_adam(fused.state_, fused._optimizer, ksae.TrainConfig(optimizer=optimizer), None)
    assert not fuses_adam(separate.state_, separate._optimizer,
                          ksae.TrainConfig(optimizer=optimizer, clip_grad_norm=1e30), None)
    for name in fused.state_.params:
        np.testing.assert_array_equal(fused.state_.params[name], separate.state_.params[name], err_msg=name)
        for key in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(fused._optimizer.state[name][key],
                                          separate._optimizer.state[name][key], err_msg=key)
    assert fused.history_["loss"] == separate.history_["loss"]
    np.testing.assert_array_equal(fused.samples_since_fired_, separate.samples_since_fired_)


# --------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_invariants_hold_in_both_precisions(small_data, dtype):
    sae = fitted(small_data.X, dtype=dtype)
    for w in (sae.W_enc_, sae.b_enc_, sae.W_dec_, sae.b_dec_):
        assert w.dtype == np.dtype(dtype)
    assert sae.W_enc_.shape == (16, 48) and sae.W_dec_.shape == (48, 16)
    assert sae.b_enc_.shape == (48,) and sae.b_dec_.shape == (16,)
    assert sae.n_features_in_ == 16
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(np.linalg.norm(sae.W_dec_.astype(np.float64), axis=1), 1.0,
                               atol=100 * eps)
    X = small_data.X[:50]
    for X_in in (X.astype(np.float32), X.astype(np.float64)):
        values, indices = sae.encode(X_in)
        assert values.dtype == np.dtype(dtype) and indices.dtype == np.int64
        assert sae.transform(X_in).dtype == np.dtype(dtype)
        assert sae.reconstruct(X_in).dtype == np.dtype(dtype)
        assert sae.decode(values, indices).dtype == np.dtype(dtype)


def test_float32_and_float64_fits_agree(small_data):
    # Same quality, not the same weights: the two precisions may draw their initial
    # weights differently from one seed.
    a = fitted(small_data.X, dtype="float32", epochs=5)
    b = fitted(small_data.X, dtype="float64", epochs=5)
    score_a, score_b = a.score(small_data.X), b.score(small_data.X)
    assert score_a > 0.9 and score_b > 0.9
    assert abs(score_a - score_b) < 0.05


def test_without_decoder_normalisation_rows_drift(small_data):
    # The tied init starts with unit rows; without normalize_decoder training moves them.
    sae = fitted(small_data.X, normalize_decoder=False, init="tied")
    norms = np.linalg.norm(sae.W_dec_.astype(np.float64), axis=1)
    assert np.max(np.abs(norms - 1)) > 1e-2


# --------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n_threads", THREADS)
def test_same_seed_gives_identical_weights(small_data, shuffle, n_threads):
    runs = [fitted(small_data.X, n_threads=n_threads, epochs=2, fit_kwargs={"shuffle": shuffle})
            for _ in range(2)]
    a, b = (weights_of(s) for s in runs)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert runs[0].history_["loss"] == runs[1].history_["loss"]


def test_shuffle_and_seed_change_the_result(small_data):
    base = weights_of(fitted(small_data.X, epochs=2, fit_kwargs={"shuffle": False}))
    shuffled = weights_of(fitted(small_data.X, epochs=2, fit_kwargs={"shuffle": True}))
    other_seed = weights_of(fitted(small_data.X, epochs=2, random_state=1))
    assert not np.array_equal(base["W_dec"], shuffled["W_dec"])
    assert not np.array_equal(shuffled["W_dec"], other_seed["W_dec"])


def test_refit_starts_over(small_data):
    sae = fitted(small_data.X, epochs=2)
    first = weights_of(sae)
    sae.fit(small_data.X, epochs=2, batch_size=64, lr=1e-2)
    assert sae.n_iter_ == 2 * 32  # 2000 samples in batches of 64: 32 steps an epoch
    for name, w in weights_of(sae).items():
        np.testing.assert_array_equal(w, first[name], err_msg=name)


# --------------------------------------------------------------------------------- partial_fit
def test_partial_fit_initialises_lazily_and_counts_steps(small_data):
    X = small_data.X
    sae = ksae.SparseAutoencoder(n_latents=48, k=3, random_state=0, n_threads=1)
    with pytest.raises(RuntimeError, match="not fitted"):
        sae.encode(X[:5])
    sae.partial_fit(X[:100], lr=1e-2)
    assert sae.n_iter_ == 1 and sae.n_features_in_ == 16
    before = sae.score(X)
    for i in range(1, 20):
        sae.partial_fit(X[100 * i:100 * (i + 1)], lr=1e-2)
    assert sae.n_iter_ == 20
    assert sae.score(X) > before
    with pytest.raises(ValueError, match="X: expected 16 features"):
        sae.partial_fit(np.ones((4, 15), dtype=np.float32))


def test_partial_fit_after_fit_continues(small_data):
    sae = fitted(small_data.X, epochs=1)
    steps = sae.n_iter_
    w = weights_of(sae)
    sae.partial_fit(small_data.X[:64], lr=1e-2)
    assert sae.n_iter_ == steps + 1
    assert not np.array_equal(sae.W_dec_, w["W_dec"])
    assert sae.history_["epoch"] == [1]  # a step is not an epoch


def test_partial_fit_refuses_changed_architecture(small_data):
    sae = fitted(small_data.X, epochs=1)
    sae.set_params(n_latents=64)
    with pytest.raises(ValueError, match="n_latents"):
        sae.partial_fit(small_data.X[:64])
    with pytest.raises(ValueError, match="n_latents"):
        sae.encode(small_data.X[:5])
    sae.fit(small_data.X, epochs=1, batch_size=256)  # fit re-initialises
    assert sae.W_dec_.shape == (64, 16)


# --------------------------------------------------------------------------------- history
def test_validation_data_and_callback(small_data):
    X, X_val = small_data.X[:1500], small_data.X[1500:]
    records = []
    sae = fitted(X, epochs=3, fit_kwargs={"validation_data": X_val, "callback": records.append})
    h = sae.history_
    assert h["epoch"] == [1, 2, 3]
    for key in ("loss", "l0", "dead_fraction", "time", "val_loss", "val_fve"):
        assert len(h[key]) == 3, key
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for key in h:
        assert [r[key] for r in records] == h[key]
    # The last epoch's figures are those of the final model.
    X_hat = sae.reconstruct(X_val)
    assert h["val_loss"][-1] == pytest.approx(np.mean((X_hat - X_val) ** 2), rel=1e-6)
    assert h["val_fve"][-1] == pytest.approx(sae.score(X_val), rel=1e-9)
    assert h["val_loss"][-1] < h["val_loss"][0]
    assert all(0 < l0 <= 3 for l0 in h["l0"])
    assert all(0 <= d <= 1 for d in h["dead_fraction"])


def test_validation_data_of_wrong_width_raises(small_data):
    with pytest.raises(ValueError, match="validation_data: expected 16 features"):
        fitted(small_data.X, fit_kwargs={"validation_data": small_data.X[:, :15]})


def test_history_without_validation_has_no_val_keys(small_data):
    sae = fitted(small_data.X, epochs=1)
    assert "val_loss" not in sae.history_ and "val_fve" not in sae.history_


# --------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def trained(small_data):
    return fitted(small_data.X, dtype="float64", epochs=2)


def test_encode_matches_reference(trained, small_data):
    X = small_data.X[:200].astype(np.float64)
    values, indices = trained.encode(X)
    ref_values, ref_indices = ref.encode(X, trained.W_enc_, trained.b_enc_, trained.b_dec_, 3)
    np.testing.assert_array_equal(indices, ref_indices)
    assert rel_err(values, ref_values) < 1e-10
    assert isinstance(trained.encode(X), ksae.SparseCode)
    assert trained.encode(X).values.shape == (200, 3)


def test_transform_is_the_dense_code(trained, small_data):
    X = small_data.X[:100]
    values, indices = trained.encode(X)
    Z = trained.transform(X)
    assert Z.shape == (100, 48)
    expected = np.zeros((100, 48))
    np.put_along_axis(expected, indices, values, axis=1)
    np.testing.assert_array_equal(Z, expected)
    assert np.all(np.count_nonzero(Z, axis=1) <= 3)
    assert np.count_nonzero(Z) > 0
    # Off the selected latents every entry is zero; on them, the code's values.
    mask = np.zeros((100, 48), dtype=bool)
    np.put_along_axis(mask, indices, True, axis=1)
    assert np.all(Z[~mask] == 0)


def test_reconstruct_decode_and_score(trained, small_data):
    X = small_data.X[:300].astype(np.float64)
    X_hat = trained.reconstruct(X)
    np.testing.assert_array_equal(X_hat, trained.decode(*trained.encode(X)))
    dense = trained.transform(X) @ trained.W_dec_ + trained.b_dec_
    assert rel_err(X_hat, dense) < 1e-12
    sse = np.sum((X - X_hat) ** 2)
    sst = np.sum((X - X.mean(axis=0)) ** 2)
    assert trained.score(X) == pytest.approx(1 - sse / sst, rel=1e-12)
    assert ksae.fraction_of_variance_explained(X, X) == 1.0


def test_decode_accepts_other_code_widths_and_checks_indices(trained):
    values = np.ones((2, 5))
    indices = np.array([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], dtype=np.int32)
    out = trained.decode(values, indices)
    expected = ref.decode(values, indices.astype(np.int64), trained.W_dec_, trained.b_dec_)
    assert rel_err(out, expected) < 1e-12
    with pytest.raises(ValueError, match="indices"):
        trained.decode(values, indices + 40)
    with pytest.raises(ValueError, match="indices"):
        trained.decode(values, indices - 1)
    with pytest.raises(ValueError, match="values, indices"):
        trained.decode(values, indices[:, :4])
    with pytest.raises(TypeError, match="indices"):
        trained.decode(values, indices.astype(np.float64))


def test_encode_in_chunks_equals_row_by_row(rng):
    n_latents, d_in = 2**14, 8
    chunk_rows = encode_chunk_rows(8)
    n_rows = 1100
    assert chunk_rows < n_rows // 2  # the input spans several chunks (and a partial one)
    X = rng.standard_normal((n_rows, d_in))
    sae = ksae.SparseAutoencoder(n_latents=n_latents, k=4, dtype="float64", random_state=0,
                                 n_threads=1, init="he")
    sae.partial_fit(X[:16])
    values, indices = sae.encode(X)
    assert values.shape == indices.shape == (n_rows, 4)
    one = [sae.encode(X[r:r + 1]) for r in range(n_rows)]
    row_values = np.concatenate([v for v, _ in one])
    row_indices = np.concatenate([i for _, i in one])
    np.testing.assert_array_equal(indices, row_indices)
    assert rel_err(values, row_values) < 1e-12
    # And the chunk boundaries hold the reference code too.
    rows = np.r_[0, chunk_rows - 1, chunk_rows, 2 * chunk_rows, n_rows - 1]
    ref_values, ref_indices = ref.encode(X[rows], sae.W_enc_, sae.b_enc_, sae.b_dec_, 4)
    np.testing.assert_array_equal(indices[rows], ref_indices)
    assert rel_err(values[rows], ref_values) < 1e-10


@pytest.mark.parametrize("model_dtype", ["float32", "float64"])
def test_any_float_dtype_and_memory_order_gives_the_same_code(small_data, model_dtype):
    sae = fitted(small_data.X, dtype=model_dtype, epochs=1)
    base = np.asarray(small_data.X[:60], dtype=np.float16)  # exactly representable everywhere
    expected = sae.encode(np.ascontiguousarray(base, dtype=model_dtype))
    expected_hat = sae.reconstruct(np.ascontiguousarray(base, dtype=model_dtype))
    wide = np.zeros((120, 32), dtype=np.float64)
    wide[::2, ::2] = base
    variants = {
        "float16": base,
        "float32": base.astype(np.float32),
        "float64": base.astype(np.float64),
        "fortran": np.asfortranarray(base, dtype=np.float64),
        "fortran32": np.asfortranarray(base, dtype=np.float32),
        "strided": wide[::2, ::2],
        "reversed": base.astype(model_dtype)[::-1][::-1],
        "list": base.astype(np.float64).tolist(),
    }
    for name, X in variants.items():
        values, indices = sae.encode(X)
        np.testing.assert_array_equal(indices, expected.indices, err_msg=name)
        np.testing.assert_array_equal(values, expected.values, err_msg=name)
        np.testing.assert_array_equal(sae.reconstruct(X), expected_hat, err_msg=name)


def test_fit_accepts_any_float_dtype_and_layout(small_data):
    X = small_data.X[:500].astype(np.float16)
    a = fitted(np.ascontiguousarray(X, dtype=np.float32), epochs=1, fit_kwargs={"shuffle": False})
    b = fitted(np.asfortranarray(X), epochs=1, fit_kwargs={"shuffle": False})
    for name, w in weights_of(a).items():
        np.testing.assert_array_equal(w, weights_of(b)[name], err_msg=name)


def test_default_thread_count_runs(small_data):
    sae = fitted(small_data.X[:300], n_threads=None, epochs=1)
    assert sae.n_threads is None
    assert np.isfinite(sae.score(small_data.X[:300]))


# --------------------------------------------------------------------------------- options
@pytest.mark.parametrize("init", ["tied", "xavier", "he"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_init_and_activation_trains(small_data, init, activation):
    sae = fitted(small_data.X, init=init, activation=activation, epochs=4)
    loss = sae.history_["loss"]
    assert np.all(np.isfinite(loss))
    # softmax codes sum to 1 per sample, which bounds how far unit-norm decoder rows can
    # reach: it learns more slowly (measured 0.62x here after 4 epochs).
    assert loss[-1] < (0.7 if activation == "softmax" else 0.6) * loss[0]


@pytest.mark.parametrize("init", ["tied", "xavier", "he"])
def test_inits_differ(small_data, init):
    sae = initialised(small_data.X[:10], n_latents=48, k=3, init=init)
    if init == "tied":
        np.testing.assert_allclose(sae.W_enc_, sae.W_dec_.T, atol=1e-15)
    else:
        assert not np.allclose(sae.W_enc_, sae.W_dec_.T)
    np.testing.assert_allclose(np.linalg.norm(sae.W_dec_, axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("optimizer,options,lr,ratio", [
    ("adam", {}, 1e-2, 0.5),
    ("adamw", {"weight_decay": 0.01}, 1e-2, 0.5),
    ("sgd", {"momentum": 0.0}, 1.0, 0.8),
    ("sgd", {"momentum": 0.9}, 1.0, 0.6),
    ("sgd", {"momentum": 0.9, "nesterov": True}, 1.0, 0.6),
    ("sgd", {"momentum": 0.9, "weight_decay": 1e-4}, 1.0, 0.6),
])
def test_every_optimizer_reduces_the_loss(small_data, optimizer, options, lr, ratio):
    sae = ksae.SparseAutoencoder(n_latents=48, k=3, random_state=0, n_threads=1)
    sae.fit(small_data.X, epochs=5, batch_size=64, lr=lr, optimizer=optimizer, **options)
    loss = sae.history_["loss"]
    assert loss[-1] < ratio * loss[0]


def test_adamw_weight_decay_differs_from_adam(small_data):
    X = small_data.X[:512]
    plain = fitted(X, epochs=2, fit_kwargs={"optimizer": "adam", "weight_decay": 0.5})
    decayed = fitted(X, epochs=2, fit_kwargs={"optimizer": "adamw", "weight_decay": 0.5})
    # adam ignores weight_decay (documented); adamw shrinks the encoder weights.
    assert np.linalg.norm(decayed.W_enc_) < np.linalg.norm(plain.W_enc_)
    unused = fitted(X, epochs=2, fit_kwargs={"optimizer": "adam"})
    np.testing.assert_array_equal(unused.W_enc_, plain.W_enc_)


def diverging_fit(small_data):
    X = small_data.X[:256] * np.float32(1e30)  # finite, but its squared error overflows
    sae = ksae.SparseAutoencoder(n_latents=48, k=3, random_state=0, n_threads=1)
    with pytest.raises(FloatingPointError, match="diverged at step 1"):
        sae.fit(X, epochs=3, batch_size=64, lr=1e-2)
    assert sae.n_iter_ == 0
    assert all(np.all(np.isfinite(w)) for w in weights_of(sae).values())


def test_divergence_raises_floating_point_error(small_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        diverging_fit(small_data)


def test_divergence_raises_floating_point_error_without_a_warning(small_data):
    # The loss is checked and a non-finite one raises a FloatingPointError that says what to
    # do; the overflow on the way there should not also surface as a RuntimeWarning (which
    # turns into the error instead under -W error, as in this suite).
    diverging_fit(small_data)


def test_concurrent_encodes_on_one_model_do_not_interfere(rng):
    # The kernels release the GIL, so one model can serve encode/transform calls from several
    # Python threads at once; each call must get its own answer.
    import threading

    X = rng.standard_normal((1200, 32)).astype(np.float32)
    sae = ksae.SparseAutoencoder(n_latents=256, k=8, random_state=0, n_threads=1)
    sae.partial_fit(X[:128], lr=1e-2)
    parts = [X[:600], X[600:]]
    expected = [sae.encode(part).indices for part in parts]
    mismatches = []

    def work(part, want):
        for _ in range(15):
            if not np.array_equal(sae.encode(part).indices, want):
                mismatches.append(1)

    threads = [threading.Thread(target=work, args=pair) for pair in zip(parts, expected)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not mismatches, f"{len(mismatches)} of 30 concurrent encodes came back wrong"
