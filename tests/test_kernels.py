"""The C++ kernels (``ksae._core``) held to the float64 NumPy reference (``ksae.reference``)."""

from __future__ import annotations

import platform
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ksae import _core
from ksae import reference as ref
from ksae.losses import mse_loss

from conftest import ACTIVATIONS, DTYPES, THREADS, as64, make_weights, rel_err, tol

# (batch, d_in, n_latents, k): k=1, k=n_latents, batch 1, d_in not a multiple of 8 or 16,
# n_latents small and medium (above and below the selection buffer's capacity).
SHAPES = [
    (1, 13, 7, 1),
    (1, 13, 7, 7),
    (4, 29, 7, 3),
    (5, 29, 50, 1),
    (9, 37, 50, 8),
    (17, 37, 50, 50),
    (33, 13, 300, 1),
    (33, 37, 300, 17),
    (20, 29, 300, 300),
    (64, 16, 300, 90),
]
SHAPE_IDS = [f"B{b}-d{d}-n{n}-k{k}" for b, d, n, k in SHAPES]

SAFE_GAP = 1e-3
"""Rows whose reference k-th and (k+1)-th pre-activations are this far apart have one
correct top-k even in float32."""


def encode_inputs(rng, batch, d_in, n_latents, dtype):
    p = make_weights(rng, d_in, n_latents, dtype, bias_scale=0.5)
    X = np.ascontiguousarray(rng.standard_normal((batch, d_in)), dtype=dtype)
    return X, p


def reference_pre(X, p):
    """float64 pre-activations from the same (possibly float32) inputs."""
    X64, W, be, bd = as64(X, p["W_enc_t"], p["b_enc"], p["b_dec"])
    return ref.pre_activations(X64, W.T, be, bd)


def assert_topk_up_to_rounding(indices, scores, pre):
    """Every chosen score is at least every unchosen one, up to float32 rounding of the
    product that made pre."""
    slack = 1e-4 * max(1.0, float(np.abs(pre).max()))
    chosen = np.take_along_axis(scores, indices, axis=1)
    unselected = scores.copy()
    np.put_along_axis(unselected, indices, -np.inf, axis=1)
    assert np.all(chosen.min(axis=1) >= unselected.max(axis=1) - slack)


def sorted_gaps(pre, k):
    """Per row, the gap between the k-th and (k+1)-th largest entries (inf when k = n)."""
    s = -np.sort(-pre, axis=1)
    if k >= pre.shape[1]:
        return np.full(pre.shape[0], np.inf)
    return s[:, k - 1] - s[:, k]


# --------------------------------------------------------------------------------- encode
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("keep_pre", [False, True], ids=["fused", "materialised"])
def test_encode_matches_reference(rng, shape, activation, n_threads, dtype, keep_pre):
    batch, d_in, n, k = shape
    X, p = encode_inputs(rng, batch, d_in, n, dtype)
    centered = np.empty_like(X)
    pre_buffer = np.empty((batch, n), dtype=dtype) if keep_pre else None
    values, indices = _core.encode(X, p["W_enc_t"], p["b_enc"], p["b_dec"], k, activation,
                                   n_threads, centered, pre_buffer)
    assert values.shape == indices.shape == (batch, k)
    assert values.dtype == dtype and indices.dtype == np.int64
    np.testing.assert_array_equal(centered, X - p["b_dec"])

    pre = reference_pre(X, p)
    scores = ref.selection_scores(pre, activation)  # what the top-k ranks

    def act(x):
        return ref.activate_selected(x, activation)

    if dtype == np.float64:
        ref_values, ref_indices = ref.encode(*as64(X, p["W_enc_t"].T, p["b_enc"], p["b_dec"]),
                                             k, activation)
        np.testing.assert_array_equal(indices, ref_indices)
        assert rel_err(values, ref_values) < tol(dtype)
    else:
        # The values are the activations of the pre-activations the kernel chose.
        chosen_pre = np.take_along_axis(pre, indices, axis=1)
        assert rel_err(values, act(chosen_pre)) < tol(dtype)
        # Every index distinct, and the choice a top-k up to float32 rounding of the product.
        assert all(len(set(row)) == k for row in indices.tolist())
        assert_topk_up_to_rounding(indices, scores, pre)
        # Rows where no rounding can swap the k-th and (k+1)-th: the exact reference set, and
        # the exact reference order where consecutive selected entries are well apart too.
        ref_indices = ref.topk_indices(scores, k)
        top = -np.sort(-scores, axis=1)[:, : min(k + 1, n)]
        clear_set = sorted_gaps(scores, k) > SAFE_GAP
        clear_order = clear_set & (np.all(-np.diff(top, axis=1) > SAFE_GAP, axis=1)
                                   if top.shape[1] > 1 else True)
        for r in np.flatnonzero(clear_set):
            assert set(indices[r]) == set(ref_indices[r]), f"row {r}"
        np.testing.assert_array_equal(indices[clear_order], ref_indices[clear_order])

    # Values in decreasing order (the activations are monotone).
    assert np.all(np.diff(values, axis=1) <= 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("n_latents,k", [(7, 3), (50, 1), (50, 25), (300, 1), (300, 40),
                                         (300, 150), (300, 300), (1000, 100)])
def test_encode_ties_keep_the_lowest_index(rng, dtype, n_threads, n_latents, k):
    # W_enc = 0 makes pre = b_enc exactly, for every row; b_enc holds few distinct values,
    # so almost every comparison is a tie.
    batch, d_in = 6, 13
    X = np.ascontiguousarray(rng.standard_normal((batch, d_in)), dtype=dtype)
    W_enc_t = np.zeros((n_latents, d_in), dtype=dtype)
    b_enc = rng.integers(-2, 3, n_latents).astype(dtype)
    b_dec = np.zeros(d_in, dtype=dtype)
    values, indices = _core.encode(X, W_enc_t, b_enc, b_dec, k, "linear", n_threads)
    pre = np.broadcast_to(b_enc, (batch, n_latents))
    expected = np.argsort(-pre, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(values, np.take_along_axis(pre, expected, axis=1))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("k", [1, 5, 64, 200])
def test_encode_all_equal_pre_activations(dtype, k):
    # One tie across the whole row: the first k latents, in index order.
    n_latents, d_in = 200, 16
    X = np.ones((3, d_in), dtype=dtype)
    zeros = np.zeros((n_latents, d_in), dtype=dtype)
    _, indices = _core.encode(X, zeros, np.full(n_latents, 0.25, dtype=dtype),
                              np.zeros(d_in, dtype=dtype), k, "relu", 1)
    np.testing.assert_array_equal(indices, np.tile(np.arange(k), (3, 1)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("n_latents,k", [(7, 3), (50, 4), (300, 1), (300, 40), (300, 300),
                                         (1000, 100)])
def test_encode_infinities_and_nan(rng, dtype, n_threads, n_latents, k):
    # Documented: the order is stable_argsort(-pre) with NaN counted as -inf; infinities
    # are ordinary values (and tie with each other like any equal values).
    batch, d_in = 5, 13
    X = np.ascontiguousarray(rng.standard_normal((batch, d_in)), dtype=dtype)
    choices = np.array([-np.inf, -1.0, 0.0, 2.0, np.inf, np.nan])
    b_enc = choices[rng.integers(0, len(choices), n_latents)].astype(dtype)
    zeros = np.zeros((n_latents, d_in), dtype=dtype)
    values, indices = _core.encode(X, zeros, b_enc, np.zeros(d_in, dtype=dtype), k, "linear",
                                   n_threads)
    key = np.where(np.isnan(b_enc), -np.inf, b_enc)
    expected = np.tile(np.argsort(-key, kind="stable")[:k], (batch, 1))
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(values, b_enc[expected])  # NaN where a NaN was kept


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n_latents,k", [(64, 1), (64, 8), (300, 3), (300, 100), (1024, 32)])
def test_encode_ties_at_the_kth_value_across_the_row(dtype, n_latents, k):
    # Rows that are constant but for a few larger entries scattered through the row (at
    # either end and in the middle): the k-th value is tied by many entries, and the
    # lowest-indexed ones must fill the code.
    d_in = 8
    rows = []
    for spots in ([n_latents - 1], [0, n_latents // 2, n_latents - 1], list(range(1, n_latents, 37)),
                  []):
        b = np.zeros(n_latents)
        b[spots] = 1.0 + np.arange(len(spots))
        rows.append(b)
    for b in rows:
        b = b.astype(dtype)
        X = np.ones((2, d_in), dtype=dtype)
        _, indices = _core.encode(X, np.zeros((n_latents, d_in), dtype=dtype), b,
                                  np.zeros(d_in, dtype=dtype), k, "relu", 1)
        expected = np.argsort(-b, kind="stable")[:k]
        np.testing.assert_array_equal(indices, np.tile(expected, (2, 1)))


@settings(derandomize=True, database=None, deadline=None, max_examples=60)
@given(data=st.data(), batch=st.integers(1, 9), d_in=st.integers(1, 40),
       n_latents=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       activation=st.sampled_from([a for a in ACTIVATIONS if a not in ref.NON_MONOTONE]))
def test_encode_exact_on_integer_data(data, batch, d_in, n_latents, dtype, activation):
    # Small integers make every pre-activation an exact integer in both precisions, whatever
    # order the product sums in: the selection must be exactly stable_argsort(-pre)[:k]
    # (ties abound), for any thread count.
    k = data.draw(st.integers(1, n_latents), label="k")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    X = rng.integers(-3, 4, (batch, d_in)).astype(dtype)
    W_enc_t = rng.integers(-2, 3, (n_latents, d_in)).astype(dtype)
    b_enc = rng.integers(-3, 4, n_latents).astype(dtype)
    b_dec = rng.integers(-1, 2, d_in).astype(dtype)
    pre = (X.astype(np.int64) - b_dec.astype(np.int64)) @ W_enc_t.astype(np.int64).T + b_enc.astype(np.int64)
    expected = np.argsort(-pre, axis=1, kind="stable")[:, :k]
    want_values = ref.activate_selected(np.take_along_axis(pre, expected, axis=1).astype(np.float64),
                                        activation)
    for n_threads in THREADS:
        values, indices = _core.encode(X, W_enc_t, b_enc, b_dec, k, activation, n_threads)
        np.testing.assert_array_equal(indices, expected)
        assert rel_err(values, want_values) < tol(dtype)


def test_reference_topk_matches_stable_argsort(rng):
    # The reference itself: argpartition-based selection equals the stable argsort.
    pre = rng.integers(-3, 4, (20, 70)).astype(np.float64)
    for k in (1, 2, 10, 69, 70):
        np.testing.assert_array_equal(ref.topk_indices(pre, k),
                                      np.argsort(-pre, axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(1, 13, 50, 5), (7, 29, 7, 3), (16, 37, 300, 20)],
                         ids=lambda s: "B{}-d{}-n{}-k{}".format(*s))
def test_encode_same_for_one_and_two_threads_single_row_or_single_block(rng, dtype, shape):
    # Where the product is not split differently (one row, or n_latents below one column
    # block of the thread split), 1 and 2 threads agree bitwise.
    batch, d_in, n, k = shape
    X, p = encode_inputs(rng, batch, d_in, n, dtype)
    results = [_core.encode(X, p["W_enc_t"], p["b_enc"], p["b_dec"], k, "tanh", nt)
               for nt in THREADS]
    if batch == 1 or n <= 16:
        for a, b in zip(*results):
            np.testing.assert_array_equal(a, b)
    else:
        (v1, i1), (v2, i2) = results
        assert rel_err(v2, v1) < 10 * np.finfo(dtype).eps
        pre = reference_pre(X, p)
        clear = sorted_gaps(pre, k) > SAFE_GAP
        np.testing.assert_array_equal(i1[clear], i2[clear])


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_encode_default_buffers_match_given_buffers(rng, n_threads, dtype):
    # The code does not depend on which buffers the caller gives: fused (no pre) or
    # materialised, with centered given or allocated by the binding.
    X, p = encode_inputs(rng, 19, 13, 50, dtype)
    args = (X, p["W_enc_t"], p["b_enc"], p["b_dec"], 5, "relu", n_threads)
    v1, i1 = _core.encode(*args)
    centered, pre = np.full((19, 13), np.nan, dtype), np.empty((19, 50), dtype)
    for buffers in ((centered,), (None, pre), (centered, pre)):
        v2, i2 = _core.encode(*args, *buffers)
        np.testing.assert_array_equal(v1, v2)
        np.testing.assert_array_equal(i1, i2)
    # centered receives X - b_dec, rounded as NumPy rounds it; pre the product without b_enc.
    np.testing.assert_array_equal(centered, X - p["b_dec"])
    np.testing.assert_allclose(pre + p["b_enc"], reference_pre(X, p), rtol=0, atol=tol(dtype))


# ------------------------------------------------------------- fused against materialised
# Without a `pre` buffer the kernel selects tile by tile from products it never stores; with
# one it stores them and selects afterwards. Tiles hold about 1 MiB of products, a multiple
# of 48 latents and at least 240: from ~1000 rows on they are 240 wide, so a few thousand
# latents span several tiles per thread, with remainders.
FUSED_SHAPES = [
    (1, 13, 1, 1),
    (2, 5, 7, 7),           # k = n_latents, under one 16-column thread block
    (3, 29, 40, 5),         # n_latents < 3 threads * 16
    (1, 13, 500, 17),       # one row: Eigen's matrix-vector product
    (33, 37, 300, 1),
    (1100, 8, 1700, 32),    # 240-latent tiles: several per thread, and remainders
    (1100, 8, 1701, 1),
    (1100, 3, 530, 530),    # k = n_latents over several tiles
    (1200, 16, 1500, 300),  # k > a tile
    (1500, 768, 300, 32),   # a deep product (Eigen blocks over d_in)
]


def fused_inputs(rng, shape, dtype, data):
    """Encode inputs: "normal" (random weights), "ties" (small integers: exact, tied
    products), "non-finite" (NaN and +-inf in b_enc and in some rows of X)."""
    batch, d_in, n, _ = shape
    X, p = encode_inputs(rng, batch, d_in, n, dtype)
    if data == "ties":
        X = rng.integers(-2, 3, (batch, d_in)).astype(dtype)
        p["W_enc_t"] = rng.integers(-1, 2, (n, d_in)).astype(dtype)
        p["b_enc"] = rng.integers(-2, 3, n).astype(dtype)
    elif data == "non-finite":
        choices = np.array([-np.inf, -1.0, 0.0, 2.0, np.inf, np.nan], dtype=dtype)
        p["b_enc"] = np.where(rng.random(n) < 0.3, choices[rng.integers(0, 6, n)], p["b_enc"])
        rows = rng.random(batch) < 0.2
        X[rows, 0] = choices[rng.integers(0, 6, int(rows.sum()))]
    return X, p


@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "B{}-d{}-n{}-k{}".format(*s))
@pytest.mark.parametrize("data", ["normal", "ties", "non-finite"])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_encode_fused_bitwise_equals_materialised(rng, shape, data, n_threads, dtype):
    batch, d_in, n, k = shape
    X, p = fused_inputs(rng, shape, dtype, data)
    args = (X, p["W_enc_t"], p["b_enc"], p["b_dec"], k)
    for activation in ACTIVATIONS:
        selected = [np.empty((batch, k), dtype=dtype) for _ in range(2)]
        with np.errstate(invalid="ignore"):
            fused = _core.encode(*args, activation, n_threads, None, None, selected[0])
            pre = np.empty((batch, n), dtype=dtype)
            stored = _core.encode(*args, activation, n_threads, None, pre, selected[1])
        for a, b in zip((*fused, selected[0]), (*stored, selected[1])):
            np.testing.assert_array_equal(a, b, err_msg=activation)  # NaN equals NaN here
        if data == "ties" and activation in ("relu", "linear"):
            # Exact integer pre-activations: exactly stable_argsort(-pre)[:k].
            expected = np.argsort(-(pre + p["b_enc"]), axis=1, kind="stable")[:, :k]
            np.testing.assert_array_equal(fused[1], expected)


# The encode packs centered once and runs its register-blocked kernel (cpp/ksae/gemm.hpp) on
# each tile against that copy (TileProduct). These shapes reach every edge of it: several
# depth blocks (d_in > 512), a depth that is not a whole number of packets, a batch that is
# not a whole number of row panels (8 rows with AVX-512, 4 otherwise) or is smaller than one,
# latent ranges that end in partial register panels of 1, 2 and 3 packets, and tiles wider
# than a W block (mc latents, half of L2), so the shared copy is read at every kind of offset.
BLOCKED_SHAPES = [
    (600, 768, 600, 8),     # two depth blocks; two tiles on one thread
    (1023, 200, 700, 5),    # a last row panel of 7 (or 3) rows
    (256, 150, 2100, 8),    # 1008-latent tiles, wider than a W block
    (97, 70, 5000, 3),      # depth 70: packed in 16-value transposes plus 6 single values
    (5, 1100, 130, 4),      # three depth blocks (368, 368, 364); batch below one row panel
    (1, 33, 47, 2),         # one row; one partial register panel
    (9, 17, 1, 1),          # one latent
]


@pytest.mark.parametrize("shape", BLOCKED_SHAPES, ids=lambda s: "B{}-d{}-n{}-k{}".format(*s))
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_encode_blocked_products_match_the_reference(rng, shape, n_threads, dtype):
    batch, d_in, n, k = shape
    X, p = encode_inputs(rng, batch, d_in, n, dtype)
    pre = np.full((batch, n), np.nan, dtype=dtype)
    args = (X, p["W_enc_t"], p["b_enc"], p["b_dec"], k, "relu", n_threads)
    stored = _core.encode(*args, None, pre)
    expected = reference_pre(X, p) - as64(p["b_enc"])  # pre holds the products without b_enc
    assert rel_err(pre, expected) < tol(dtype)
    # Row by row too: a misplaced block would show in some rows only.
    errors = np.linalg.norm(pre - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert errors.max() < 10 * tol(dtype)
    fused = _core.encode(*args, None, None)
    for a, b in zip(fused, stored):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_encode_products_do_not_depend_on_the_batch_the_latents_or_the_threads(rng, dtype):
    # Each product is one multiply-add chain whose rounding depends on d_in alone (gemm.hpp):
    # a row's pre-activations are bitwise the same in any batch, a latent's in any range of
    # latents (any place in a register block), at any thread count.
    batch, d_in, n = 37, 530, 300  # two depth blocks; row and latent panels end partly full
    X, p = encode_inputs(rng, batch, d_in, n, dtype)

    def products(X, W, b_enc, n_threads=2):
        pre = np.empty((X.shape[0], W.shape[0]), dtype=dtype)
        _core.encode(X, W, b_enc, p["b_dec"], 1, "relu", n_threads, None, pre)
        return pre

    full = products(X, p["W_enc_t"], p["b_enc"])
    assert rel_err(full, reference_pre(X, p) - as64(p["b_enc"])) < tol(dtype)
    for n_threads in (1, 3, 4):
        np.testing.assert_array_equal(products(X, p["W_enc_t"], p["b_enc"], n_threads), full)
    for a, b in ((0, 1), (5, 12), (13, 37), (30, 37)):
        np.testing.assert_array_equal(products(X[a:b], p["W_enc_t"], p["b_enc"]), full[a:b])
    for j0, j1 in ((0, 1), (7, 100), (161, 300), (299, 300)):
        W = np.ascontiguousarray(p["W_enc_t"][j0:j1])
        b_enc = np.ascontiguousarray(p["b_enc"][j0:j1])
        np.testing.assert_array_equal(products(X, W, b_enc), full[:, j0:j1])


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_encode_fused_ties_across_tiles_keep_the_lowest_index(dtype, n_threads):
    # W_enc = 0: every pre-activation is its b_enc, a few distinct values repeated across
    # many 240-latent tiles and all threads' ranges; a later entry equal to the k-th best
    # must lose to the earlier ones.
    batch, d_in, n = 1100, 4, 1700
    b_enc = np.tile(np.array([1.0, 0.0, 1.0, 3.0, 0.0], dtype=dtype), n // 5)
    X = np.ones((batch, d_in), dtype=dtype)
    expected_row = np.argsort(-b_enc, kind="stable")
    for k in (1, 50, 340, 341, 1020, 1021, n):
        _, indices = _core.encode(X, np.zeros((n, d_in), dtype=dtype), b_enc,
                                  np.zeros(d_in, dtype=dtype), k, "relu", n_threads)
        np.testing.assert_array_equal(indices, np.tile(expected_row[:k], (batch, 1)))


# --------------------------------------------------------------------------------- decode
DECODE_SHAPES = [(1, 13, 7, 1), (5, 29, 50, 8), (33, 37, 300, 17), (10, 16, 20, 20)]


@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "B{}-d{}-n{}-k{}".format(*s))
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_decode_matches_reference(rng, shape, n_threads, dtype):
    batch, d_in, n, k = shape
    p = make_weights(rng, d_in, n, dtype)
    values = rng.standard_normal((batch, k)).astype(dtype)
    indices = np.argsort(rng.random((batch, n)), axis=1)[:, :k].astype(np.int64)
    out = _core.decode(values, indices, p["W_dec"], p["b_dec"], n_threads)
    expected = ref.decode(*as64(values, indices, p["W_dec"], p["b_dec"]))
    assert out.dtype == dtype and out.shape == (batch, d_in)
    assert rel_err(out, expected) < tol(dtype)
    # Writing into a given buffer gives the same and returns that buffer.
    buf = np.full((batch, d_in), np.nan, dtype=dtype)
    returned = _core.decode(values, indices, p["W_dec"], p["b_dec"], n_threads, buf)
    np.testing.assert_array_equal(buf, out)
    assert np.shares_memory(returned, buf)


# Thread counts for the bitwise tests: an odd team splits the decode's 2 * batch partial rows
# (and the backward's latents) unevenly.
BITWISE_THREADS = (1, 2, 3, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_decode_same_for_any_thread_count(rng, dtype):
    p = make_weights(rng, 37, 300, dtype)
    values = rng.standard_normal((41, 12)).astype(dtype)
    indices = rng.integers(0, 300, (41, 12))
    a, *others = (_core.decode(values, indices, p["W_dec"], p["b_dec"], nt)
                  for nt in BITWISE_THREADS)
    for b in others:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [-1, 7, 100])
def test_decode_out_of_range_indices_raise(rng, bad):
    p = make_weights(rng, 5, 7)
    values = np.ones((3, 2))
    indices = np.array([[0, 1], [2, bad], [3, 4]], dtype=np.int64)
    with pytest.raises(ValueError, match="indices") as info:
        _core.decode(values, indices, p["W_dec"], p["b_dec"])
    assert str(bad) in str(info.value)


def decode_mse_inputs(rng, batch, d_in, n, k, dtype):
    p = make_weights(rng, d_in, n, dtype)
    values = rng.standard_normal((batch, k)).astype(dtype)
    indices = np.argsort(rng.random((batch, n)), axis=1)[:, :k].astype(np.int64)
    X = rng.standard_normal((batch, d_in)).astype(dtype)
    return p, values, indices, X


@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "B{}-d{}-n{}-k{}".format(*s))
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_decode_mse_matches_decode_then_the_mse_loss(rng, shape, n_threads, dtype):
    batch, d_in, n, k = shape
    p, values, indices, X = decode_mse_inputs(rng, batch, d_in, n, k, dtype)
    loss, grad_out = _core.decode_mse(values, indices, p["W_dec"], p["b_dec"], X, n_threads)
    assert isinstance(loss, float)
    assert grad_out.dtype == dtype and grad_out.shape == (batch, d_in)
    # The gradient is bitwise the one decode followed by the NumPy loss gives.
    x_hat = _core.decode(values, indices, p["W_dec"], p["b_dec"], n_threads)
    np.testing.assert_array_equal(grad_out, mse_loss(x_hat, X)[1])
    # The loss agrees with a float64 reference.
    X_hat64 = ref.decode(*as64(values, indices, p["W_dec"], p["b_dec"]))
    loss64, _ = ref.mse_loss(X_hat64, as64(X))
    assert abs(loss - loss64) <= tol(dtype) * loss64
    # A given output buffer is filled and returned.
    g_buf = np.full_like(grad_out, np.nan)
    again = _core.decode_mse(values, indices, p["W_dec"], p["b_dec"], X, n_threads, g_buf)
    assert again[0] == loss
    assert np.shares_memory(again[1], g_buf)
    np.testing.assert_array_equal(g_buf, grad_out)


@pytest.mark.parametrize("n", [300, 20000], ids=["n300", "n20000"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_decode_mse_same_as_decode_for_any_thread_count(rng, n, dtype):
    # On several threads decode_mse sums each row's two latent groups on different threads
    # and adds the partial rows afterwards; decode sums both in the row's thread. Both must
    # round alike, for every team (an odd one splits a group's rows between two threads), so
    # that the training loss is the loss of what reconstruct returns. Wide codes (k = 40)
    # give each group many terms; 20000 latents split on a 32-latent chunk.
    p, values, indices, X = decode_mse_inputs(rng, 41, 37, n, 40, dtype)
    expected = mse_loss(_core.decode(values, indices, p["W_dec"], p["b_dec"], 1), X)[1]
    losses = []
    for nt in BITWISE_THREADS:
        loss, grad_out = _core.decode_mse(values, indices, p["W_dec"], p["b_dec"], X, nt)
        np.testing.assert_array_equal(grad_out, expected, err_msg=f"{nt} threads")
        losses.append(loss)
    assert len(set(losses)) == 1  # the rows' sums are added in row order whatever the threads


def test_decode_mse_binding_errors(rng):
    p, values, indices, X = decode_mse_inputs(rng, 4, 5, 7, 2, np.float64)

    def call(**replace):
        kwargs = dict(values=values, indices=indices, W_dec=p["W_dec"], b_dec=p["b_dec"], X=X,
                      n_threads=1)
        kwargs.update(replace)
        return _core.decode_mse(**kwargs)

    call()  # the unmodified call works
    with pytest.raises(ValueError, match=r"^X: .*\(4, 5\).*\(4, 6\)"):
        call(X=np.zeros((4, 6)))
    with pytest.raises(TypeError, match=r"^X: .*float64.*float32"):
        call(X=X.astype(np.float32))
    for shift in (0, 3):  # the same buffer, or one overlapping it
        padded = np.zeros(4 * 5 + 3)
        with pytest.raises(ValueError, match="^grad_out: must not overlap X"):
            call(X=padded[:20].reshape(4, 5), grad_out=padded[shift:shift + 20].reshape(4, 5))
    frozen = np.zeros((4, 5))
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="^grad_out: .*read-only"):
        call(grad_out=frozen)
    with pytest.raises(ValueError, match="indices"):
        call(indices=np.array([[0, 1], [2, 7], [3, 4], [5, 6]], dtype=np.int64))


# --------------------------------------------------------------------------------- backward
def backward_inputs(rng, batch, d_in, n, k, dtype, activation):
    """Inputs of a backward call; p["selected_pre"] holds the kept pre-activations that
    swish's and gelu's derivatives need."""
    X, p = encode_inputs(rng, batch, d_in, n, dtype)
    centered = np.empty_like(X)
    p["selected_pre"] = np.empty((batch, k), dtype=dtype)
    values, indices = _core.encode(X, p["W_enc_t"], p["b_enc"], p["b_dec"], k, activation, 1,
                                   centered, None, p["selected_pre"])
    grad_out = np.ascontiguousarray(rng.standard_normal((batch, d_in)), dtype=dtype)
    return X, p, centered, values, indices, grad_out


def core_backward(p, grad_out, centered, values, indices, activation, project, n_threads):
    grads = {name: np.full_like(p[name], np.nan) for name in ("W_enc_t", "b_enc", "W_dec", "b_dec")}
    result = _core.backward(grad_out, centered, values, indices, p["W_enc_t"], p["W_dec"],
                            activation, project, n_threads, grads["W_enc_t"], grads["b_enc"],
                            grads["W_dec"], grads["b_dec"], False, p.get("selected_pre"))
    assert result is None
    return grads


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("project", [False, True], ids=["plain", "projected"])
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_backward_matches_reference(rng, shape, activation, project, n_threads, dtype):
    batch, d_in, n, k = shape
    X, p, centered, values, indices, grad_out = backward_inputs(rng, batch, d_in, n, k, dtype,
                                                                activation)
    got = core_backward(p, grad_out, centered, values, indices, activation, project, n_threads)
    expected = ref.backward(*as64(grad_out, X, values), indices, *as64(p["W_enc_t"].T, p["b_dec"],
                            p["W_dec"]), activation, project, p["selected_pre"].astype(np.float64))
    # The core returns the gradient of W_enc transposed (the internal layout).
    pairs = {"W_enc_t": expected["W_enc"].T, "b_enc": expected["b_enc"],
             "W_dec": expected["W_dec"], "b_dec": expected["b_dec"]}
    for name, want in pairs.items():
        assert got[name].dtype == dtype
        assert rel_err(got[name], want) < tol(dtype), name
    # Latents no row selected get exactly zero gradient (the buffers were NaN-filled).
    unused = np.setdiff1d(np.arange(n), indices)
    for name in ("W_enc_t", "b_enc", "W_dec"):
        assert np.all(got[name][unused] == 0), name


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("project", [False, True], ids=["plain", "projected"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_backward_bitwise_identical_for_any_thread_count(rng, activation, project, dtype):
    # Gradient rows are owned by latents and grad_b_dec is summed over fixed chunks of
    # latents, so the summation order does not depend on the thread count.
    inputs = backward_inputs(rng, 65, 37, 300, 17, dtype, activation)
    X, p, centered, values, indices, grad_out = inputs
    one, *others = (core_backward(p, grad_out, centered, values, indices, activation, project, nt)
                    for nt in BITWISE_THREADS)
    for other in others:
        for name in one:
            np.testing.assert_array_equal(one[name], other[name], err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_backward_projected_decoder_gradient_is_orthogonal_to_rows(rng, dtype):
    X, p, centered, values, indices, grad_out = backward_inputs(rng, 20, 29, 50, 6, dtype, "relu")
    grads = core_backward(p, grad_out, centered, values, indices, "relu", True, 2)
    dots = np.einsum("ij,ij->i", grads["W_dec"].astype(np.float64), p["W_dec"].astype(np.float64))
    scale = np.linalg.norm(grads["W_dec"].astype(np.float64), axis=1) + 1e-30
    assert np.all(np.abs(dots) / scale < 100 * np.finfo(dtype).eps)
    assert np.linalg.norm(grads["W_dec"]) > 0


def test_backward_out_of_range_indices_raise(rng):
    X, p, centered, values, indices, grad_out = backward_inputs(rng, 4, 5, 7, 2, np.float64, "relu")
    indices = indices.copy()
    indices[1, 1] = 7
    with pytest.raises(ValueError, match="indices"):
        core_backward(p, grad_out, centered, values, indices, "relu", False, 1)


FUSED_ADAM = dict(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.01, step=3)
PARAMETERS = ("W_enc_t", "b_enc", "W_dec", "b_dec")


def fused_adam_state(rng, p, dtype):
    """Copies of the parameters and Adam moments as a few earlier steps would leave them."""
    params = {name: p[name].copy() for name in PARAMETERS}
    m = {name: (1e-3 * rng.standard_normal(w.shape)).astype(dtype) for name, w in params.items()}
    v = {name: (1e-6 * rng.random(w.shape)).astype(dtype) for name, w in params.items()}
    return params, m, v


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("activation", ["relu", "swish", "softmax"])
@pytest.mark.parametrize("normalize", [False, True], ids=["free", "unit"])
@pytest.mark.parametrize("code_grad", [False, True], ids=["", "code-grad"])
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_backward_adam_bitwise_equals_backward_then_adam(rng, shape, activation, normalize,
                                                         code_grad, n_threads, dtype):
    # The fused kernel must leave every parameter and moment exactly as the backward kernel
    # followed by adam_update on each parameter does, latents that no row selected included.
    batch, d_in, n, k = shape
    _, p, centered, values, indices, grad_out = backward_inputs(rng, batch, d_in, n, k, dtype,
                                                                activation)
    grad_values = rng.standard_normal((batch, k)).astype(dtype) if code_grad else None
    sp = p["selected_pre"]
    params, m, v = fused_adam_state(rng, p, dtype)
    separate = {name: w.copy() for name, w in params.items()}
    m2, v2 = {name: a.copy() for name, a in m.items()}, {name: a.copy() for name, a in v.items()}
    grads = {name: np.empty_like(w) for name, w in params.items()}
    _core.backward(grad_out, centered, values, indices, separate["W_enc_t"], separate["W_dec"],
                   activation, normalize, n_threads, grads["W_enc_t"], grads["b_enc"],
                   grads["W_dec"], grads["b_dec"], False, sp, grad_values)
    a = FUSED_ADAM
    for name in PARAMETERS:
        _core.adam_update(separate[name], grads[name], m2[name], v2[name], a["lr"], a["beta1"],
                          a["beta2"], a["eps"], a["weight_decay"], a["step"],
                          normalize and name == "W_dec", n_threads)
    grad_b_enc, grad_b_dec = np.full(n, np.nan, dtype), np.full(d_in, np.nan, dtype)
    result = _core.backward_adam(
        grad_out, centered, values, indices, params["W_enc_t"], params["b_enc"],
        params["W_dec"], params["b_dec"], [m[name] for name in PARAMETERS],
        [v[name] for name in PARAMETERS], grad_b_enc, grad_b_dec, activation, normalize,
        normalize, n_threads, a["lr"], a["beta1"], a["beta2"], a["eps"], a["weight_decay"],
        a["step"], sp, grad_values)
    assert result is None
    for name in PARAMETERS:
        np.testing.assert_array_equal(params[name], separate[name], err_msg=name)
        np.testing.assert_array_equal(m[name], m2[name], err_msg=f"exp_avg {name}")
        np.testing.assert_array_equal(v[name], v2[name], err_msg=f"exp_avg_sq {name}")
    np.testing.assert_array_equal(grad_b_enc, grads["b_enc"])
    np.testing.assert_array_equal(grad_b_dec, grads["b_dec"])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_backward_large_dictionary_matches_reference_for_any_thread_count(rng, dtype):
    # Over 16384 latents grad_b_dec's partial sums cover chunks of more than 16 latents (48
    # here), and each thread's range of latents starts on a chunk boundary; 3 threads split
    # the chunks unevenly. The code selects nearly every latent (so every chunk's sum counts),
    # all but one whole chunk and a few scattered latents. The result must not depend on the
    # split, and the fused Adam step must still equal the backward followed by adam_update.
    batch, d_in, n, k = 50, 11, 40_000, 790
    X, p = encode_inputs(rng, batch, d_in, n, dtype)
    centered = (X - p["b_dec"]).astype(dtype)
    chosen = rng.permutation(np.setdiff1d(np.arange(n), np.arange(96, 144)))[:batch * k]
    indices = chosen.reshape(batch, k).astype(np.int64)
    values = rng.random((batch, k)).astype(dtype) + dtype(0.1)
    grad_out = np.ascontiguousarray(rng.standard_normal((batch, d_in)), dtype=dtype)
    runs = [core_backward(p, grad_out, centered, values, indices, "relu", False, nt)
            for nt in (1, 2, 3)]
    expected = ref.backward(*as64(grad_out, X, values), indices,
                            *as64(p["W_enc_t"].T, p["b_dec"], p["W_dec"]), "relu", False)
    assert rel_err(runs[0]["b_dec"], expected["b_dec"]) < tol(dtype)
    assert rel_err(runs[0]["W_enc_t"], expected["W_enc"].T) < tol(dtype)
    for run in runs[1:]:
        for name in run:
            np.testing.assert_array_equal(run[name], runs[0][name], err_msg=name)
    a = FUSED_ADAM
    for nt in (1, 3):
        params, m, v = fused_adam_state(np.random.default_rng(1), p, dtype)
        grad_b_enc, grad_b_dec = np.empty(n, dtype), np.empty(d_in, dtype)
        _core.backward_adam(grad_out, centered, values, indices, params["W_enc_t"],
                            params["b_enc"], params["W_dec"], params["b_dec"],
                            [m[name] for name in PARAMETERS], [v[name] for name in PARAMETERS],
                            grad_b_enc, grad_b_dec, "relu", False, False, nt, a["lr"],
                            a["beta1"], a["beta2"], a["eps"], a["weight_decay"], a["step"])
        separate, m2, v2 = fused_adam_state(np.random.default_rng(1), p, dtype)
        for name in PARAMETERS:
            _core.adam_update(separate[name], runs[0][name], m2[name], v2[name], a["lr"],
                              a["beta1"], a["beta2"], a["eps"], a["weight_decay"], a["step"],
                              False, nt)
            np.testing.assert_array_equal(params[name], separate[name], err_msg=name)
            np.testing.assert_array_equal(v[name], v2[name], err_msg=f"exp_avg_sq {name}")
        np.testing.assert_array_equal(grad_b_dec, runs[0]["b_dec"])


def test_backward_adam_binding_errors(rng):
    _, p, centered, values, indices, grad_out = backward_inputs(rng, 4, 5, 7, 2, np.float64, "relu")
    params, m, v = fused_adam_state(rng, p, np.float64)
    a = FUSED_ADAM

    def call(**replace):
        kwargs = dict(grad_out=grad_out, centered=centered, values=values, indices=indices,
                      **params, exp_avg=[m[name] for name in PARAMETERS],
                      exp_avg_sq=[v[name] for name in PARAMETERS], grad_b_enc=np.zeros(7),
                      grad_b_dec=np.zeros(5), activation="relu", project_decoder_grad=True,
                      unit_norm_decoder=True, n_threads=1, **a)
        kwargs.update(replace)
        _core.backward_adam(**kwargs)

    call()  # the unmodified call works
    with pytest.raises(ValueError, match="exp_avg, exp_avg_sq: expected 4 arrays each"):
        call(exp_avg=[m[name] for name in PARAMETERS[:3]])
    with pytest.raises(ValueError, match=r"^exp_avg_sq\[W_dec\]: .*\(7, 5\).*\(7, 4\)"):
        call(exp_avg_sq=[v["W_enc_t"], v["b_enc"], v["W_dec"][:, :4].copy(), v["b_dec"]])
    with pytest.raises(TypeError, match=r"^exp_avg\[b_enc\]: .*float64.*float32"):
        call(exp_avg=[m["W_enc_t"], m["b_enc"].astype(np.float32), m["W_dec"], m["b_dec"]])
    frozen = params["b_dec"].copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="^b_dec: .*read-only"):
        call(b_dec=frozen)
    with pytest.raises(ValueError, match="step"):
        call(step=0)
    head = np.ascontiguousarray(rng.standard_normal((7, 3)))
    with pytest.raises(ValueError, match="^backward_adam: b_dec is both"):
        call(W_dec=head, grad_out=np.zeros((4, 3)), exp_avg_sq=[v["W_enc_t"], v["b_enc"], head, v["b_dec"]])


def code_gradient_inputs(rng, batch, d_in, n, k, dtype, activation, d_out=None):
    """backward_inputs plus a random penalty gradient on the code and, with d_out, a head of
    width d_out in place of the decoder (grad_out and W_dec d_out wide)."""
    X, p, centered, values, indices, grad_out = backward_inputs(rng, batch, d_in, n, k, dtype,
                                                                activation)
    if d_out is not None:
        p["W_dec"] = np.ascontiguousarray(rng.standard_normal((n, d_out)), dtype=dtype)
        grad_out = np.ascontiguousarray(rng.standard_normal((batch, d_out)), dtype=dtype)
    grad_values = np.ascontiguousarray(rng.standard_normal((batch, k)), dtype=dtype)
    return X, p, centered, values, indices, grad_out, grad_values


def core_backward_with_code_gradient(p, grad_out, centered, values, indices, grad_values,
                                     activation, n_threads, train_centering=True):
    grads = {name: np.full_like(p[name], np.nan) for name in ("W_enc_t", "b_enc", "W_dec", "b_dec")}
    grads["values"] = np.full_like(values, np.nan)
    if not train_centering:
        grads["b_dec"] = None
    _core.backward(grad_out, centered, values, indices, p["W_enc_t"], p["W_dec"], activation,
                   False, n_threads, grads["W_enc_t"], grads["b_enc"], grads["W_dec"],
                   grads["b_dec"], False, p["selected_pre"], grad_values, grads["values"])
    return grads


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "swish", "softmax"])
@pytest.mark.parametrize("head", [False, True], ids=["decoder", "head"])
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_backward_code_gradient_and_head_match_reference(rng, shape, activation, head,
                                                         n_threads, dtype):
    # grad_values adds a penalty's gradient to every kept entry's dL/dvalues before the
    # activation derivative; grad_values_out receives the sum. A head (d_out = 3 != d_in)
    # replaces the decoder, with grad_b_dec None: the centering is not trained.
    batch, d_in, n, k = shape
    d_out = 3 if head else None
    X, p, centered, values, indices, grad_out, grad_values = code_gradient_inputs(
        rng, batch, d_in, n, k, dtype, activation, d_out)
    got = core_backward_with_code_gradient(p, grad_out, centered, values, indices, grad_values,
                                           activation, n_threads, train_centering=not head)
    expected = ref.backward(*as64(grad_out, X, values), indices,
                            *as64(p["W_enc_t"].T, p["b_dec"], p["W_dec"]), activation, False,
                            as64(p["selected_pre"]), as64(grad_values), train_centering=not head)
    expected["W_enc_t"] = expected.pop("W_enc").T
    assert set(expected) == {name for name, g in got.items() if g is not None}
    for name, want in expected.items():
        assert got[name].dtype == dtype
        assert rel_err(got[name], want) < tol(dtype), name


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_backward_code_gradient_reaches_the_encoder_only(rng, dtype):
    # With grad_out = 0 the gradient is the penalty's alone: the decoder's is zero, and the
    # encoder's is the reference with dvalues = grad_values.
    X, p, centered, values, indices, grad_out, grad_values = code_gradient_inputs(
        rng, 9, 37, 50, 8, dtype, "relu")
    got = core_backward_with_code_gradient(p, np.zeros_like(grad_out), centered, values, indices,
                                           grad_values, "relu", 2)
    assert np.all(got["W_dec"] == 0)
    np.testing.assert_array_equal(got["values"], grad_values)
    assert np.linalg.norm(got["W_enc_t"]) > 0
    dpre = ref.densify(as64(grad_values) * (as64(values) > 0), indices, 50)  # relu' on the kept
    assert rel_err(got["b_enc"], dpre.sum(axis=0)) < tol(dtype)


@pytest.mark.parametrize("head", [False, True], ids=["decoder", "head"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_backward_code_gradient_bitwise_identical_for_any_thread_count(rng, head, activation,
                                                                       dtype):
    # relu's dpre is formed per entry by the latent's owner; softmax's per row after a barrier.
    inputs = code_gradient_inputs(rng, 65, 37, 300, 17, dtype, activation, 5 if head else None)
    X, p, centered, values, indices, grad_out, grad_values = inputs
    one, *others = (core_backward_with_code_gradient(p, grad_out, centered, values, indices,
                                                     grad_values, activation, nt, not head)
                    for nt in BITWISE_THREADS)
    for other in others:
        for name in one:
            np.testing.assert_array_equal(one[name], other[name], err_msg=name)


def test_backward_code_gradient_and_head_binding_errors(rng):
    X, p, centered, values, indices, grad_out, grad_values = code_gradient_inputs(
        rng, 4, 5, 7, 2, np.float64, "relu", d_out=3)
    grads = [np.zeros_like(p[name]) for name in ("W_enc_t", "b_enc", "W_dec")]
    args = (grad_out, centered, values, indices, p["W_enc_t"], p["W_dec"], "relu", False, 1, *grads)
    _core.backward(*args, None, False, None, grad_values, np.zeros((4, 2)))  # works
    with pytest.raises(ValueError, match=r"^grad_b_dec: .*width \(3\).*\(5\); pass None"):
        _core.backward(*args, np.zeros(5))
    with pytest.raises(ValueError, match=r"^grad_values: .*\(4, 2\).*\(4, 3\)"):
        _core.backward(*args, None, False, None, np.zeros((4, 3)))
    with pytest.raises(TypeError, match=r"^grad_values: .*float64.*float32"):
        _core.backward(*args, None, False, None, grad_values.astype(np.float32))
    read_only = np.zeros((4, 2))
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="^grad_values_out: .*read-only"):
        _core.backward(*args, None, False, None, None, read_only)
    with pytest.raises(ValueError, match=r"^grad_out: .*\(4, 3\).*\(4, 5\)"):
        _core.backward(np.zeros((4, 5)), *args[1:], None)


# --------------------------------------------------------------------------------- optimizers
PARAM_SHAPES = [(37,), (13, 29), (1, 16), (50, 37)]


def optimizer_inputs(rng, shape, dtype, steps):
    param = np.ascontiguousarray(rng.standard_normal(shape), dtype=dtype)
    grads = [np.ascontiguousarray(rng.standard_normal(shape), dtype=dtype) for _ in range(steps)]
    return param, grads


@pytest.mark.parametrize("shape", PARAM_SHAPES, ids=str)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("unit_norm_rows", [False, True], ids=["free", "unit"])
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_adam_update_matches_reference(rng, shape, weight_decay, unit_norm_rows, n_threads, dtype):
    steps = 4
    param, grads = optimizer_inputs(rng, shape, dtype, steps)
    m, v = np.zeros_like(param), np.zeros_like(param)
    p64, m64, v64 = as64(param), np.zeros(shape), np.zeros(shape)
    settings = dict(lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=weight_decay)
    for step, g in enumerate(grads, start=1):
        _core.adam_update(param, g, m, v, settings["lr"], settings["beta1"], settings["beta2"],
                          settings["eps"], weight_decay, step, unit_norm_rows, n_threads)
        ref.adam_update(p64, as64(g), m64, v64, step=step, unit_norm_rows=unit_norm_rows,
                        **settings)
        for got, want in ((param, p64), (m, m64), (v, v64)):
            assert got.dtype == dtype
            assert rel_err(got, want) < tol(dtype), f"step {step}"
    if unit_norm_rows:
        norms = np.linalg.norm(param.reshape(-1, shape[-1]).astype(np.float64), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=10 * np.finfo(dtype).eps)


@pytest.mark.parametrize("shape", PARAM_SHAPES, ids=str)
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)],
                         ids=["plain", "momentum", "nesterov"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("unit_norm_rows", [False, True], ids=["free", "unit"])
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_sgd_update_matches_reference(rng, shape, momentum, nesterov, weight_decay,
                                      unit_norm_rows, n_threads, dtype):
    steps = 4
    param, grads = optimizer_inputs(rng, shape, dtype, steps)
    buf = np.zeros_like(param) if momentum else None
    p64, buf64 = as64(param), np.zeros(shape)
    for step, g in enumerate(grads, start=1):
        _core.sgd_update(param, g, buf, 0.05, momentum, nesterov, weight_decay, unit_norm_rows,
                         n_threads)
        ref.sgd_update(p64, as64(g), buf64, lr=0.05, momentum=momentum, nesterov=nesterov,
                       weight_decay=weight_decay, unit_norm_rows=unit_norm_rows)
        assert rel_err(param, p64) < tol(dtype), f"step {step}"
        if momentum:
            assert rel_err(buf, buf64) < tol(dtype), f"step {step}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("unit_norm_rows", [False, True], ids=["free", "unit"])
def test_optimizer_updates_bitwise_identical_for_one_and_two_threads(rng, dtype, unit_norm_rows):
    param0, grads = optimizer_inputs(rng, (300, 37), dtype, 3)
    results = []
    for nt in THREADS:
        pa, m, v = param0.copy(), np.zeros_like(param0), np.zeros_like(param0)
        ps, buf = param0.copy(), np.zeros_like(param0)
        for step, g in enumerate(grads, start=1):
            _core.adam_update(pa, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.01, step, unit_norm_rows, nt)
            _core.sgd_update(ps, g, buf, 1e-2, 0.9, True, 0.01, unit_norm_rows, nt)
        results.append((pa, m, v, ps, buf))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_sgd_requires_buffer_with_momentum(rng):
    param, (g,) = optimizer_inputs(rng, (4, 5), np.float64, 1)
    with pytest.raises(ValueError, match="momentum_buffer"):
        _core.sgd_update(param, g, None, 0.1, 0.9, False, 0.0)
    before = param.copy()
    _core.sgd_update(param, g, None, 0.1, 0.0, False, 0.0)  # plain SGD needs no buffer
    np.testing.assert_allclose(param, before - 0.1 * g, rtol=1e-15)


@pytest.mark.parametrize("bad,match", [(dict(step=0), "step"), (dict(lr=-1.0), "lr"),
                                       (dict(beta1=1.0), "beta1"), (dict(beta2=-0.1), "beta2"),
                                       (dict(eps=0.0), "eps")])
def test_adam_update_rejects_bad_settings(rng, bad, match):
    param, (g,) = optimizer_inputs(rng, (3, 4), np.float64, 1)
    settings = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    settings.update(bad)
    before = param.copy()
    with pytest.raises(ValueError, match=match):
        _core.adam_update(param, g, np.zeros_like(param), np.zeros_like(param), **settings)
    np.testing.assert_array_equal(param, before)


# --------------------------------------------------------------------------------- binding errors
@pytest.fixture
def encode_args(rng):
    X, p = encode_inputs(rng, 3, 5, 4, np.float64)
    return {"X": X, "W_enc_t": p["W_enc_t"], "b_enc": p["b_enc"], "b_dec": p["b_dec"], "k": 2}


@pytest.mark.parametrize("name", ["W_enc_t", "b_enc", "b_dec"])
def test_encode_wrong_dtype_names_argument(encode_args, name):
    encode_args[name] = encode_args[name].astype(np.float32)
    with pytest.raises(TypeError, match=rf"^{name}: .*float64.*float32"):
        _core.encode(**encode_args)


@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.complex128])
def test_encode_unsupported_input_dtype_names_X(encode_args, dtype):
    encode_args["X"] = encode_args["X"].astype(dtype)
    with pytest.raises(TypeError, match=r"^X: "):
        _core.encode(**encode_args)


def test_encode_non_array_names_argument(encode_args):
    encode_args["b_enc"] = encode_args["b_enc"].tolist()
    with pytest.raises(TypeError, match="b_enc: expected a numpy array"):
        _core.encode(**encode_args)


@pytest.mark.parametrize("name,shape,expected", [
    ("b_enc", (5,), "(4,)"), ("b_dec", (6,), "(5,)"), ("X", (3, 6), "(*, 5)")])
def test_encode_wrong_shape_names_argument_and_both_shapes(encode_args, name, shape, expected):
    encode_args[name] = np.zeros(shape)
    with pytest.raises(ValueError) as info:
        _core.encode(**encode_args)
    message = str(info.value)
    assert message.startswith(f"{name}:")
    assert expected in message and str(shape) in message


@pytest.mark.parametrize("name,shape", [("centered", (3, 4)), ("pre", (3, 5))])
def test_encode_wrong_buffer_shape(encode_args, name, shape):
    with pytest.raises(ValueError, match=rf"^{name}: .*{shape[0]}, {shape[1]}"):
        _core.encode(**encode_args, **{name: np.zeros(shape)})


@pytest.mark.parametrize("name", ["X", "W_enc_t"])
def test_encode_non_contiguous_raises(encode_args, name):
    encode_args[name] = np.asfortranarray(encode_args[name])
    with pytest.raises(ValueError, match=rf"^{name}: .*not C-contiguous"):
        _core.encode(**encode_args)


def test_encode_strided_view_raises(encode_args):
    wide = np.zeros((3, 10))
    encode_args["X"] = wide[:, ::2]
    with pytest.raises(ValueError, match="X: .*not C-contiguous"):
        _core.encode(**encode_args)


@pytest.mark.parametrize("k", [0, -1, 5, 100])
def test_encode_bad_k_raises(encode_args, k):
    encode_args["k"] = k
    with pytest.raises(ValueError, match=r"^k: .*n_latents = 4"):
        _core.encode(**encode_args)


@pytest.mark.parametrize("activation", ["rleu", "", "ReLU", "swiglu"])
def test_encode_unknown_activation_raises(encode_args, activation):
    with pytest.raises(ValueError, match="activation"):
        _core.encode(**encode_args, activation=activation)


@pytest.mark.parametrize("name", ["centered", "pre"])
def test_encode_read_only_buffer_raises(encode_args, name):
    shape = {"centered": (3, 5), "pre": (3, 4)}[name]
    buf = np.zeros(shape)
    buf.flags.writeable = False
    with pytest.raises(ValueError, match=rf"^{name}: .*read-only"):
        _core.encode(**encode_args, **{name: buf})
    assert np.all(buf == 0)


def test_decode_binding_errors(rng):
    p = make_weights(rng, 5, 7)
    values = np.ones((3, 2))
    indices = np.array([[0, 1], [2, 3], [4, 5]], dtype=np.int64)
    with pytest.raises(TypeError, match="^indices: .*int64.*int32"):
        _core.decode(values, indices.astype(np.int32), p["W_dec"], p["b_dec"])
    with pytest.raises(TypeError, match="^W_dec: .*float32.*float64"):
        _core.decode(values.astype(np.float32), indices, p["W_dec"], p["b_dec"])
    with pytest.raises(ValueError, match=r"^indices: .*\(3, 2\).*\(3, 3\)"):
        _core.decode(values, np.zeros((3, 3), dtype=np.int64), p["W_dec"], p["b_dec"])
    with pytest.raises(ValueError, match=r"^b_dec: .*\(5,\).*\(4,\)"):
        _core.decode(values, indices, p["W_dec"], np.zeros(4))
    with pytest.raises(ValueError, match=r"^values: .*not C-contiguous"):
        _core.decode(np.ones((2, 3)).T, indices, p["W_dec"], p["b_dec"])
    with pytest.raises(ValueError, match=r"^out: .*\(3, 5\).*\(3, 4\)"):
        _core.decode(values, indices, p["W_dec"], p["b_dec"], 1, np.zeros((3, 4)))
    out = np.zeros((3, 5))
    out.flags.writeable = False
    with pytest.raises(ValueError, match="^out: .*read-only"):
        _core.decode(values, indices, p["W_dec"], p["b_dec"], 1, out)


def test_backward_binding_errors(rng):
    X, p, centered, values, indices, grad_out = backward_inputs(rng, 4, 5, 7, 2, np.float64, "relu")
    grads = [np.zeros_like(p[name]) for name in ("W_enc_t", "b_enc", "W_dec", "b_dec")]
    args = [grad_out, centered, values, indices, p["W_enc_t"], p["W_dec"], "relu", False, 1]

    def call(**replace):
        names = ["grad_out", "centered", "values", "indices", "W_enc_t", "W_dec", "activation",
                 "project_decoder_grad", "n_threads", "grad_W_enc_t", "grad_b_enc",
                 "grad_W_dec", "grad_b_dec"]
        kwargs = dict(zip(names, args + grads))
        kwargs.update(replace)
        _core.backward(**kwargs)

    call()  # the unmodified call works
    with pytest.raises(TypeError, match="^grad_out: .*float64.*float32"):
        call(grad_out=grad_out.astype(np.float32))
    with pytest.raises(ValueError, match=r"^centered: .*\(4, 5\).*\(4, 6\)"):
        call(centered=np.zeros((4, 6)))
    with pytest.raises(ValueError, match=r"^grad_W_dec: .*\(7, 5\).*\(5, 7\)"):
        call(grad_W_dec=np.zeros((5, 7)))
    with pytest.raises(ValueError, match=r"^grad_W_enc_t: .*not C-contiguous"):
        call(grad_W_enc_t=np.zeros((5, 7)).T)
    with pytest.raises(ValueError, match="activation"):
        call(activation="softplus")
    with pytest.raises(ValueError, match="^selected_pre: the swish derivative needs"):
        call(activation="swish")
    with pytest.raises(ValueError, match=r"^selected_pre: .*\(4, 2\)"):
        call(activation="gelu", selected_pre=np.zeros((4, 3)))
    read_only = np.zeros(5)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="^grad_b_dec: .*read-only"):
        call(grad_b_dec=read_only)


def test_optimizer_binding_errors(rng):
    param, (g,) = optimizer_inputs(rng, (3, 4), np.float64, 1)
    m, v = np.zeros_like(param), np.zeros_like(param)
    settings = (0.1, 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(TypeError, match="^grad: .*float64.*float32"):
        _core.adam_update(param, g.astype(np.float32), m, v, *settings)
    with pytest.raises(ValueError, match=r"^exp_avg_sq: .*\(3, 4\).*\(4, 3\)"):
        _core.adam_update(param, g, m, np.zeros((4, 3)), *settings)
    with pytest.raises(ValueError, match="^param: .*not C-contiguous"):
        _core.adam_update(np.asfortranarray(param), g, m, v, *settings)
    with pytest.raises(ValueError, match="^param: expected a 1-D or 2-D array"):
        _core.adam_update(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), np.zeros((2, 2, 2)),
                          np.zeros((2, 2, 2)), *settings)
    read_only = param.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="^param: .*read-only"):
        _core.adam_update(read_only, g, m, v, *settings)
    with pytest.raises(ValueError, match="^exp_avg: .*read-only"):
        m_ro = m.copy()
        m_ro.flags.writeable = False
        _core.adam_update(param, g, m_ro, v, *settings)
    with pytest.raises(ValueError, match=r"^momentum_buffer: .*\(3, 4\).*\(3, 5\)"):
        _core.sgd_update(param, g, np.zeros((3, 5)), 0.1, 0.9, False, 0.0)
    with pytest.raises(TypeError, match="^param: expected a numpy array"):
        _core.sgd_update([1.0, 2.0], g, None, 0.1, 0.0, False, 0.0)
    with pytest.raises(ValueError, match="lr"):
        _core.sgd_update(param, g, None, -0.1, 0.0, False, 0.0)


def test_build_info_reports_openmp_and_threads():
    import ksae

    info = ksae.build_info()
    assert info["openmp"] == ksae.has_openmp()
    assert isinstance(info["max_threads"], int) and info["max_threads"] >= 1
    assert _core.max_threads() == info["max_threads"]


def test_build_info_reports_the_cmake_build_type():
    import ksae

    # pip install builds Release; scripts/sanitize.sh a Debug build, whose products round
    # differently at -O1 (tests/test_reference_run.py compares exactly only on Release).
    assert ksae.build_info()["build_type"] in ("Release", "Debug", "RelWithDebInfo", "MinSizeRel")


def test_thread_round_trip_is_a_positive_latency_where_two_threads_can_run():
    import os
    import subprocess
    import sys

    import ksae

    two_cpus = len(os.sched_getaffinity(0)) >= 2 if hasattr(os, "sched_getaffinity") else True
    trip = ksae.thread_round_trip_ns(trips=200, repeats=3)
    assert isinstance(trip, float)
    if ksae.has_openmp() and two_cpus:
        # A store seen by another core and answered: more than a nanosecond, and far less
        # than a millisecond on any machine that runs two threads at once.
        assert 1.0 < trip < 1e6
    else:
        assert trip == 0.0
    # With one processor, or a runtime that starts one thread, it returns at once, 0.0 (a
    # lone spinning thread would wait for ever).
    code = "import ksae; print(ksae.thread_round_trip_ns())"
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert float(out.stdout) == 0.0
    for name, value in (("trips", 0), ("repeats", -1)):
        with pytest.raises(ValueError, match=rf"^{name}: expected a positive count, got {value}"):
            ksae.thread_round_trip_ns(**{name: value})


def test_kernels_leave_the_callers_subnormal_mode_alone(rng):
    # The kernels flush subnormals to zero inside their own threads only; afterwards NumPy
    # on the calling thread must still produce subnormals.
    X, p = encode_inputs(rng, 8, 13, 50, np.float32)
    _core.encode(X, p["W_enc_t"], p["b_enc"], p["b_dec"], 5, "relu", 1)
    param = np.ones((3, 4), np.float32)
    _core.adam_update(param, np.full_like(param, 1e-20), np.zeros_like(param), np.zeros_like(param),
                      1e-3, 0.9, 0.999, 1e-8, 0.0, 1, True, 1)
    tiny = np.float32(np.finfo(np.float32).tiny)
    assert tiny * np.float32(0.5) > 0


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="subnormal flushing uses the x86 MXCSR register")
def test_adam_moments_do_not_keep_subnormals(rng):
    # Moments of parameters whose gradient stops decay geometrically; they are flushed to zero
    # rather than left subnormal (subnormal arithmetic is ~100x slower on x86).
    param = np.ones(64, np.float32)
    m = np.full(64, np.finfo(np.float32).tiny * 4, np.float32)
    v = np.zeros(64, np.float32)
    for step in range(1, 40):
        _core.adam_update(param, np.zeros_like(param), m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0, step, False, 1)
    assert not np.any((m != 0) & (np.abs(m) < np.finfo(np.float32).tiny))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_select_topk_matches_the_reference_and_excludes_minus_inf(rng, dtype):
    pre = rng.standard_normal((9, 40)).astype(dtype)
    bias = rng.standard_normal(40).astype(dtype)
    bias[::3] = -np.inf  # excluded latents
    values, indices = _core.select_topk(pre, bias, 5, "tanh", 2)
    expected = ref.topk_indices((pre + bias).astype(np.float64), 5)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(values, np.tanh(np.take_along_axis(pre + bias, indices, 1)), rtol=1e-6)
    assert not np.any(indices % 3 == 0)


@pytest.mark.parametrize("project", [False, True])
def test_backward_accumulate_adds_a_second_codes_gradients(rng, project):
    X, p = encode_inputs(rng, 12, 13, 30, np.float64)
    centered = np.empty_like(X)
    v1, i1 = _core.encode(X, p["W_enc_t"], p["b_enc"], p["b_dec"], 4, "relu", 1, centered, None)
    v2, i2 = _core.encode(X * 0.5, p["W_enc_t"], p["b_enc"], p["b_dec"], 2, "relu", 1)
    g1, g2 = rng.standard_normal((2, 12, 13))
    shapes = [(30, 13), (30,), (30, 13), (13,)]
    first = [np.empty(s) for s in shapes]
    second = [np.empty(s) for s in shapes]
    _core.backward(g1, centered, v1, i1, p["W_enc_t"], p["W_dec"], "relu", project, 1, *first)
    _core.backward(g2, centered, v2, i2, p["W_enc_t"], p["W_dec"], "relu", project, 1, *second)
    total = [a.copy() for a in first]
    _core.backward(g2, centered, v2, i2, p["W_enc_t"], p["W_dec"], "relu", project, 2, *total, True)
    for t, a, b in zip(total, first, second):
        np.testing.assert_allclose(t, a + b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ take_rows
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("shape, m", [((1, 1), 1), ((7, 3), 0), ((7, 3), 20), ((500, 37), 64),
                                      ((3000, 5), 3000)])
def test_take_rows_equals_fancy_indexing(rng, dtype, n_threads, shape, m):
    X = np.ascontiguousarray(rng.standard_normal(shape), dtype=dtype)
    rows = rng.integers(0, shape[0], m).astype(np.int64)  # repeats included
    got = _core.take_rows(X, rows, n_threads)
    assert got.dtype == np.dtype(dtype) and got.shape == (m, shape[1])
    np.testing.assert_array_equal(got, X[rows])
    out = np.full((m, shape[1]), np.nan, dtype=dtype)
    assert _core.take_rows(X, rows, n_threads, out) is out
    np.testing.assert_array_equal(out, X[rows])


@pytest.mark.parametrize("replace, error, match", [
    ({"rows": np.array([0, 3, 7])}, IndexError, r"^rows: entry 2 = 7 is outside \[0, 7\)"),
    ({"rows": np.array([-1])}, IndexError, r"^rows: entry 0 = -1 is outside"),
    ({"rows": np.array([0, 1], dtype=np.int32)}, TypeError, r"^rows: .*int64"),
    ({"rows": [0, 1]}, TypeError, r"^rows: expected a numpy array, got list"),
    ({"rows": np.array([[0], [1]])}, ValueError, r"^rows: .*\(\*,\).*\(2, 1\)"),
    ({"out": np.empty((3, 4))}, ValueError, r"^out: .*\(2, 3\)"),
    ({"out": np.empty((2, 3), np.float32)}, TypeError, r"^out: .*float64"),
    ({"X": np.asfortranarray(np.ones((7, 3)))}, ValueError, r"^X: .*C-contiguous"),
    ({"X": np.ones(7)}, ValueError, r"^X: "),
])
def test_take_rows_refuses_bad_input_and_writes_nothing(replace, error, match):
    X = np.arange(21.0).reshape(7, 3)
    out = np.full((2, 3), -1.0)
    kwargs = {"X": X, "rows": np.array([4, 1]), "n_threads": 1, "out": out, **replace}
    with pytest.raises(error, match=match):
        _core.take_rows(**kwargs)
    assert np.all(out == -1.0)


def test_take_rows_refuses_an_out_that_overlaps_X():
    X = np.arange(21.0).reshape(7, 3)
    with pytest.raises(ValueError, match=r"^out: must not overlap X"):
        _core.take_rows(X, np.array([4, 1]), 1, X[2:4])
    np.testing.assert_array_equal(X, np.arange(21.0).reshape(7, 3))


# ------------------------------------------------------------------------ sums_and_squares
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 3), (1023, 5), (1025, 17), (5000, 33)])
def test_sums_and_squares_match_float64_and_any_thread_count(rng, dtype, shape):
    X = np.ascontiguousarray(rng.standard_normal(shape) * 3 + 1, dtype=dtype)
    X64 = X.astype(np.float64)
    runs = [_core.sums_and_squares(X, n_threads) for n_threads in (1, 2, 3)]
    sums, squares = runs[0]
    assert sums.dtype == np.float64 and sums.shape == (shape[1],) and isinstance(squares, float)
    np.testing.assert_allclose(sums, X64.sum(axis=0), rtol=1e-12, atol=1e-12 * shape[0])
    assert squares == pytest.approx(float((X64 ** 2).sum()), rel=1e-13)
    for other_sums, other_squares in runs[1:]:  # chunks summed in order: bitwise the same
        np.testing.assert_array_equal(other_sums, sums)
        assert other_squares == squares


@pytest.mark.parametrize("X, error, match", [
    (np.ones(4), ValueError, r"^X: expected a 2-D array"),
    (np.ones((3, 2), dtype=np.int64), TypeError, r"^X: .*float64.*int64"),
    (np.asfortranarray(np.ones((3, 2))), ValueError, r"^X: .*C-contiguous"),
    ([[1.0]], TypeError, r"^X: expected a numpy array, got list"),
])
def test_sums_and_squares_refuses_bad_input(X, error, match):
    with pytest.raises(error, match=match):
        _core.sums_and_squares(X)
