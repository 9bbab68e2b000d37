"""The estimator's API surface: parameters, repr, not-fitted errors and input validation.
Every bad input raises a TypeError or ValueError whose message names the argument."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import ksae
from ksae.config import ModelConfig, TrainConfig


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(7).standard_normal((64, 6)).astype(np.float32)


@pytest.fixture(scope="module")
def fitted_model(X):
    return ksae.SparseAutoencoder(n_latents=8, k=2, random_state=0, n_threads=1).fit(
        X, epochs=1, batch_size=32)


def fresh(**params):
    return ksae.SparseAutoencoder(**{"n_latents": 8, "k": 2, "random_state": 0, "n_threads": 1,
                                     **params})


# --------------------------------------------------------------------------------- params
def test_get_params_lists_constructor_arguments():
    sae = ksae.SparseAutoencoder(n_latents=100, k=7, activation="tanh", random_state=3)
    assert sae.get_params() == {
        "n_latents": 100, "k": 7, "sparsity": "topk", "max_k": None,
        "jumprelu_init_threshold": None, "activation": "tanh",
        "init": "tied",
        "normalize_decoder": True, "output_activation": "linear", "inference_k_scale": 1.0,
        "b_dec_init": "zeros", "random_state": 3,
        "dtype": "float32", "n_threads": None}
    assert sae.get_params(deep=False) == sae.get_params()


def test_set_params_round_trip_and_clone():
    sae = ksae.SparseAutoencoder()
    returned = sae.set_params(n_latents=64, k=4, activation="sigmoid", dtype="float64",
                              init="he", normalize_decoder=False, random_state=5, n_threads=2)
    assert returned is sae
    params = sae.get_params()
    assert params["n_latents"] == 64 and params["k"] == 4 and params["activation"] == "sigmoid"
    clone = ksae.SparseAutoencoder(**params)
    assert clone.get_params() == params
    assert ksae.SparseAutoencoder().set_params(**params).get_params() == params


def test_set_params_unknown_name_suggests():
    sae = ksae.SparseAutoencoder()
    with pytest.raises(ValueError, match=r"'n_latent' \(did you mean 'n_latents'\?\)"):
        sae.set_params(n_latent=3)
    with pytest.raises(ValueError, match="set_params: unknown option"):
        sae.set_params(zzz=3)


def test_set_params_validates_and_leaves_params_alone_on_error():
    sae = ksae.SparseAutoencoder(n_latents=8, k=2)
    with pytest.raises(ValueError, match="k: .*n_latents = 8"):
        sae.set_params(k=9)
    with pytest.raises(ValueError, match="k: .*n_latents = 4"):
        sae.set_params(n_latents=4, k=5)
    with pytest.raises(ValueError, match="activation"):
        sae.set_params(k=3, activation="rleu")
    assert sae.get_params()["k"] == 2 and sae.get_params()["activation"] == "relu"
    assert sae.get_params()["n_latents"] == 8


def test_constructor_only_stores():
    # Like scikit-learn: no validation, no work in __init__; errors come at fit.
    sae = ksae.SparseAutoencoder(n_latents=0, k=0, activation="nope")
    assert sae.get_params()["n_latents"] == 0


def test_repr_shows_changed_params():
    assert repr(ksae.SparseAutoencoder()) == "SparseAutoencoder(n_latents=1024, k=32)"
    r = repr(ksae.SparseAutoencoder(n_latents=8, k=2, activation="tanh", random_state=3))
    assert r == "SparseAutoencoder(n_latents=8, k=2, activation='tanh', random_state=3)"
    assert "dtype='float64'" in repr(ksae.SparseAutoencoder(dtype="float64"))


def test_config_objects_validate():
    assert ModelConfig(dtype=np.float64).dtype == "float64"
    assert ModelConfig(dtype="float32").dtype == "float32"
    assert TrainConfig().optimizer == "adam"
    with pytest.raises(ValueError, match="n_latents"):
        ModelConfig(n_latents=0)


# --------------------------------------------------------------------------------- not fitted
@pytest.mark.parametrize("call", [
    lambda s, X: s.encode(X),
    lambda s, X: s.transform(X),
    lambda s, X: s.reconstruct(X),
    lambda s, X: s.score(X),
    lambda s, X: s.decode(np.ones((1, 2)), np.zeros((1, 2), dtype=np.int64)),
    lambda s, X: s.W_enc_,
    lambda s, X: s.b_enc_,
    lambda s, X: s.W_dec_,
    lambda s, X: s.b_dec_,
    lambda s, X: s.n_features_in_,
], ids=["encode", "transform", "reconstruct", "score", "decode", "W_enc_", "b_enc_", "W_dec_",
        "b_dec_", "n_features_in_"])
def test_not_fitted_raises(X, call):
    with pytest.raises(RuntimeError, match="not fitted"):
        call(fresh(), X)


def test_save_before_fit_raises(tmp_path):
    with pytest.raises(RuntimeError, match="not fitted"):
        fresh().save(tmp_path / "model")
    assert not (tmp_path / "model").exists()


# --------------------------------------------------------------------------------- bad X
BAD_X = {
    "uint8": (lambda X: (X > 0).astype(np.uint8), TypeError, r"X: expected floating-point data, got dtype uint8"),
    "int64": (lambda X: X.astype(np.int64), TypeError, r"X: .*int64.*astype"),
    "bool": (lambda X: X > 0, TypeError, r"X: .*dtype bool"),
    "complex": (lambda X: X.astype(np.complex128), TypeError, r"X: .*complex128"),
    "object": (lambda X: X.astype(object), TypeError, r"X: .*object"),
    "string": (lambda X: X.astype(str), TypeError, r"X: .*dtype <U"),
    "1-D": (lambda X: X[0], ValueError, r"X: expected a 2-D array.*\(6,\).*reshape\(1, -1\)"),
    "3-D": (lambda X: X[None], ValueError, r"X: expected a 2-D array.*\(1, 64, 6\)"),
    "no rows": (lambda X: X[:0], ValueError, r"X: expected at least one sample.*\(0, 6\)"),
    "no columns": (lambda X: X[:, :0], ValueError, r"X: expected at least one sample.*\(64, 0\)"),
    "NaN": (lambda X: _with(X, (5, 2), np.nan), ValueError, r"X: row 5 contains NaN or infinity"),
    "inf": (lambda X: _with(X, (9, 0), np.inf), ValueError, r"X: row 9 contains NaN or infinity"),
    "-inf": (lambda X: _with(X, (63, 5), -np.inf), ValueError, r"X: row 63 "),
}


def _with(X, where, value):
    X = X.copy()
    X[where] = value
    return X


@pytest.mark.parametrize("case", list(BAD_X))
def test_fit_rejects_bad_X(X, case):
    make, error, match = BAD_X[case]
    with pytest.raises(error, match=match):
        fresh().fit(make(X), epochs=1)


@pytest.mark.parametrize("case", list(BAD_X))
def test_encode_rejects_bad_X(X, fitted_model, case):
    make, error, match = BAD_X[case]
    with pytest.raises(error, match=match):
        fitted_model.encode(make(X))


@pytest.mark.parametrize("case", ["int64", "1-D", "NaN"])
def test_partial_fit_and_score_reject_bad_X(X, fitted_model, case):
    make, error, match = BAD_X[case]
    with pytest.raises(error, match=match):
        fresh().partial_fit(make(X))
    with pytest.raises(error, match=match):
        fitted_model.score(make(X))


def test_values_beyond_the_model_precision_are_rejected(X):
    # 1e300 is finite in float64 but not representable in a float32 model.
    huge = _with(X.astype(np.float64), (3, 1), 1e300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="X: row 3 "):
            fresh().fit(huge, epochs=1)
    # A float64 model holds it.
    values, _ = fresh(dtype="float64").fit(X, epochs=1).encode(huge)
    assert np.isfinite(values).all()


def test_values_beyond_the_model_precision_raise_without_a_warning(X):
    # The cast to the model's dtype overflows; that should be reported by the ValueError
    # naming the row, not first as a RuntimeWarning (an error under -W error, as here).
    huge = _with(X.astype(np.float64), (3, 1), 1e300)
    with pytest.raises(ValueError, match="X: row 3 "):
        fresh().fit(huge, epochs=1)


def test_validation_data_is_checked_by_name(X):
    with pytest.raises(ValueError, match="validation_data: row 1 contains NaN"):
        fresh().fit(X, epochs=1, validation_data=_with(X, (1, 1), np.nan))
    with pytest.raises(TypeError, match="validation_data: .*int64"):
        fresh().fit(X, epochs=1, validation_data=X.astype(np.int64))


@pytest.mark.parametrize("width", [5, 7])
def test_wrong_feature_count_after_fit(X, fitted_model, width):
    Y = np.ones((3, width), dtype=np.float32)
    for call in (fitted_model.encode, fitted_model.transform, fitted_model.reconstruct,
                 fitted_model.score):
        with pytest.raises(ValueError, match=rf"X: expected 6 features .*got {width}"):
            call(Y)


def test_failed_fit_leaves_a_fitted_model_unchanged(X):
    sae = fresh().fit(X, epochs=1, batch_size=32)
    before = sae.W_dec_.copy()
    n_iter = sae.n_iter_
    with pytest.raises(ValueError):
        sae.fit(_with(X, (0, 0), np.nan), epochs=1)
    with pytest.raises(ValueError):
        sae.fit(X, epochs=0)
    np.testing.assert_array_equal(sae.W_dec_, before)
    assert sae.n_iter_ == n_iter


# --------------------------------------------------------------------------------- bad params
BAD_PARAMS = [
    (dict(k=0), ValueError, r"k: expected an integer >= 1, got 0"),
    (dict(k=9), ValueError, r"k: expected 1 <= k <= n_latents = 8, got 9"),
    (dict(n_latents=0, k=1), ValueError, r"n_latents: expected an integer >= 1, got 0"),
    (dict(n_latents=-3, k=1), ValueError, r"n_latents: "),
    (dict(k=2.0), TypeError, r"k: expected an integer"),
    (dict(n_latents="8"), TypeError, r"n_latents: expected an integer"),
    (dict(k=True), TypeError, r"k: expected an integer, got bool"),
    (dict(activation="rleu"), ValueError, r"activation: .*'rleu'; did you mean 'relu'\?"),
    (dict(activation="sigmod"), ValueError, r"did you mean 'sigmoid'\?"),
    (dict(activation=None), ValueError, r"activation: .*got None"),
    (dict(init="xavir"), ValueError, r"init: .*did you mean 'xavier'\?"),
    (dict(init="kaiming"), ValueError, r"init: expected one of 'tied', 'xavier', 'he', got 'kaiming'"),
    (dict(dtype="int32"), ValueError, r"dtype: expected one of 'float32', 'float64', got 'int32'"),
    (dict(dtype="float16"), ValueError, r"dtype: "),
    (dict(dtype="bogus"), ValueError, r"dtype: "),
    (dict(normalize_decoder=1), TypeError, r"normalize_decoder: expected a bool"),
    (dict(random_state=-1), ValueError, r"random_state: "),
    (dict(random_state=1.5), TypeError, r"random_state: "),
    (dict(n_threads=0), ValueError, r"n_threads: expected an integer >= 1"),
]


@pytest.mark.parametrize("params,error,match", BAD_PARAMS, ids=[str(p[0]) for p in BAD_PARAMS])
def test_bad_model_params_raise_at_fit(X, params, error, match):
    sae = fresh(**params)
    with pytest.raises(error, match=match):
        sae.fit(X, epochs=1)
    with pytest.raises(error, match=match):
        ksae.SparseAutoencoder().set_params(**{"n_latents": 8, "k": 2, **params})
    with pytest.raises(error, match=match):
        fresh(**params).partial_fit(X)


BAD_FIT_OPTIONS = [
    (dict(lr=-1.0), ValueError, r"lr: expected a finite number > 0, got -1"),
    (dict(lr=0.0), ValueError, r"lr: "),
    (dict(lr=float("nan")), ValueError, r"lr: "),
    (dict(lr=float("inf")), ValueError, r"lr: "),
    (dict(lr="0.1"), TypeError, r"lr: expected a number"),
    (dict(batch_size=0), ValueError, r"batch_size: expected an integer >= 1, got 0"),
    (dict(batch_size=2.5), TypeError, r"batch_size: "),
    (dict(epochs=0), ValueError, r"epochs: expected an integer >= 1, got 0"),
    (dict(epochs=-2), ValueError, r"epochs: "),
    (dict(optimizer="adamm"), ValueError, r"optimizer: .*did you mean 'adam'\?"),
    (dict(optimizer="lbfgs"), ValueError, r"optimizer: expected one of 'adam', 'adamw', 'sgd'"),
    (dict(momentum=1.0), ValueError, r"momentum: expected 0 <= momentum < 1"),
    (dict(momentum=-0.1), ValueError, r"momentum: "),
    (dict(optimizer="sgd", momentum=0.0, nesterov=True), ValueError, r"nesterov: "),
    (dict(weight_decay=-1.0), ValueError, r"weight_decay: "),
    (dict(shuffle=1), TypeError, r"shuffle: expected a bool"),
    (dict(nesterov="yes"), TypeError, r"nesterov: expected a bool"),
    (dict(momentun=0.5), ValueError, r"fit: unknown option\(s\) 'momentun' \(did you mean 'momentum'\?\)"),
    (dict(learning_rate=0.1), ValueError, r"fit: unknown option\(s\) 'learning_rate'"),
]


@pytest.mark.parametrize("options,error,match", BAD_FIT_OPTIONS,
                         ids=[str(p[0]) for p in BAD_FIT_OPTIONS])
def test_bad_fit_options_raise(X, options, error, match):
    with pytest.raises(error, match=match):
        fresh().fit(X, **options)


@pytest.mark.parametrize("options,error,match", [
    (dict(lr=-1.0), ValueError, r"lr: "),
    (dict(optimizer="adamm"), ValueError, r"optimizer: .*did you mean 'adam'\?"),
    (dict(momentun=0.5), ValueError, r"partial_fit: unknown option\(s\) 'momentun'"),
])
def test_bad_partial_fit_options_raise(X, options, error, match):
    sae = fresh()
    with pytest.raises(error, match=match):
        sae.partial_fit(X, **options)
    with pytest.raises(RuntimeError, match="not fitted"):
        sae.encode(X)  # nothing was initialised


def test_good_options_are_accepted(X):
    sae = fresh(dtype=np.float64)
    sae.fit(X, epochs=1, batch_size=np.int64(16), lr=np.float32(0.01), optimizer="sgd",
            momentum=0.5, nesterov=True, weight_decay=0.0, shuffle=False)
    assert sae.W_dec_.dtype == np.float64
    assert sae.n_iter_ == 4


def test_optimizer_objects_validate():
    with pytest.raises(ValueError, match="lr"):
        ksae.Adam(lr=0.0)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        ksae.Adam(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        ksae.Adam(eps=0.0)
    with pytest.raises(ValueError, match="momentum"):
        ksae.SGD(momentum=1.5)
    with pytest.raises(ValueError, match="nesterov"):
        ksae.SGD(nesterov=True)


# --------------------------------------------------------------------------------- datasets & metrics
def test_make_sparse_dictionary_is_what_it_says():
    data = ksae.make_sparse_dictionary(n_samples=300, d_in=10, n_components=20, n_active=3,
                                       noise=0.0, random_state=4)
    assert data.X.shape == (300, 10) and data.X.dtype == np.float32
    assert data.directions.shape == (20, 10) and data.codes.shape == (300, 20)
    np.testing.assert_allclose(np.linalg.norm(data.directions, axis=1), 1.0, rtol=1e-6)
    assert np.all(np.count_nonzero(data.codes, axis=1) == 3)
    nz = data.codes[data.codes != 0]
    assert nz.min() >= 0.5 and nz.max() < 1.5
    np.testing.assert_allclose(data.X, data.codes @ data.directions, atol=1e-5)
    again = ksae.make_sparse_dictionary(n_samples=300, d_in=10, n_components=20, n_active=3,
                                        noise=0.0, random_state=4)
    np.testing.assert_array_equal(data.X, again.X)
    with pytest.raises(ValueError, match="n_active"):
        ksae.make_sparse_dictionary(n_components=3, n_active=4)


def test_metrics():
    rng = np.random.default_rng(0)
    T = rng.standard_normal((5, 8))
    assert ksae.dictionary_recovery(T, np.vstack([3 * T, rng.standard_normal((4, 8))])) == pytest.approx(1.0)
    assert ksae.dictionary_recovery(T, -T) < 0.5
    with pytest.raises(ValueError, match="true_directions, W_dec"):
        ksae.dictionary_recovery(T, T[:, :4])
    X = rng.standard_normal((50, 4))
    assert ksae.fraction_of_variance_explained(X, np.broadcast_to(X.mean(axis=0), X.shape)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="constant"):
        ksae.fraction_of_variance_explained(np.ones((5, 2)), np.ones((5, 2)))


def test_public_names():
    for name in ksae.__all__:
        assert hasattr(ksae, name), name
    assert isinstance(ksae.has_openmp(), bool)
    assert isinstance(ksae.__version__, str)


def test_readme_documents_every_option():
    from dataclasses import fields
    from pathlib import Path

    from ksae.config import ModelConfig, TrainConfig

    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    missing = [f.name for cls in (ModelConfig, TrainConfig) for f in fields(cls)
               if f"| `{f.name}` | `{f.default!r}` |" not in text]
    assert not missing, f"README.md lacks a row with the default for: {missing}"
