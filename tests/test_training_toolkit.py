"""Training features of fit: validation, early stopping, schedules, clipping, history,
b_dec initialisation and firing statistics. Each test fails when its feature is removed."""

from __future__ import annotations

import numpy as np
import pytest

import ksae
from ksae.dead_latents import auxk_backward
from ksae.hygiene import geometric_median
from ksae.schedules import make_schedule
from ksae.steps import train_step


@pytest.fixture
def data():
    return ksae.make_sparse_dictionary(n_samples=1200, d_in=16, n_components=24, n_active=3,
                                       noise=0.01, random_state=3)


def small_model(**kw):
    kw.setdefault("n_latents", 48)
    kw.setdefault("k", 3)
    kw.setdefault("random_state", 0)
    return ksae.SparseAutoencoder(**kw)


def params_of(sae):
    return {name: p.copy() for name, p in sae.state_.params.items()}


def test_history_records_every_figure_per_epoch(data):
    sae = small_model().fit(data.X[:1000], epochs=3, batch_size=100, validation_data=data.X[1000:])
    h = sae.history_
    for key in ("epoch", "step", "loss", "fve", "l0", "dead_fraction", "lr", "time",
                "val_loss", "val_fve", "val_l0", "val_dead_fraction"):
        assert len(h[key]) == 3, key
    assert h["step"] == [10, 20, 30]
    assert h["l0"][-1] == pytest.approx(3.0)
    # fve is the training fraction of variance explained over the epoch: consistent with loss
    X = data.X[:1000].astype(np.float64)
    variance = np.sum((X - X.mean(0)) ** 2) / X.size
    assert h["fve"][-1] == pytest.approx(1 - h["loss"][-1] / variance, rel=1e-6)


def test_validation_split_holds_out_a_random_fraction(data):
    sae = small_model().fit(data.X, epochs=2, batch_size=100, validation_split=0.25)
    assert "val_loss" in sae.history_
    assert sae.history_["step"][-1] == 2 * 9  # 900 training samples, 9 batches per epoch
    with pytest.raises(ValueError, match="validation_split"):
        small_model().fit(data.X, epochs=1, validation_split=0.2, validation_data=data.X[:10])
    with pytest.raises(ValueError, match="validation_split"):
        small_model().fit(data.X, epochs=1, validation_split=1.5)


def test_early_stopping_stops_and_restores_the_best_weights(data):
    snapshots = {}
    sae = small_model()
    # No epoch after the first can improve by 1e9, so training stops after `patience` more.
    sae.fit(data.X[:1000], epochs=10, batch_size=100, validation_data=data.X[1000:],
            early_stopping_patience=2, early_stopping_min_delta=1e9,
            callback=lambda r: snapshots.setdefault(r["epoch"], params_of(sae)))
    assert sae.stopped_epoch_ == 3 and sae.best_epoch_ == 1
    assert len(sae.history_["epoch"]) == 3
    for name, p in sae.state_.params.items():
        np.testing.assert_array_equal(p, snapshots[1][name])


def test_early_stopping_without_restore_keeps_the_last_weights(data):
    snapshots = {}
    sae = small_model()
    sae.fit(data.X[:1000], epochs=10, batch_size=100, validation_data=data.X[1000:],
            early_stopping_patience=2, early_stopping_min_delta=1e9, restore_best_weights=False,
            callback=lambda r: snapshots.__setitem__(r["epoch"], params_of(sae)))
    assert not np.array_equal(sae.state_.params["W_dec"], snapshots[1]["W_dec"])
    np.testing.assert_array_equal(sae.state_.params["W_dec"], snapshots[3]["W_dec"])


def test_early_stopping_needs_validation(data):
    with pytest.raises(ValueError, match="early_stopping_patience"):
        small_model().fit(data.X, epochs=2, early_stopping_patience=1)


def test_early_stopping_lets_an_improving_run_finish(data):
    sae = small_model().fit(data.X[:1000], epochs=4, batch_size=100, lr=3e-3,
                            validation_data=data.X[1000:], early_stopping_patience=2)
    assert len(sae.history_["epoch"]) == 4
    assert not hasattr(sae, "stopped_epoch_")


@pytest.mark.parametrize("schedule,extra", [
    ("constant", {}), ("step", {"lr_step_size": 7, "lr_gamma": 0.5}),
    ("exponential", {"lr_gamma": 0.9}), ("cosine", {"min_lr": 1e-5}),
])
def test_the_schedule_sets_the_learning_rate_of_every_step(data, schedule, extra):
    seen = []
    sae = small_model()
    sae.fit(data.X[:1000], epochs=3, batch_size=100, lr=1e-2, schedule=schedule, warmup_steps=4,
            log_every=1, callback=lambda r: r["event"] == "step" and seen.append((r["step"], r["lr"])),
            **extra)
    expected = make_schedule(schedule, 1e-2, total_steps=30, warmup_steps=4,
                             step_size=extra.get("lr_step_size", 1000),
                             gamma=extra.get("lr_gamma", 0.5), min_lr=extra.get("min_lr", 0.0))
    assert [s for s, _ in seen] == list(range(1, 31))
    np.testing.assert_allclose([lr for _, lr in seen], [expected(s - 1) for s, _ in seen])
    assert seen[0][1] == pytest.approx(1e-2 / 4)  # warm-up starts low


def test_gradient_clipping_bounds_each_update(data):
    # Plain SGD without decoder renormalisation: an update is exactly lr * clipped gradient,
    # so its global norm is at most lr * max_norm.
    sae = small_model(normalize_decoder=False)
    sae.partial_fit(data.X[:100], lr=1e-12, optimizer="sgd", momentum=0.0)
    before = params_of(sae)
    sae._optimizer.lr = 1.0
    train_step(sae.state_, data.X[100:200], sae._optimizer, ksae.TrainConfig(clip_grad_norm=1e-3))
    change = np.sqrt(sum(np.sum((sae.state_.params[n].astype(np.float64) - before[n]) ** 2) for n in before))
    assert change == pytest.approx(1e-3, rel=1e-3)


def test_clipping_through_fit_changes_training(data):
    a = small_model().fit(data.X, epochs=1, batch_size=100, optimizer="sgd", lr=0.1)
    b = small_model().fit(data.X, epochs=1, batch_size=100, optimizer="sgd", lr=0.1, clip_grad_norm=1e-4)
    assert not np.allclose(a.W_dec_, b.W_dec_)
    # With so small a clip the decoder barely moves from its initial weights.
    init = small_model(); init.partial_fit(data.X[:100], lr=1e-12)
    assert np.abs(b.W_enc_ - init.W_enc_).max() < np.abs(a.W_enc_ - init.W_enc_).max() / 10


def test_log_every_records_step_history_and_calls_back(data):
    events = []
    sae = small_model().fit(data.X[:1000], epochs=2, batch_size=100, log_every=4,
                            callback=lambda r: events.append(r["event"]))
    assert sae.step_history_["step"] == [4, 8, 12, 16, 20]
    assert events.count("step") == 5 and events.count("epoch") == 2
    assert all(v == pytest.approx(3.0) for v in sae.step_history_["l0"])


def test_b_dec_init_mean(data):
    sae = small_model(b_dec_init="mean")
    sae.partial_fit(data.X, lr=1e-12)
    np.testing.assert_allclose(sae.b_dec_, data.X.mean(axis=0), atol=1e-5)
    sae = small_model()
    sae.partial_fit(data.X, lr=1e-12)
    np.testing.assert_allclose(sae.b_dec_, 0, atol=1e-5)


def test_b_dec_init_geometric_median_resists_outliers(rng):
    X = rng.standard_normal((500, 4)) * 0.1 + 1.0
    X[:20] += 1000.0  # a few wild samples drag the mean, not the median
    median = geometric_median(X)
    assert np.linalg.norm(median - 1.0) < 0.05
    assert np.linalg.norm(X.mean(axis=0) - 1.0) > 10
    sae = small_model(n_latents=8, k=2, b_dec_init="geometric_median")
    sae.partial_fit(X.astype(np.float32), lr=1e-12)
    np.testing.assert_allclose(sae.b_dec_, median, atol=1e-4)


def test_samples_since_fired_counts_per_latent(data):
    sae = small_model()
    sae.partial_fit(data.X[:100])
    sae.partial_fit(data.X[100:150])
    counts = sae.samples_since_fired_
    assert counts.max() <= 150 and counts.min() == 0
    assert set(np.unique(counts)) <= {0, 50, 150}
    assert np.sum(counts == 0) >= 3  # the last batch's active latents


# ------------------------------------------------------------------ dead latents and k
def dying_problem():
    """Many planted directions and a learning rate high enough to kill about half of the
    latents in the first epoch (measured: 53% dead after 5 epochs without a remedy)."""
    data = ksae.make_sparse_dictionary(n_samples=4000, d_in=32, n_components=256, n_active=3,
                                       noise=0.01, random_state=5)
    return data.X, dict(epochs=5, batch_size=100, lr=3e-2, dead_after_samples=400)


def test_auxk_lowers_the_dead_fraction():
    X, common = dying_problem()
    plain = small_model(n_latents=256, k=3).fit(X, **common)
    auxk = small_model(n_latents=256, k=3).fit(X, auxk_coef=1 / 32, auxk_k=32, **common)
    assert plain.history_["dead_fraction"][-1] > 0.4  # the case kills latents
    assert max(auxk.history_["auxk_loss"]) > 0
    assert auxk.history_["dead_fraction"][-1] < 0.1
    assert auxk.history_["loss"][-1] < plain.history_["loss"][-1]


def test_auxk_is_off_without_dead_latents(data):
    sae = small_model().fit(data.X, epochs=1, batch_size=100, auxk_coef=1.0,
                            dead_after_samples=10**9)
    assert sae.history_["auxk_loss"] == [0.0]


def test_auxk_gradient_matches_finite_differences(rng):
    # The AuxK loss of a fixed selection of dead latents, as a function of the weights.
    B, d, n, k, k_aux = 5, 4, 12, 2, 3
    X = rng.standard_normal((B, d))
    sae = ksae.SparseAutoencoder(n_latents=n, k=k, activation="tanh", dtype="float64",
                                 random_state=0, normalize_decoder=False)
    sae.partial_fit(X, lr=1e-12, optimizer="sgd", momentum=0.0)
    p, dead = sae.state_.params, np.arange(n) % 2 == 1
    sae.samples_since_fired_[:] = np.where(dead, 10**6, 0)
    ws = sae.state_.buffers(B, pre=True)
    v, i = ksae._core.encode(X, p["W_enc_t"], p["b_enc"], p["b_dec"], k, "tanh", 1, ws["centered"], ws["pre"])
    X_hat = ksae._core.decode(v, i, p["W_dec"], p["b_dec"], 1)
    e = X - X_hat
    for g in sae.state_.grads.values():
        g[...] = 0
    loss = auxk_backward(sae.state_, 2 * (X_hat - X) / X.size, ws,
                         ksae.TrainConfig(auxk_coef=1.0, auxk_k=k_aux, dead_after_samples=1))
    _, sel = ksae._core.select_topk(ws["pre"], np.where(dead, p["b_enc"], -np.inf), k_aux, "tanh", 1)

    def aux_loss():
        pre = (X - p["b_dec"]) @ p["W_enc_t"].T + p["b_enc"]
        Z = np.zeros((B, n))
        np.put_along_axis(Z, sel, np.tanh(np.take_along_axis(pre, sel, 1)), 1)
        return np.sum((Z @ p["W_dec"] - e) ** 2) / np.sum((e - e.mean(0)) ** 2)

    assert loss == pytest.approx(aux_loss(), rel=1e-12)
    for name, param in p.items():
        flat, numeric = param.reshape(-1), np.zeros(param.size)
        for j in range(flat.size):
            old = flat[j]
            flat[j] = old + 1e-6
            up = aux_loss()
            flat[j] = old - 1e-6
            numeric[j] = (up - aux_loss()) / 2e-6
            flat[j] = old
        np.testing.assert_allclose(sae.state_.grads[name].reshape(-1), numeric, atol=1e-8, err_msg=name)


def test_resampling_revives_dead_latents():
    X, common = dying_problem()
    plain = small_model(n_latents=256, k=3).fit(X, **common)
    resampled = small_model(n_latents=256, k=3).fit(X, resample_every=20, **common)
    assert sum(resampled.history_["resampled"]) > 0
    assert sum(plain.history_["resampled"]) == 0
    assert plain.history_["dead_fraction"][-1] > 0.4
    assert resampled.history_["dead_fraction"][-1] < 0.1
    np.testing.assert_allclose(np.linalg.norm(resampled.W_dec_, axis=1), 1, atol=1e-5)


def test_k_curriculum_anneals_k_over_the_set_fraction(data):
    sae = small_model().fit(data.X[:1000], epochs=2, batch_size=100, k_start=12,
                            k_anneal_fraction=0.5, log_every=1)
    ks, l0 = sae.step_history_["k"], sae.step_history_["l0"]
    assert ks[0] == 12 and ks[-1] == 3
    assert ks == sorted(ks, reverse=True)
    assert all(k == 3 for k in ks[10:])  # annealed by half of the 20 steps
    assert l0[0] > 8 and l0[-1] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="k_start"):
        small_model().fit(data.X, epochs=1, k_start=2)


# ----------------------------------------------------------------------------- batchtopk
def test_batchtopk_keeps_k_times_batch_latents_per_batch(data):
    sae = small_model(sparsity="batchtopk")
    sae.partial_fit(data.X[:100], lr=1e-12)
    result = train_step(sae.state_, data.X[100:200], sae._optimizer)
    assert result.values.shape == (100, 12)  # candidates: max_k = 4k per sample
    assert np.count_nonzero(result.values) == 3 * 100  # the batch's budget, spread unevenly
    per_sample = np.count_nonzero(result.values, axis=1)
    assert per_sample.min() < 3 < per_sample.max()


def test_batchtopk_inference_threshold_makes_encoding_independent_of_the_batch(data):
    sae = small_model(sparsity="batchtopk").fit(data.X[:1000], epochs=5, batch_size=100)
    assert sae.threshold_ is not None and sae.threshold_ > 0
    batch_code = sae.encode(data.X[1000:])
    single = [sae.encode(data.X[i:i + 1]) for i in range(1000, 1200)]
    # The same code one sample at a time (up to the product's rounding for 1 row vs many).
    np.testing.assert_allclose(np.concatenate([c.values for c in single]), batch_code.values,
                               rtol=1e-5, atol=1e-6)
    l0_single = np.mean([np.count_nonzero(c.values) for c in single])
    l0_batch = np.count_nonzero(batch_code.values, axis=1).mean()
    assert l0_single == pytest.approx(l0_batch, abs=0.05)
    assert 0.8 * 3 <= l0_batch <= 1.25 * 3  # on average about k, as in training
    train_l0 = np.count_nonzero(sae.encode(data.X[:1000]).values, axis=1).mean()
    assert train_l0 == pytest.approx(3, abs=0.01)  # calibrated on the training data
    topk = small_model().fit(data.X[:1000], epochs=5, batch_size=100)
    assert sae.score(data.X[1000:]) > 0.75 * topk.score(data.X[1000:])  # measured 0.40 vs 0.48


def test_batchtopk_threshold_round_trips_and_needs_relu(data, tmp_path):
    sae = small_model(sparsity="batchtopk").fit(data.X[:500], epochs=1, batch_size=100)
    loaded = ksae.load(sae.save(tmp_path / "m"))
    assert loaded.threshold_ == sae.threshold_
    np.testing.assert_array_equal(loaded.encode(data.X[:20]).values, sae.encode(data.X[:20]).values)
    with pytest.raises(ValueError, match="batchtopk needs 'relu'"):
        small_model(sparsity="batchtopk", activation="tanh").fit(data.X, epochs=1)


def two_pass_variance(X):
    X64 = X.astype(np.float64)
    return float(((X64 - X64.mean(axis=0)) ** 2).sum())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 5), (3, 1), (40, 7), (3000, 33), (20000, 17)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_total_variance_matches_the_two_pass_sum(rng, dtype, shape, n_threads):
    # fve's denominator: the shortcut (sum of squares less n * |mean|^2) agrees with the
    # deviations summed in float64 (the largest shape spans several of squared_norm's chunks).
    from ksae.batches import total_variance

    X = np.ascontiguousarray(rng.standard_normal(shape) * 3 + rng.standard_normal(shape[1]),
                             dtype=dtype)
    expected = two_pass_variance(X)
    assert total_variance(X, n_threads) == pytest.approx(expected, rel=1e-10, abs=1e-300)


@pytest.mark.parametrize("offset", [30.0, 1e4, 1e8])
def test_total_variance_far_from_zero_keeps_its_digits(rng, offset):
    # At 30 the shortcut's difference stands; at 1e4 and 1e8 it would lose 8 and every
    # digit in float64 (sum(X**2) ~ 1e19 against 3000), so the deviations are summed.
    from ksae.batches import total_variance

    X = rng.standard_normal((3000, 6)) + offset
    assert total_variance(X) == pytest.approx(two_pass_variance(X), rel=1e-9)


def test_total_variance_of_constant_columns_is_zero():
    from ksae.batches import total_variance

    X = np.tile(np.float32([1.5, -2.0, 0.0]), (64, 1))
    assert total_variance(X) == 0.0
