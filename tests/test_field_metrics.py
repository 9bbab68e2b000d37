"""Field metrics streamed over rows (``ksae.field_metrics``), held to a direct NumPy
computation in float64 on all the rows at once."""

from __future__ import annotations

import ksae
import numpy as np
import pytest
from ksae.activation_store import ActivationStoreWriter
from ksae.field_metrics import (
    firing_counts,
    log_density_histogram,
    row_batches,
    store_metrics,
)

D, N = 10, 900


@pytest.fixture(scope="module")
def data_and_model():
    """Rows far from the origin (a large mean, where sum x^2 - n mean^2 would cancel) and
    a small model fitted to them."""
    rng = np.random.default_rng(3)
    atoms = rng.standard_normal((16, D))
    X = (rng.exponential(1.0, (N, 16)) * (rng.random((N, 16)) < 0.2)) @ atoms + 300.0
    X = X.astype(np.float32)
    sae = ksae.SparseAutoencoder(n_latents=48, k=3, b_dec_init="mean", random_state=0, n_threads=1)
    sae.fit(X, epochs=5, batch_size=64)
    return X, sae


def direct(sae, X, dense_threshold=0.1):
    """The figures computed on the whole of X at once, from the dense codes."""
    X64 = X.astype(np.float64)
    X_hat = sae.reconstruct(X).astype(np.float64)
    dense = sae.transform(X)
    counts = (dense != 0).sum(axis=0)
    return {"fvu": ((X64 - X_hat) ** 2).sum() / ((X64 - X64.mean(axis=0)) ** 2).sum(),
            "mse": ((X64 - X_hat) ** 2).mean(), "l0": (dense != 0).sum(axis=1).mean(),
            "dead_fraction": (counts == 0).mean(), "dense_fraction": (counts / len(X) > dense_threshold).mean(),
            "relative_reconstruction_bias": (X_hat * X_hat).sum() / (X_hat * X64).sum(),
            "optimal_scale": (X_hat * X64).sum() / (X_hat * X_hat).sum(), "counts": counts}


@pytest.mark.parametrize("batch_size", [1, 7, 128, 5000])
def test_streamed_metrics_match_a_direct_computation(data_and_model, batch_size):
    X, sae = data_and_model
    got, want = store_metrics(sae, X, batch_size=batch_size), direct(sae, X)
    for name in ("fvu", "mse", "l0", "dead_fraction", "dense_fraction",
                 "relative_reconstruction_bias", "optimal_scale"):
        assert got[name] == pytest.approx(want[name], rel=1e-9), name
    assert got["n_rows"] == N
    np.testing.assert_array_equal(got["firing_counts"], want["counts"])
    assert 0 < got["fvu"] < 1 and got["relative_reconstruction_bias"] * got["optimal_scale"] == pytest.approx(1)


def test_sources_an_iterable_and_a_store_give_the_same_figures(data_and_model, tmp_path):
    X, sae = data_and_model
    writer = ActivationStoreWriter(tmp_path / "s", D, shard_rows=128)
    for doc, start in enumerate(range(0, N, 50)):
        rows = X[start:start + 50]
        writer.add(rows, np.zeros(len(rows)), np.full(len(rows), doc), np.arange(len(rows)))
    store = writer.close()
    whole = store_metrics(sae, X)
    for source in (store, iter([X[:100], X[100:]])):
        got = store_metrics(sae, source, batch_size=64)
        assert got["fvu"] == pytest.approx(whole["fvu"], rel=1e-9)
        assert got["firing_counts"] == whole["firing_counts"]
    counts, n = firing_counts(sae, store, batch_size=33)
    assert n == N and counts.tolist() == whole["firing_counts"]


def test_the_log_density_histogram_counts_live_latents_and_dead_ones_apart():
    counts = np.array([0, 0, 1, 10, 100, 1000, 999, 5])
    hist = log_density_histogram(counts, 1000)
    edges = np.array(hist["edges"])
    assert hist["dead"] == 2 and sum(hist["counts"]) == 6
    assert edges[0] <= -3 and edges[-1] == 0 and np.allclose(np.diff(edges), 0.25)
    want, _ = np.histogram(np.log10(counts[counts > 0] / 1000), bins=edges)
    assert hist["counts"] == want.tolist() and hist["counts"][-1] == 2  # density 1 is in the last bin


def test_dense_latents_are_those_above_the_threshold(data_and_model):
    X, sae = data_and_model
    counts = np.array(store_metrics(sae, X)["firing_counts"])
    for threshold in (0.0, 0.05, 0.3, 1.0):
        got = store_metrics(sae, X, dense_threshold=threshold)["dense_fraction"]
        assert got == pytest.approx(np.mean(counts / N > threshold))


def test_bad_arguments_are_named(data_and_model):
    X, sae = data_and_model
    with pytest.raises(ValueError, match="dense_threshold"):
        store_metrics(sae, X, dense_threshold=2)
    with pytest.raises(ValueError, match="batch_size"):
        store_metrics(sae, X, batch_size=0)
    with pytest.raises(ValueError, match="rows_source: expected at least one row"):
        store_metrics(sae, [])
    with pytest.raises(ValueError, match="every feature is constant"):
        store_metrics(sae, np.ones((5, D), np.float32))
    with pytest.raises(TypeError, match="rows_source"):
        list(row_batches(3, 10))
