"""The selection's counting primitives (cpp/ksae/topk.hpp) against NumPy.

kth_largest gives the fused encode its per-row lower bound and rank_top_k orders each row's
merged candidates. A bound that came out looser than the k-th largest, or a rank that broke
a tie the wrong way, would leave the encode's codes right but slower (or reorder equal
values), so they are checked here directly: every length up to past the counted packets,
both dtypes, ties, infinities.
"""

import numpy as np
import pytest

from ksae import _core

DTYPES = [np.float32, np.float64]


def _values(rng, n, dtype, kind):
    if kind == "distinct":
        return rng.standard_normal(n).astype(dtype)
    if kind == "ties":  # few distinct values: most entries tie with others
        return rng.integers(-3, 4, n).astype(dtype)
    values = rng.standard_normal(n).astype(dtype)  # infinities among them
    values[rng.random(n) < 0.2] = -np.inf
    values[rng.random(n) < 0.05] = np.inf
    return values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["distinct", "ties", "infinite"])
def test_kth_largest_is_the_kth_largest(dtype, kind):
    rng = np.random.default_rng(5)
    # Up to 8 packets (128 float32 or 64 float64 values with AVX-512) are counted; longer
    # arrays go through nth_element.
    for n in [*range(1, 70), 95, 127, 128, 129, 200, 513]:
        values = _values(rng, n, dtype, kind)
        expected = np.sort(values)[::-1]
        for k in sorted({1, 2, n // 3 + 1, n // 2 + 1, n - 1, n} & set(range(1, n + 1))):
            got = _core._kth_largest(values, k)
            assert got == expected[k - 1], (n, k, values)


def _packet_bytes():
    """Bytes per packet of this build's vector instruction set (Eigen's packets)."""
    simd = _core.build_info()["simd"]
    return 64 if "AVX-512F" in simd else 32 if "AVX" in simd else 16


def _best_positions(keys, indices, k):
    """Positions of the k best candidates: larger key first, the lower index on ties."""
    return np.lexsort((indices, -keys.astype(np.float64)))[:k]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["distinct", "ties", "infinite"])
def test_rank_top_k_orders_the_k_best(dtype, kind):
    rng = np.random.default_rng(6)
    capacity = 8 * _packet_bytes() // np.dtype(dtype).itemsize  # 8 packets are counted
    answered = 0
    for m in [*range(1, 70), 100, 127, 128, 129, 200]:
        keys = _values(rng, m, dtype, kind)
        indices = rng.permutation(10 * m)[:m].astype(np.int64)  # distinct latents, any order
        for k in sorted({1, 2, m // 2 + 1, m} & set(range(1, m + 1))):
            got = _core._rank_top_k(keys, indices, k)
            assert (got is None) == (m > capacity), (m, capacity)
            if got is None:  # the caller sorts instead
                continue
            answered += 1
            np.testing.assert_array_equal(got, _best_positions(keys, indices, k), err_msg=f"m={m} k={k}")
    assert answered > 0


@pytest.mark.parametrize("fn, args", [
    (_core._kth_largest, (np.zeros(4, np.float32), 0)),
    (_core._kth_largest, (np.zeros(4, np.float32), 5)),
    (_core._kth_largest, (np.zeros((2, 2), np.float32), 1)),
    (_core._rank_top_k, (np.zeros(4, np.float32), np.arange(3), 1)),
    (_core._rank_top_k, (np.zeros(4, np.float64), np.arange(4), 0)),
    (_core._rank_top_k, (np.zeros(4, np.float32), np.array([0, 1, 1, 2]), 2)),
    (_core._rank_top_k, (np.array([0, np.nan, 1, 2], np.float32), np.arange(4), 2)),
    (_core._kth_largest, (np.array([0, np.nan, 1], np.float64), 1)),
])
def test_counting_primitives_reject_bad_arguments(fn, args):
    with pytest.raises((ValueError, TypeError), match="values|keys|indices|k:"):
        fn(*args)
