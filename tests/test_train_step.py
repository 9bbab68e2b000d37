"""``_core.train_step_adam``, the default training step in one call, held bitwise to the four
calls it replaces (encode, decode_mse, backward_adam, mark_fired), and the model's use of it."""

from __future__ import annotations

import numpy as np
import pytest

import ksae
import ksae.steps
from ksae import _core

from conftest import DTYPES, make_weights

PARAMETERS = ("W_enc_t", "b_enc", "W_dec", "b_dec")
ADAM = dict(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.01, step=3)
# (batch, d_in, n_latents, k): k=1, k=n_latents, batch 1, widths off the vector lengths,
# and one large enough that the encode and the backward split the work between threads.
SHAPES = [(1, 13, 7, 1), (4, 29, 7, 7), (9, 37, 50, 8), (33, 13, 300, 1), (64, 16, 300, 90),
          (130, 70, 600, 12)]
SHAPE_IDS = [f"B{b}-d{d}-n{n}-k{k}" for b, d, n, k in SHAPES]


def state(rng, d_in, n, dtype):
    """Parameters, moments as a few earlier steps would leave them, and firing counts."""
    p = make_weights(rng, d_in, n, dtype, bias_scale=0.5)
    params = {name: np.ascontiguousarray(p[name], dtype=dtype) for name in PARAMETERS}
    m = [(1e-3 * rng.standard_normal(params[name].shape)).astype(dtype) for name in PARAMETERS]
    v = [(1e-6 * rng.random(params[name].shape)).astype(dtype) for name in PARAMETERS]
    counts = rng.integers(0, 1000, n).astype(np.int64)
    return {"params": params, "m": m, "v": v, "counts": counts}


def copy_state(s):
    return {"params": {name: a.copy() for name, a in s["params"].items()},
            "m": [a.copy() for a in s["m"]], "v": [a.copy() for a in s["v"]],
            "counts": s["counts"].copy()}


def assert_same_state(a, b):
    for name in PARAMETERS:
        np.testing.assert_array_equal(a["params"][name], b["params"][name], err_msg=name)
    for i, name in enumerate(PARAMETERS):
        np.testing.assert_array_equal(a["m"][i], b["m"][i], err_msg=f"exp_avg {name}")
        np.testing.assert_array_equal(a["v"][i], b["v"][i], err_msg=f"exp_avg_sq {name}")
    np.testing.assert_array_equal(a["counts"], b["counts"], err_msg="counts")


def one_call(s, batch_X, width, act, normalize, n_threads, **replace):
    """train_step_adam on state s, with k=width, activation=act and any argument replaced;
    returns (loss, values, indices, grad_b_enc, grad_b_dec)."""
    X, p, dtype = batch_X, s["params"], batch_X.dtype
    batch, d = X.shape
    grads = (np.full(p["b_enc"].shape, np.nan, dtype), np.full(d, np.nan, dtype))
    kwargs = dict(X=X, **p, exp_avg=s["m"], exp_avg_sq=s["v"], grad_b_enc=grads[0],
                  grad_b_dec=grads[1], counts=s["counts"], k=width, activation=act,
                  normalize_decoder=normalize, n_threads=n_threads, **ADAM,
                  centered=np.empty_like(X), grad_out=np.empty_like(X),
                  selected_pre=np.empty((batch, width), dtype))
    kwargs.update(replace)
    loss, values, indices = _core.train_step_adam(**kwargs)
    return loss, values, indices, *grads


def four_calls(s, X, k, activation, normalize, n_threads):
    """The same step as encode, decode_mse, backward_adam and mark_fired, as model.py's
    unfused path calls them."""
    p, dtype = s["params"], X.dtype
    batch, d = X.shape
    centered, sp = np.empty_like(X), np.empty((batch, k), dtype)
    values, indices = _core.encode(X, p["W_enc_t"], p["b_enc"], p["b_dec"], k, activation,
                                   n_threads, centered, None, sp)
    loss, grad_out = _core.decode_mse(values, indices, p["W_dec"], p["b_dec"], X, n_threads,
                                      np.empty_like(X))
    grads = (np.full(p["b_enc"].shape, np.nan, dtype), np.full(d, np.nan, dtype))
    _core.backward_adam(grad_out, centered, values, indices, *(p[name] for name in PARAMETERS),
                        s["m"], s["v"], *grads, activation, normalize, normalize, n_threads,
                        **ADAM, selected_pre=sp)
    _core.mark_fired(s["counts"], values, indices, batch)
    return loss, values, indices, *grads


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("activation", ["relu", "linear", "gelu", "softmax"])
@pytest.mark.parametrize("normalize", [False, True], ids=["free", "unit"])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_train_step_adam_is_bitwise_the_four_calls(rng, shape, activation, normalize,
                                                   n_threads, dtype):
    batch, d_in, n, k = shape
    s = state(rng, d_in, n, dtype)
    X = np.ascontiguousarray(rng.standard_normal((batch, d_in)), dtype=dtype)
    fused, separate = s, copy_state(s)
    got = one_call(fused, X, k, activation, normalize, n_threads)
    want = four_calls(separate, X, k, activation, normalize, n_threads)
    assert isinstance(got[0], float) and got[0] == want[0]
    for name, a, b in zip(("values", "indices", "grad_b_enc", "grad_b_dec"), got[1:], want[1:]):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert got[1].dtype == np.dtype(dtype) and got[2].dtype == np.int64
    assert got[1].shape == got[2].shape == (batch, k)
    assert_same_state(fused, separate)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_train_step_adam_updates_and_counts(rng, dtype):
    # Against the state before the call: every latent's count advanced by the batch, the
    # fired ones reset; the parameters and moments moved.
    batch, d_in, n, k = 12, 10, 40, 3
    s = state(rng, d_in, n, dtype)
    before = copy_state(s)
    X = np.ascontiguousarray(rng.standard_normal((batch, d_in)), dtype=dtype)
    _, values, indices, _, _ = one_call(s, X, k, "relu", True, 2)
    fired = np.unique(indices[values != 0])
    expected = before["counts"] + batch
    expected[fired] = 0
    np.testing.assert_array_equal(s["counts"], expected)
    for name in PARAMETERS:
        assert not np.array_equal(s["params"][name], before["params"][name]), name
    np.testing.assert_allclose(np.linalg.norm(s["params"]["W_dec"].astype(np.float64), axis=1),
                               1.0, rtol=1e-5)


@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_a_non_finite_loss_leaves_the_state_untouched(rng, bad):
    # The model raises on a non-finite loss with "the weights of the last finite step": the
    # kernel must not update anything then, nor advance the counts.
    batch, d_in, n, k = 8, 6, 20, 2
    s = state(rng, d_in, n, np.float32)
    before = copy_state(s)
    X = rng.standard_normal((batch, d_in)).astype(np.float32)
    if bad == "inf":
        X *= np.float32(1e30)  # finite, but its squared error overflows
    else:
        X[3, 2] = np.nan
    loss, *_ = one_call(s, X, k, "relu", True, 2)
    assert not np.isfinite(loss)
    assert_same_state(s, before)


def _read_only(array):
    array.flags.writeable = False
    return array


_SHARED = np.empty((4, 5))
# (arguments replaced in a valid call on batch 4, d_in 5, n_latents 7, k 2; error; message)
REFUSALS = [
    ({"k": 0}, ValueError, r"^k: expected 1 <= k <= n_latents = 7, got 0"),
    ({"k": 8}, ValueError, r"^k: expected 1 <= k"),
    ({"activation": "cube"}, ValueError, r"^activation: expected one of"),
    ({"counts": np.zeros(7)}, TypeError, r"^counts: .*int64.*float64"),
    ({"counts": np.zeros(8, dtype=np.int64)}, ValueError, r"^counts: .*\(7,\).*\(8,\)"),
    ({"counts": _read_only(np.zeros(7, dtype=np.int64))}, ValueError, r"^counts: .*read-only"),
    ({"centered": "X"}, ValueError, r"^centered: must not overlap X"),
    ({"grad_out": "X"}, ValueError, r"^grad_out: must not overlap X"),
    ({"centered": _SHARED, "grad_out": _SHARED}, ValueError,
     r"^grad_out: must not overlap centered \(centered is read while grad_out is written\)"),
    ({"grad_out": np.empty((5, 5))}, ValueError, r"^grad_out: .*\(4, 5\).*\(5, 5\)"),
    ({"centered": np.empty((4, 5), np.float32)}, TypeError, r"^centered: .*float64"),
    ({"selected_pre": None, "activation": "gelu"}, ValueError,
     r"^selected_pre: the gelu derivative needs"),
    ({"selected_pre": np.empty((4, 3))}, ValueError, r"^selected_pre: "),
    ({"exp_avg": []}, ValueError, r"^exp_avg, exp_avg_sq: expected 4 arrays each"),
    ({"grad_b_dec": np.empty(6)}, ValueError, r"^grad_b_dec: "),
    ({"W_dec": np.ones((7, 6))}, ValueError, r"^W_dec: "),
    ({"X": np.asfortranarray(np.ones((4, 5)))}, ValueError, r"^X: .*C-contiguous"),
    ({"X": [[1.0] * 5] * 4}, TypeError, r"^X: expected a numpy array, got list"),
    ({"step": 0}, ValueError, r"^step: expected an update count >= 1"),
    ({"lr": -1.0}, ValueError, r"^lr: expected a value >= 0"),
]


@pytest.mark.parametrize("replace, error, match", REFUSALS,
                         ids=[f"{i}-{'-'.join(r)}" for i, (r, _, _) in enumerate(REFUSALS)])
def test_train_step_adam_refuses_bad_input_and_writes_nothing(rng, replace, error, match):
    X = rng.standard_normal((4, 5))
    replace = {key: X if isinstance(value, str) and value == "X" else value
               for key, value in replace.items()}
    s = state(rng, 5, 7, np.float64)
    before = copy_state(s)
    with pytest.raises(error, match=match):
        one_call(s, X, 2, "relu", True, 1, **replace)
    assert_same_state(s, before)
    one_call(s, X, 2, "relu", True, 1)  # the unmodified call works
    assert not np.array_equal(s["counts"], before["counts"])


# ------------------------------------------------------------------------------ the model
def spy_on_core(monkeypatch):
    """Count the model's _core calls by name (the step's, and the model state's encode)."""
    import ksae.state
    import ksae.steps

    calls: dict[str, int] = {}
    core = ksae.steps._core

    class Spy:
        def __getattr__(self, name):
            fn = getattr(core, name)

            def call(*args, **kwargs):
                calls[name] = calls.get(name, 0) + 1
                return fn(*args, **kwargs)
            return call

    for module in (ksae.steps, ksae.state):
        monkeypatch.setattr(module, "_core", Spy())
    return calls


@pytest.mark.parametrize("model, options, one_call_step", [
    ({}, {}, True),
    ({"activation": "gelu", "normalize_decoder": False}, {}, True),
    ({}, {"optimizer": "adamw", "weight_decay": 0.1}, True),
    ({}, {"auxk_coef": 1 / 32}, False),
    ({}, {"clip_grad_norm": 1.0}, False),
    ({}, {"lazy_adam": True}, False),
    ({}, {"input_dropout": 0.1}, False),
    ({}, {"optimizer": "sgd"}, False),
    ({"output_activation": "sigmoid"}, {}, False),
    ({"output_activation": "sigmoid"}, {"loss": "bce"}, False),
])
def test_the_model_takes_the_one_call_step_exactly_when_it_applies(rng, monkeypatch, model,
                                                                   options, one_call_step):
    X = rng.random((32, 12)).astype(np.float32)  # in [0, 1], for bce
    sae = ksae.SparseAutoencoder(n_latents=40, k=4, random_state=0, n_threads=1, **model)
    sae.partial_fit(X, **options)
    calls = spy_on_core(monkeypatch)
    sae.partial_fit(X, **options)
    assert calls.get("train_step_adam", 0) == int(one_call_step)
    assert ("encode" in calls) == (not one_call_step)
    assert sae.n_iter_ == 2


@pytest.mark.parametrize("sparsity", ["batchtopk", "jumprelu", "l1"])
def test_other_sparsities_take_the_separate_kernels(rng, monkeypatch, sparsity):
    X = rng.standard_normal((32, 12)).astype(np.float32)
    sae = ksae.SparseAutoencoder(n_latents=40, k=4, sparsity=sparsity, random_state=0,
                                 n_threads=1)
    sae.partial_fit(X)
    calls = spy_on_core(monkeypatch)
    sae.partial_fit(X)
    assert "train_step_adam" not in calls and calls["encode"] == 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", ["relu", "swish"])
@pytest.mark.parametrize("normalize_decoder", [True, False])
def test_one_call_steps_train_bitwise_as_the_separate_kernels(rng, dtype, activation,
                                                              normalize_decoder):
    # fit and partial_fit with and without the one-call step (forced off on one model) end
    # with the same weights, moments, firing counts, losses and step counts, bit for bit.
    X = rng.standard_normal((200, 12)).astype(dtype)
    models = []
    for one_call_step in (True, False):
        sae = ksae.SparseAutoencoder(n_latents=48, k=5, activation=activation, dtype=dtype,
                                     normalize_decoder=normalize_decoder, random_state=0,
                                     n_threads=2)
        with pytest.MonkeyPatch.context() as patch:
            if not one_call_step:
                patch.setattr(ksae.steps, "fuses_step", lambda *args: False)
            sae.fit(X, epochs=2, batch_size=32, lr=1e-2)
            for start in range(0, 96, 24):
                sae.partial_fit(X[start:start + 24], lr=5e-3)
        models.append(sae)
    a, b = models
    for name in PARAMETERS:
        np.testing.assert_array_equal(a.state_.params[name], b.state_.params[name], err_msg=name)
        for key in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(a._optimizer.state[name][key],
                                          b._optimizer.state[name][key], err_msg=key)
    np.testing.assert_array_equal(a.samples_since_fired_, b.samples_since_fired_)
    assert a.history_["loss"] == b.history_["loss"]
    assert a.n_iter_ == b.n_iter_ and a._optimizer.n_steps == b._optimizer.n_steps


def test_a_diverging_one_call_step_keeps_the_last_finite_state(rng):
    X = rng.standard_normal((32, 12)).astype(np.float32)
    sae = ksae.SparseAutoencoder(n_latents=40, k=4, random_state=0, n_threads=2)
    sae.partial_fit(X, lr=1e-2)
    before = {name: a.copy() for name, a in sae.state_.params.items()}
    moments = {name: {key: a.copy() for key, a in entry.items()}
               for name, entry in sae._optimizer.state.items()}
    counts, steps = sae.samples_since_fired_.copy(), sae._optimizer.n_steps
    with pytest.raises(FloatingPointError, match="diverged at step 2"):
        sae.partial_fit(X * np.float32(1e30), lr=1e-2)
    for name, a in sae.state_.params.items():
        np.testing.assert_array_equal(a, before[name], err_msg=name)
    for name, entry in sae._optimizer.state.items():
        for key, a in entry.items():
            np.testing.assert_array_equal(a, moments[name][key], err_msg=f"{name} {key}")
    np.testing.assert_array_equal(sae.samples_since_fired_, counts)
    assert sae.n_iter_ == 1 and sae._optimizer.n_steps == steps
    sae.partial_fit(X, lr=1e-2)  # and it trains on from there
    assert sae.n_iter_ == 2
