"""SparseAutoencoder as a scikit-learn citizen: the estimator checks, pipelines, searches,
clone and pickle, NotFittedError, set_output, feature names and inverse_transform.
scikit-learn is a test dependency only (``import ksae`` never imports it)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import check_is_fitted

import ksae

EXPECTED_FAILED_CHECKS = {
    "check_estimators_dtypes":
        "integer input is refused with a TypeError on purpose: 0-255 pixel intensities fed "
        "as integers are the commonest mistake; ksae asks for an explicit astype (and / 255)",
    "check_dtype_object":
        "object arrays are refused like integers: ksae converts only floating-point data",
    "check_complex_data":
        "complex input is refused as a TypeError (a wrong dtype) where scikit-learn raises a "
        "ValueError; the message names the dtype",
    "check_do_not_raise_errors_in_init_or_set_params":
        "set_params validates the values it is given at once (and leaves the estimator "
        "unchanged), so a typo fails where it is made rather than after a long fit; the "
        "constructor itself validates nothing",
}
"""Every scikit-learn check the estimator is expected to fail, with the reason: ksae's
documented input and parameter contracts, which its own tests hold it to."""


def expected_failures(estimator):
    return EXPECTED_FAILED_CHECKS


NOT_A_BASE_ESTIMATOR = "ignore:Estimator SparseAutoencoder does not inherit:UserWarning"
"""scikit-learn warns that the estimator does not inherit its BaseEstimator: ksae keeps
scikit-learn out of its dependencies and implements the protocol itself."""

with warnings.catch_warnings():
    warnings.filterwarnings(*NOT_A_BASE_ESTIMATOR.split(":")[:2], category=UserWarning)
    estimator_checks = parametrize_with_checks(
        [ksae.SparseAutoencoder(n_latents=16, k=4, random_state=0),
         ksae.SparseAutoencoder(n_latents=16, k=4, random_state=0, dtype="float64",
                                sparsity="batchtopk", epochs=3)],
        expected_failed_checks=expected_failures, xfail_strict=True)


@pytest.mark.filterwarnings(NOT_A_BASE_ESTIMATOR)
@pytest.mark.filterwarnings("ignore:.*delay parameter validation until fit:UserWarning")  # as above
@estimator_checks
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X.astype(np.float32), y, test_size=0.25, random_state=0)


def test_a_pipeline_of_scaler_sae_and_logistic_regression_fits_and_scores(digits):
    X_train, X_test, y_train, y_test = digits
    pipe = make_pipeline(StandardScaler(),
                         ksae.SparseAutoencoder(n_latents=256, k=16, random_state=0, epochs=20),
                         LogisticRegression(max_iter=2000))
    pipe.fit(X_train, y_train)
    accuracy = pipe.score(X_test, y_test)
    assert accuracy > 0.9, accuracy  # the codes keep what tells the digits apart
    codes = pipe[:-1].transform(X_test)
    assert codes.shape == (X_test.shape[0], 256) and codes.dtype == np.float32
    assert ((codes != 0).sum(axis=1) <= 16).all()


def test_fit_params_reach_the_sae_through_a_pipeline(digits):
    X_train = digits[0]
    pipe = make_pipeline(StandardScaler(), ksae.SparseAutoencoder(n_latents=32, k=4, random_state=0))
    pipe.fit(X_train, sparseautoencoder__epochs=2, sparseautoencoder__batch_size=64)
    assert len(pipe[-1].history_["loss"]) == 2
    assert pipe[-1].n_iter_ == 2 * int(np.ceil(X_train.shape[0] / 64))


def test_grid_search_over_k_and_lr_picks_by_its_scorer(digits):
    X_train = StandardScaler().fit_transform(digits[0])
    search = GridSearchCV(ksae.SparseAutoencoder(n_latents=64, random_state=0, epochs=3),
                          {"k": [2, 8], "lr": [1e-3, 3e-3]}, cv=2)
    search.fit(X_train)
    assert set(search.cv_results_["param_k"]) == {2, 8}
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    # The score is the variance explained: more latents per sample explain more.
    assert search.best_params_["k"] == 8
    assert search.best_estimator_.get_params()["lr"] == search.best_params_["lr"]
    assert search.best_estimator_.n_iter_ > 0


def test_training_defaults_are_parameters_that_fit_arguments_override():
    X = np.random.default_rng(0).standard_normal((64, 6)).astype(np.float32)
    sae = ksae.SparseAutoencoder(n_latents=16, k=2, random_state=0, epochs=2, batch_size=16)
    assert sae.get_params()["epochs"] == 2 and "epochs=2" in repr(sae)
    assert len(sae.fit(X).history_["loss"]) == 2
    assert len(sae.fit(X, epochs=1).history_["loss"]) == 1
    assert clone(sae).get_params() == sae.get_params()
    with pytest.raises(ValueError, match="lr"):
        sae.set_params(lr=-1.0)
    assert "lr" not in sae.get_params()  # a refused value changes nothing
    with pytest.raises(TypeError, match="n_latnets"):
        ksae.SparseAutoencoder(n_latnets=3)


def test_clone_and_pickle_round_trip():
    X = np.random.default_rng(1).standard_normal((80, 5)).astype(np.float32)
    sae = ksae.SparseAutoencoder(n_latents=12, k=3, random_state=0, lr=2e-3).fit(X, epochs=2)
    twin = clone(sae)
    assert twin.get_params() == sae.get_params() and not hasattr(twin, "n_features_in_")
    np.testing.assert_array_equal(twin.fit(X, epochs=2).transform(X), sae.transform(X))
    restored = pickle.loads(pickle.dumps(sae))
    np.testing.assert_array_equal(restored.transform(X), sae.transform(X))
    restored.partial_fit(X)  # a restored model trains on
    assert restored.n_iter_ == sae.n_iter_ + 1


def test_unfitted_use_raises_scikit_learns_not_fitted_error():
    sae = ksae.SparseAutoencoder(n_latents=8, k=2)
    assert not hasattr(sae, "n_features_in_")
    with pytest.raises(NotFittedError, match="not fitted"):
        sae.transform(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(NotFittedError):
        check_is_fitted(sae)
    error = pytest.raises(ksae.NotFittedError, sae.encode, np.ones((1, 3)))
    assert isinstance(error.value, (ValueError, AttributeError, RuntimeError))


def test_without_scikit_learn_the_not_fitted_error_is_ksaes_own():
    code = ("import sys, ksae\n"
            "assert 'sklearn' not in sys.modules\n"
            "try:\n"
            "    ksae.SparseAutoencoder().W_dec_\n"
            "except ksae.NotFittedError as e:\n"
            "    assert isinstance(e, ValueError) and isinstance(e, AttributeError)\n"
            "    assert type(e) is ksae.NotFittedError\n"
            "assert 'sklearn' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sparse_input_gets_a_clear_type_error():
    scipy_sparse = pytest.importorskip("scipy.sparse")
    X = scipy_sparse.random(20, 6, density=0.3, format="csr", dtype=np.float32, random_state=0)
    with pytest.raises(TypeError, match=r"X: scipy.sparse input is not supported.*X.toarray\(\)"):
        ksae.SparseAutoencoder(n_latents=8, k=2).fit(X)


def test_inverse_transform_maps_dense_codes_back_to_reconstructions():
    X = np.random.default_rng(2).standard_normal((50, 7)).astype(np.float32)
    for kwargs in ({}, {"output_activation": "sigmoid", "sparsity": "batchtopk"}):
        sae = ksae.SparseAutoencoder(n_latents=20, k=3, random_state=0, **kwargs).fit(X, epochs=2)
        np.testing.assert_allclose(sae.inverse_transform(sae.transform(X)), sae.reconstruct(X),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="20 columns"):
        sae.inverse_transform(X)


def test_feature_names_and_set_output():
    X = np.random.default_rng(3).standard_normal((30, 4)).astype(np.float32)
    sae = ksae.SparseAutoencoder(n_latents=6, k=2, random_state=0).fit(X, epochs=1)
    names = sae.get_feature_names_out()
    assert names.dtype == object and list(names) == [f"sparseautoencoder{i}" for i in range(6)]
    with pytest.raises(ValueError, match="input_features should have length"):
        sae.get_feature_names_out(["a", "b"])
    assert sae.set_output(transform="default") is sae
    assert isinstance(sae.transform(X), np.ndarray)
    with pytest.raises(ValueError, match="transform: expected one of"):
        sae.set_output(transform="arrow")
    pd = pytest.importorskip("pandas")
    frame = sae.set_output(transform="pandas").transform(pd.DataFrame(X, index=range(10, 40)))
    assert list(frame.columns) == list(names) and list(frame.index) == list(range(10, 40))
