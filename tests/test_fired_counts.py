"""The samples-since-fired counts: ``_core.mark_fired`` against the NumPy it replaced, and
the model's counts after real steps.

``mark_fired`` advances every count by the batch size and zeroes the latents that a code
entry holds actively (non-zero values; above SIGMOID_ACTIVE for sparsity 'kl'). Dead-latent
detection (AuxK, resampling, the dead fraction in the history) reads these counts, so an
off-by-one or a missed latent would change training without failing a loss test.
"""

import numpy as np
import pytest

import ksae
from ksae import _core
from ksae.steps import train_step
from ksae.sparsity import SIGMOID_ACTIVE, active_mask, active_threshold


def numpy_mark_fired(counts, values, indices, n_samples, above):
    """What the model did in NumPy before mark_fired."""
    out = counts + n_samples
    active = values != 0 if above is None else values > above
    out[indices[active]] = 0
    return out


def code(rng, batch, k, n_latents, dtype, zeros=0.3):
    indices = np.stack([rng.choice(n_latents, k, replace=False) for _ in range(batch)])
    values = rng.standard_normal((batch, k)).astype(dtype)
    values[rng.random((batch, k)) < zeros] = 0
    return values, indices.astype(np.int64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("above", [None, SIGMOID_ACTIVE, -0.25])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 3, 10), (64, 16, 200), (5, 4, 4)])
def test_mark_fired_matches_numpy(rng, dtype, above, shape):
    batch, k, n_latents = shape
    counts = rng.integers(0, 1000, n_latents).astype(np.int64)
    values, indices = code(rng, batch, k, n_latents, dtype)
    expected = numpy_mark_fired(counts, values, indices, batch, above)
    _core.mark_fired(counts, values, indices, batch, above)
    np.testing.assert_array_equal(counts, expected)


def test_mark_fired_counts_nan_as_non_zero_and_never_above(rng):
    values = np.array([[np.nan, 0.0], [np.nan, 1.0]], dtype=np.float32)
    indices = np.array([[0, 1], [2, 3]])
    for above in (None, 0.5):
        counts = np.full(5, 7, dtype=np.int64)
        _core.mark_fired(counts, values, indices, 2, above)
        np.testing.assert_array_equal(counts, numpy_mark_fired(np.full(5, 7), values, indices, 2, above))


def test_mark_fired_with_an_empty_code_only_advances(rng):
    counts = np.arange(6, dtype=np.int64)
    _core.mark_fired(counts, np.zeros((3, 0), np.float32), np.zeros((3, 0), np.int64), 3)
    np.testing.assert_array_equal(counts, np.arange(6) + 3)


@pytest.mark.parametrize("bad, match", [
    (dict(indices=np.array([[0, 9]])), r"indices: entry \(0, 1\) = 9 is outside \[0, 4\)"),
    (dict(indices=np.array([[0, -1]])), r"indices: entry \(0, 1\) = -1"),
    (dict(indices=np.array([[0, 1, 2]])), r"indices: expected .* shape \(1, 2\)"),
    (dict(indices=np.array([[0, 1]], dtype=np.int32)), r"indices: expected .*int64"),
    (dict(counts=np.zeros(4, dtype=np.int32)), r"counts: expected .*int64"),
    (dict(counts=np.zeros((2, 2), dtype=np.int64)), r"counts: expected .*shape \(\*,\)"),
    (dict(values=np.array([0.5, 1.0])), r"values: expected a 2-D array"),
    (dict(n_samples=-1), r"n_samples: expected a value >= 0"),
    (dict(above="0.5"), r"above: expected a number or None, got str"),
])
def test_mark_fired_refuses_bad_input_and_leaves_the_counts(bad, match):
    args = dict(counts=np.arange(4, dtype=np.int64), values=np.array([[0.5, 1.0]]),
                indices=np.array([[0, 1]]), n_samples=1, above=None)
    args.update(bad)
    before = args["counts"].copy()
    with pytest.raises((TypeError, ValueError), match=match):
        _core.mark_fired(args["counts"], args["values"], args["indices"], args["n_samples"],
                         args["above"])
    np.testing.assert_array_equal(args["counts"], before)


def test_read_only_counts_are_refused():
    counts = np.zeros(4, dtype=np.int64)
    counts.flags.writeable = False
    with pytest.raises(ValueError, match="counts: array is read-only"):
        _core.mark_fired(counts, np.ones((1, 2)), np.array([[0, 1]]), 1)


@pytest.mark.parametrize("sparsity", ["topk", "kl"])
def test_model_counts_follow_its_codes(rng, sparsity):
    # Each step's counts, from the model, against the NumPy update on that step's code.
    X = rng.standard_normal((60, 10)).astype(np.float32)
    kwargs = dict(k=3) if sparsity == "topk" else dict(sparsity="kl", activation="sigmoid")
    sae = ksae.SparseAutoencoder(n_latents=24, random_state=0, **kwargs)
    sae.partial_fit(X[:20])
    cfg = sae.config
    for start in (20, 40):
        batch = X[start:start + 20]
        counts = sae.samples_since_fired_.copy()
        result = train_step(sae.state_, batch, sae._optimizer, ksae.TrainConfig())
        expected = numpy_mark_fired(counts, result.values, result.indices, 20, active_threshold(cfg))
        np.testing.assert_array_equal(sae.samples_since_fired_, expected)
        np.testing.assert_array_equal(result.active, active_mask(result.values, cfg))
    if sparsity == "topk":  # 3 of 24 latents a sample: some fired in the last batch, some not
        assert (sae.samples_since_fired_ == 0).any() and (sae.samples_since_fired_ > 0).any()


# ------------------------------------------------- note_fired: fit's per-span firing record
def numpy_note_fired(fired, values, indices, above):
    """What RunningStats.add did in NumPy before note_fired: (fired after, active count)."""
    out = fired.copy()
    active = values != 0 if above is None else values > above
    out[indices[active]] = True
    return out, int(active.sum())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("above", [None, SIGMOID_ACTIVE, -0.25])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 3, 10), (64, 16, 200), (5, 4, 4), (3, 0, 5)])
def test_note_fired_matches_numpy(rng, dtype, above, shape):
    batch, k, n_latents = shape
    fired = rng.random(n_latents) < 0.2  # some already fired earlier in the span
    if k:
        values, indices = code(rng, batch, k, n_latents, dtype)
    else:
        values, indices = np.zeros((batch, 0), dtype), np.zeros((batch, 0), np.int64)
    expected, count = numpy_note_fired(fired, values, indices, above)
    assert _core.note_fired(fired, values, indices, above) == count
    np.testing.assert_array_equal(fired, expected)


def test_note_fired_counts_nan_as_non_zero_and_never_above():
    values = np.array([[np.nan, 0.0], [np.nan, 1.0]], dtype=np.float32)
    indices = np.array([[0, 1], [2, 3]])
    for above in (None, 0.5):
        fired = np.zeros(5, dtype=bool)
        expected, count = numpy_note_fired(fired, values, indices, above)
        assert _core.note_fired(fired, values, indices, above) == count
        np.testing.assert_array_equal(fired, expected)


@pytest.mark.parametrize("bad, match", [
    (dict(indices=np.array([[0, 9]])), r"indices: entry \(0, 1\) = 9 is outside \[0, 4\)"),
    (dict(indices=np.array([[0, 1]], dtype=np.int32)), r"indices: expected .*int64"),
    (dict(fired=np.zeros(4, dtype=np.uint8)), r"fired: expected a C-contiguous bool array"),
    (dict(fired=np.zeros((2, 2), dtype=bool)), r"fired: expected .*shape \(\*,\)"),
    (dict(values=np.array([[0.5, 1.0]], dtype=np.float16)), r"values: expected .*float64"),
    (dict(above=[0.5]), r"above: expected a number or None, got list"),
])
def test_note_fired_refuses_bad_input_and_leaves_the_record(bad, match):
    args = dict(fired=np.zeros(4, dtype=bool), values=np.array([[0.5, 1.0]]),
                indices=np.array([[0, 1]]), above=None)
    args.update(bad)
    before = args["fired"].copy()
    with pytest.raises((TypeError, ValueError), match=match):
        _core.note_fired(**args)
    np.testing.assert_array_equal(args["fired"], before)


@pytest.mark.parametrize("sparsity", ["topk", "kl", "jumprelu", "batchtopk"])
def test_fit_records_the_latents_its_codes_fired(rng, sparsity):
    # The epoch's l0 and dead fraction, from RunningStats, against the codes of its steps.
    from ksae.progress import RunningStats

    X = rng.standard_normal((60, 10)).astype(np.float32)
    kwargs = dict(k=3) if sparsity != "kl" else dict(sparsity="kl", activation="sigmoid")
    if sparsity in ("jumprelu", "batchtopk"):
        kwargs["sparsity"] = sparsity
    sae = ksae.SparseAutoencoder(n_latents=24, random_state=0, **kwargs)
    sae.partial_fit(X[:20])
    cfg, stats = sae.config, RunningStats(24, 10)
    fired, active = np.zeros(24, dtype=bool), 0
    for start in (20, 40):
        result = train_step(sae.state_, X[start:start + 20], sae._optimizer, ksae.TrainConfig())
        stats.add(result)
        mask = active_mask(result.values, cfg)
        fired[result.indices[mask]] = True
        active += int(mask.sum())
    np.testing.assert_array_equal(stats.fired, fired)
    assert stats.active == active and stats.samples == 40
    record = stats.record(1.0)
    assert record["l0"] == active / 40 and record["dead_fraction"] == 1 - fired.mean()
