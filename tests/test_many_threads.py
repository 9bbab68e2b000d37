"""Teams wider than the test machine: every parallel kernel, and training, give bitwise the
results of one thread at 5, 8, 16 and 32 threads.

The rest of the suite runs 1-4 threads; the default team on a 16-core machine is 16, and
wider teams take paths narrow ones never do: threads whose latent range is empty (more
threads than 16-latent blocks), a merge over many threads' candidate lists (past
``rank_top_k``'s limit, so by ``nth_element``), chunks of 32 latents past 16384, the decode's
and backward's waits on many threads. On this machine's few cores such teams are
oversubscribed; the kernels' spin-waits yield the CPU, so the calls stay short.
"""

from __future__ import annotations

import numpy as np
import pytest

import ksae
from ksae import _core

from conftest import DTYPES, make_weights
from test_train_step import copy_state, one_call, state, assert_same_state

WIDE_TEAMS = (5, 8, 16, 32)
# (batch, d_in, n_latents, k): fewer latent blocks than threads (7 and 50 latents), k equal
# to n_latents, two depth blocks (d_in 530), and 20000 latents (chunks of 32).
SHAPES = [(1, 13, 7, 1), (4, 29, 7, 7), (9, 37, 50, 8), (64, 16, 300, 90), (70, 530, 1000, 25),
          (40, 100, 20000, 40)]
SHAPE_IDS = [f"B{b}-d{d}-n{n}-k{k}" for b, d, n, k in SHAPES]
DTYPE_IDS = lambda d: np.dtype(d).name  # noqa: E731


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("activation,normalize", [("relu", True), ("gelu", False),
                                                  ("softmax", True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_training_step_same_for_wide_teams(rng, shape, activation, normalize, dtype):
    # The default step (encode, decode_mse, backward_adam, mark_fired in one call): loss,
    # code, bias gradients, parameters, moments and counts.
    batch, d_in, n, k = shape
    start = state(rng, d_in, n, dtype)
    X = np.ascontiguousarray(rng.standard_normal((batch, d_in)), dtype=dtype)
    one = copy_state(start)
    want = one_call(one, X, k, activation, normalize, 1)
    for n_threads in WIDE_TEAMS:
        wide = copy_state(start)
        got = one_call(wide, X, k, activation, normalize, n_threads)
        assert got[0] == want[0], f"{n_threads} threads"
        for name, a, b in zip(("values", "indices", "grad_b_enc", "grad_b_dec"), got[1:], want[1:]):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}, {n_threads} threads")
        assert_same_state(wide, one)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kernels_same_for_wide_teams(rng, shape, dtype):
    # The kernels the other training paths call one by one: the materialising encode, the
    # selection alone, decode, the backward with the code gradient (AuxK, penalties) in
    # accumulate mode, and the optimizer updates.
    batch, d_in, n, k = shape
    p = make_weights(rng, d_in, n, dtype, bias_scale=0.5)
    X = np.ascontiguousarray(rng.standard_normal((batch, d_in)), dtype=dtype)
    grad_out = np.ascontiguousarray(rng.standard_normal((batch, d_in)), dtype=dtype)
    grad_values = np.ascontiguousarray(rng.standard_normal((batch, k)), dtype=dtype)
    grad = np.ascontiguousarray(rng.standard_normal((n, d_in)), dtype=dtype)
    lazy_rows = np.unique(rng.integers(0, n, max(1, n // 3))).astype(np.int64)

    def run(n_threads):
        out = {}
        centered, pre = np.empty_like(X), np.empty((batch, n), dtype)
        sp = np.empty((batch, k), dtype)
        values, indices = _core.encode(X, p["W_enc_t"], p["b_enc"], p["b_dec"], k, "swish",
                                       n_threads, centered, pre, sp)
        out.update(values=values, indices=indices, pre=pre, centered=centered, sp=sp)
        out["selected values"], out["selected indices"] = _core.select_topk(
            pre, p["b_enc"], k, "relu", n_threads)
        out["decoded"] = _core.decode(values, indices, p["W_dec"], p["b_dec"], n_threads)
        grads = {name: np.ones_like(p[name]) for name in ("W_enc_t", "b_enc", "W_dec", "b_dec")}
        grad_values_out = np.empty((batch, k), dtype)
        _core.backward(grad_out, centered, values, indices, p["W_enc_t"], p["W_dec"], "swish",
                       True, n_threads, grads["W_enc_t"], grads["b_enc"], grads["W_dec"],
                       grads["b_dec"], True, sp, grad_values, grad_values_out)
        out.update({f"grad {name}": g for name, g in grads.items()}, grad_values_out=grad_values_out)
        for update in ("adam", "lazy adam", "sgd", "rmsprop"):
            param, buf1, buf2 = p["W_dec"].copy(), np.full_like(grad, 0.1), np.full_like(grad, 0.2)
            if update.endswith("adam"):
                _core.adam_update(param, grad, buf1, buf2, 1e-2, 0.9, 0.99, 1e-8, 0.01, 4, True,
                                  n_threads, lazy_rows if update == "lazy adam" else None)
            elif update == "sgd":
                _core.sgd_update(param, grad, buf1, 1e-2, 0.9, True, 0.01, True, n_threads)
            else:
                _core.rmsprop_update(param, grad, buf2, buf1, 1e-2, 0.9, 1e-8, 0.5, 0.01, True,
                                     n_threads)
            out.update({f"{update} param": param, f"{update} buffer 1": buf1,
                        f"{update} buffer 2": buf2})
        return out

    want = run(1)
    for n_threads in WIDE_TEAMS:
        got = run(n_threads)
        for name, expected in want.items():
            np.testing.assert_array_equal(got[name], expected, err_msg=f"{name}, {n_threads} threads")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reductions_and_gathers_same_for_wide_teams(rng, dtype):
    # Sums over fixed chunks (many of them here), the finiteness check and fit's row gather.
    X = np.ascontiguousarray(rng.standard_normal((5000, 37)), dtype=dtype)
    rows = rng.integers(0, 5000, 700).astype(np.int64)
    bad = X.copy()
    bad[4321, 5] = np.inf
    want = (_core.squared_norm(X, 1), _core.sums_and_squares(X, 1), _core.take_rows(X, rows, 1))
    for n_threads in WIDE_TEAMS:
        assert _core.squared_norm(X, n_threads) == want[0]
        sums, squares = _core.sums_and_squares(X, n_threads)
        np.testing.assert_array_equal(sums, want[1][0])
        assert squares == want[1][1]
        np.testing.assert_array_equal(_core.take_rows(X, rows, n_threads), want[2])
        assert _core.all_finite(X, n_threads) and not _core.all_finite(bad, n_threads)


# Training paths beyond the default step: AuxK with clipping, the other sparsities, lazy Adam,
# SGD and RMSprop, a free decoder with a non-monotone activation, a k curriculum with
# resampling of dead latents.
FIT_CASES = {
    "topk": ({}, {}),
    "auxk-clip": ({}, dict(auxk_coef=1 / 32, auxk_k=16, dead_after_samples=200, clip_grad_norm=1.0)),
    "batchtopk": (dict(sparsity="batchtopk"), {}),
    "jumprelu": (dict(sparsity="jumprelu"), {}),
    "l1": (dict(sparsity="l1"), {}),
    "kl": (dict(sparsity="kl", activation="sigmoid"), {}),
    "lazy-adam": ({}, dict(lazy_adam=True)),
    "sgd": ({}, dict(optimizer="sgd", momentum=0.9, nesterov=True)),
    "rmsprop": ({}, dict(optimizer="rmsprop")),
    "gelu-free": (dict(activation="gelu", normalize_decoder=False), {}),
    "curriculum-resample": ({}, dict(k_start=24, resample_every=3, dead_after_samples=100)),
}


@pytest.mark.parametrize("case", FIT_CASES)
def test_fit_same_for_wide_teams(case):
    model_options, train_options = FIT_CASES[case]
    X = ksae.make_sparse_dictionary(n_samples=1200, d_in=48, n_components=96, n_active=4,
                                    random_state=1).X

    def fitted(n_threads):
        sae = ksae.SparseAutoencoder(n_latents=300, k=6, random_state=0, n_threads=n_threads,
                                     **model_options)
        return sae.fit(X, epochs=2, batch_size=128, validation_data=X[:200], **train_options)

    one, wide = fitted(1), fitted(16)
    for name in ("W_enc_", "b_enc_", "W_dec_", "b_dec_"):
        np.testing.assert_array_equal(getattr(wide, name), getattr(one, name), err_msg=name)
    history = {key: values for key, values in one.history_.items() if key != "time"}
    assert history["loss"][-1] < history["loss"][0]  # it trained
    assert {key: values for key, values in wide.history_.items() if key != "time"} == history
