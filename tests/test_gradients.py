"""Finite-difference checks of the TopK gradients.

The top-k choice is not differentiable; it fixes the route the gradient takes. On data whose
k-th and (k+1)-th pre-activations are well apart, a small perturbation of any parameter does
not change the selection, so the loss is smooth there and central differences must match the
analytic gradients of ``_core.backward``.
"""

from __future__ import annotations

import numpy as np
import pytest

import ksae
from ksae import _core
from ksae import reference as ref
from ksae.losses import mse_loss

from conftest import ACTIVATIONS, rel_err

BATCH, D_IN, N_LATENTS, K = 6, 5, 9, 3
EPS = 1e-6
MIN_GAP = 1e-3
PARAMS = ("W_enc_t", "b_enc", "W_dec", "b_dec")


def forward(p, X, activation):
    centered = np.empty_like(X)
    selected_pre = np.empty((X.shape[0], K))
    values, indices = _core.encode(X, p["W_enc_t"], p["b_enc"], p["b_dec"], K, activation, 1,
                                   centered, None, selected_pre)
    X_hat = _core.decode(values, indices, p["W_dec"], p["b_dec"], 1)
    return centered, values, indices, X_hat, selected_pre


def loss_of(p, X, activation, expected_indices=None):
    _, values, indices, X_hat, _ = forward(p, X, activation)
    if expected_indices is not None:
        # The perturbation must not move the selection (else the check is meaningless).
        np.testing.assert_array_equal(np.sort(indices, axis=1), np.sort(expected_indices, axis=1))
    return mse_loss(X_hat, X)[0]


def well_separated(p, X, activation) -> bool:
    pre = ref.pre_activations(X, p["W_enc_t"].T, p["b_enc"], p["b_dec"])
    scores = ref.selection_scores(pre, activation)
    s = -np.sort(-scores, axis=1)
    if np.min(s[:, K - 1] - s[:, K]) <= MIN_GAP:
        return False
    if activation in ("leaky_relu", "elu"):  # away from the kink at 0
        return np.min(np.abs(s[:, :K])) > MIN_GAP
    if activation == "relu":
        # Away from the kink; most kept latents active so the encoder gets a gradient, and
        # at least one kept but inactive (relu'(pre) = 0 must block its route).
        kept = s[:, :K]
        if np.min(np.abs(kept)) <= MIN_GAP or np.mean(kept > 0) < 0.5 or not np.any(kept < 0):
            return False
    return True


def tie_free_problem(activation, seed0=0):
    """Small float64 problem whose selection is stable under perturbations of size EPS."""
    for seed in range(seed0, seed0 + 200):
        rng = np.random.default_rng(seed)
        p = {
            "W_enc_t": rng.standard_normal((N_LATENTS, D_IN)) / np.sqrt(D_IN),
            "b_enc": 0.3 + 0.2 * rng.standard_normal(N_LATENTS),
            "W_dec": rng.standard_normal((N_LATENTS, D_IN)) / np.sqrt(D_IN),
            "b_dec": 0.1 * rng.standard_normal(D_IN),
        }
        X = rng.standard_normal((BATCH, D_IN))
        if well_separated(p, X, activation):
            return p, X
    raise AssertionError("no tie-free problem found")  # pragma: no cover


def analytic_gradients(p, X, activation, project=False):
    centered, values, indices, X_hat, selected_pre = forward(p, X, activation)
    _, grad_out = mse_loss(X_hat, X)
    grads = {name: np.empty_like(p[name]) for name in PARAMS}
    _core.backward(grad_out, centered, values, indices, p["W_enc_t"], p["W_dec"], activation,
                   project, 1, *(grads[name] for name in PARAMS), False, selected_pre)
    return grads, indices


def central_differences(loss, p, name):
    """The central-difference gradient of ``loss(p)`` with respect to ``p[name]``."""
    grad = np.zeros_like(p[name])
    flat = p[name].reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + EPS
        up = loss(p)
        flat[i] = saved - EPS
        down = loss(p)
        flat[i] = saved
        grad.reshape(-1)[i] = (up - down) / (2 * EPS)
    return grad


def numeric_gradient(p, X, activation, name, indices):
    return central_differences(lambda q: loss_of(q, X, activation, indices), p, name)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", PARAMS)
def test_backward_matches_finite_differences(activation, name):
    p, X = tie_free_problem(activation)
    grads, indices = analytic_gradients(p, X, activation)
    numeric = numeric_gradient(p, X, activation, name, indices)
    assert np.linalg.norm(numeric) > 1e-6  # a real gradient, not a vacuous zero
    assert rel_err(grads[name], numeric) < 1e-6


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_projected_decoder_gradient_is_the_tangent_part(activation):
    # With project_decoder_grad the W_dec gradient is the finite-difference gradient with
    # each row's component along that row removed.
    p, X = tie_free_problem(activation)
    grads, indices = analytic_gradients(p, X, activation, project=True)
    numeric = numeric_gradient(p, X, activation, "W_dec", indices)
    W = p["W_dec"]
    tangent = numeric - (np.einsum("ij,ij->i", numeric, W) / np.einsum("ij,ij->i", W, W))[:, None] * W
    assert rel_err(grads["W_dec"], tangent) < 1e-6
    for name in ("W_enc_t", "b_enc", "b_dec"):  # the other gradients are unaffected
        assert rel_err(grads[name], numeric_gradient(p, X, activation, name, indices)) < 1e-6


def model_weights(sae):
    """The model's weights in the internal layout, copied, through the public attributes."""
    return {"W_enc_t": sae.W_enc_.T.copy(order="C"), "b_enc": sae.b_enc_.copy(),
            "W_dec": sae.W_dec_.copy(), "b_dec": sae.b_dec_.copy()}


def model_problem(activation):
    """A float64 model (initialised without changing its weights) and tie-free data."""
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        X = rng.standard_normal((BATCH, D_IN))
        sae = ksae.SparseAutoencoder(n_latents=N_LATENTS, k=K, activation=activation, init="he",
                                     normalize_decoder=False, dtype="float64", n_threads=1,
                                     random_state=seed)
        # A step of lr=1e-300 initialises the model and leaves every weight bit unchanged.
        sae.partial_fit(X, optimizer="sgd", momentum=0.0, lr=1e-300)
        p = model_weights(sae)
        if well_separated(p, X, activation):
            return sae, p, X
    raise AssertionError("no tie-free problem found")  # pragma: no cover


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_model_sgd_step_follows_finite_difference_gradient(activation):
    sae, p, X = model_problem(activation)
    lr = 1e-3
    sae.partial_fit(X, optimizer="sgd", momentum=0.0, lr=lr)
    assert sae.n_iter_ == 2
    after = model_weights(sae)
    _, indices = analytic_gradients(p, X, activation)
    for name in PARAMS:
        numeric = numeric_gradient(p, X, activation, name, indices)
        step = (p[name] - after[name]) / lr
        assert rel_err(step, numeric) < 1e-6, name


# ------------------------------------------------------------ a penalty on the code, a head
HEAD_WIDTH = 4


def code_penalty(values, coef):
    """A smooth penalty on the code, sum(coef * v + v**2 / 2), and its gradient coef + v."""
    return float(np.sum(coef * values + 0.5 * values * values)), coef + values


def head_problem(activation):
    """tie_free_problem with a random penalty coefficient per code entry, a head (K x
    HEAD_WIDTH weights and bias) and head targets."""
    p, X = tie_free_problem(activation)
    rng = np.random.default_rng(7)
    extra = {"coef": rng.standard_normal((BATCH, K)),
             "W_head": rng.standard_normal((N_LATENTS, HEAD_WIDTH)),
             "b_head": rng.standard_normal(HEAD_WIDTH),
             "target": rng.standard_normal((BATCH, HEAD_WIDTH))}
    return p, X, extra


def penalised_loss(p, X, activation, extra, head, expected_indices=None):
    """mse(decoder output, X) + code_penalty, or with ``head`` mse(head output, target) +
    code_penalty; the selection must stay that of the unperturbed problem."""
    _, values, indices, X_hat, _ = forward(p, X, activation)
    if expected_indices is not None:
        np.testing.assert_array_equal(np.sort(indices, axis=1), np.sort(expected_indices, axis=1))
    if head:
        out = _core.decode(values, indices, p["W_head"], p["b_head"], 1)
        loss = mse_loss(out, extra["target"])[0]
    else:
        loss = mse_loss(X_hat, X)[0]
    return loss + code_penalty(values, extra["coef"])[0]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("head", [False, True], ids=["decoder", "head"])
def test_backward_with_code_gradient_matches_finite_differences(activation, head):
    # grad_values carries a penalty on the code into the encoder's gradients; with a head of
    # another width in place of the decoder (grad_b_dec None: b_dec a fixed centering), the
    # head's gradients come from the same kernel and its bias's is grad_out.sum(axis=0).
    p, X, extra = head_problem(activation)
    p = {**p, "W_head": extra["W_head"], "b_head": extra["b_head"]}
    centered, values, indices, X_hat, selected_pre = forward(p, X, activation)
    out_weights = p["W_head"] if head else p["W_dec"]
    out = _core.decode(values, indices, out_weights, p["b_head"], 1) if head else X_hat
    _, grad_out = mse_loss(out, extra["target"] if head else X)
    _, grad_values = code_penalty(values, extra["coef"])
    grads = {name: np.empty_like(p[name]) for name in ("W_enc_t", "b_enc")}
    grads["out"] = np.empty_like(out_weights)
    grads["b_dec"] = None if head else np.empty_like(p["b_dec"])
    _core.backward(grad_out, centered, values, indices, p["W_enc_t"], out_weights, activation,
                   False, 1, grads["W_enc_t"], grads["b_enc"], grads["out"], grads["b_dec"],
                   False, selected_pre, grad_values)
    names = {"W_enc_t": "W_enc_t", "b_enc": "b_enc", "out": "W_head" if head else "W_dec"}
    names.update({"b_head": "b_head"} if head else {"b_dec": "b_dec"})
    if head:
        grads["b_head"] = grad_out.sum(axis=0)

    def loss(params):
        return penalised_loss(params, X, activation, extra, head, indices)

    for key, name in names.items():
        numeric = central_differences(loss, p, name)
        assert np.linalg.norm(numeric) > 1e-6, name
        assert rel_err(grads[key], numeric) < 1e-6, name


# ------------------------------------------------------------ the dense sparsities: l1, kl
DENSE = {"l1": ("relu", {"l1_coef": 0.05}), "kl": ("sigmoid", {"kl_coef": 0.05, "kl_target": 0.1})}


def dense_loss(p, X, sparsity, options):
    """mse + the sparsity's penalty on the dense code, computed from the reference."""
    activation = DENSE[sparsity][0]
    pre = ref.pre_activations(X, p["W_enc_t"].T, p["b_enc"], p["b_dec"])
    Z = ref.ACTIVATIONS[activation][0](pre)
    loss = ref.mse_loss(Z @ p["W_dec"] + p["b_dec"], X)[0]
    if sparsity == "l1":
        return loss + ref.l1_penalty(Z, options["l1_coef"])[0]
    return loss + ref.kl_penalty(Z, options["kl_target"], options["kl_coef"])[0]


@pytest.mark.parametrize("sparsity", sorted(DENSE))
def test_dense_sparsity_sgd_step_follows_finite_difference_gradient(sparsity):
    # One SGD step of a model with an L1 (relu) or KL (sigmoid) penalty moves every parameter
    # by lr times the central-difference gradient of reconstruction loss + penalty.
    activation, options = DENSE[sparsity]
    for seed in range(200):
        X = np.random.default_rng(seed).standard_normal((BATCH, D_IN))
        sae = ksae.SparseAutoencoder(n_latents=N_LATENTS, sparsity=sparsity, activation=activation,
                                     init="he", normalize_decoder=False, dtype="float64",
                                     n_threads=1, random_state=seed)
        sae.partial_fit(X, optimizer="sgd", momentum=0.0, lr=1e-300, **options)
        p = model_weights(sae)
        pre = ref.pre_activations(X, p["W_enc_t"].T, p["b_enc"], p["b_dec"])
        if np.min(np.abs(pre)) > MIN_GAP:  # away from relu's kink
            break
    lr = 1e-3
    sae.partial_fit(X, optimizer="sgd", momentum=0.0, lr=lr, **options)
    after = model_weights(sae)
    assert sae.history_ == {}  # partial_fit records no epochs
    for name in PARAMS:
        numeric = central_differences(lambda q: dense_loss(q, X, sparsity, options), p, name)
        step = (p[name] - after[name]) / lr
        assert np.linalg.norm(numeric) > 1e-6, name
        assert rel_err(step, numeric) < 1e-6, name
    # The penalty is part of the gradient: without it the step differs.
    no_penalty = {**options, "l1_coef": 0.0, "kl_coef": 0.0}
    penalty_free = central_differences(lambda q: dense_loss(q, X, sparsity, no_penalty), p, "b_enc")
    assert rel_err(penalty_free, (p["b_enc"] - after["b_enc"]) / lr) > 1e-3


# ------------------------------------------------------------ jumprelu
def jumprelu_problem(bandwidth):
    """A float64 jumprelu model without a binding cap (max_k = n_latents), initialised, with
    a random threshold per latent, and data whose pre-activations keep clear of the thresholds (a stable mask), with some
    inside the straight-through kernel's band, some active and some not."""
    for seed in range(200):
        X = np.random.default_rng(seed).standard_normal((BATCH, D_IN))
        sae = ksae.SparseAutoencoder(n_latents=N_LATENTS, k=3, sparsity="jumprelu",
                                     max_k=N_LATENTS, jumprelu_init_threshold=0.2, init="he",
                                     normalize_decoder=False, dtype="float64", n_threads=1,
                                     random_state=seed)
        sae.partial_fit(X, optimizer="sgd", momentum=0.0, lr=1e-300)
        sae.log_threshold_[:] = np.log(np.random.default_rng(seed).uniform(0.1, 0.4, N_LATENTS))
        p = model_weights(sae)
        p["log_threshold"] = sae.log_threshold_.copy()
        theta = np.exp(p["log_threshold"])
        gap = ref.pre_activations(X, p["W_enc_t"].T, p["b_enc"], p["b_dec"]) - theta
        if (np.min(np.abs(gap)) > MIN_GAP and np.mean(gap > 0) > 0.2
                and np.count_nonzero(np.abs(gap) < bandwidth / 2) >= 5):
            return sae, p, X
    raise AssertionError("no stable problem found")  # pragma: no cover


def jumprelu_loss(p, X):
    """mse of the dense JumpReLU model (its L0 penalty is constant under small changes)."""
    pre = ref.pre_activations(X, p["W_enc_t"].T, p["b_enc"], p["b_dec"])
    Z = ref.jumprelu(pre, np.exp(p["log_threshold"]))
    return ref.mse_loss(Z @ p["W_dec"] + p["b_dec"], X)[0]


def test_jumprelu_sgd_step_follows_finite_differences_and_the_threshold_estimator():
    # W and b: the finite-difference gradient (the mask is fixed); the thresholds: the
    # straight-through estimate of the reconstruction and L0 terms, from the reference.
    bandwidth, l0_coef, lr = 0.2, 0.3, 1e-3
    sae, p, X = jumprelu_problem(bandwidth)
    sae.partial_fit(X, optimizer="sgd", momentum=0.0, lr=lr, l0_coef=l0_coef,
                    jumprelu_bandwidth=bandwidth)
    after = {**model_weights(sae), "log_threshold": sae.log_threshold_}
    for name in PARAMS:
        numeric = central_differences(lambda q: jumprelu_loss(q, X), p, name)
        assert np.linalg.norm(numeric) > 1e-6, name
        assert rel_err((p[name] - after[name]) / lr, numeric) < 1e-6, name
    theta = np.exp(p["log_threshold"])
    pre = ref.pre_activations(X, p["W_enc_t"].T, p["b_enc"], p["b_dec"])
    Z = ref.jumprelu(pre, theta)
    grad_out = ref.mse_loss(Z @ p["W_dec"] + p["b_dec"], X)[1]
    want = ref.jumprelu_threshold_gradient(pre, theta, grad_out @ p["W_dec"].T, bandwidth, l0_coef)
    assert np.count_nonzero(want) >= 3
    assert rel_err((p["log_threshold"] - after["log_threshold"]) / lr, want) < 1e-6


# ------------------------------------------------------------ the classifier
def classifier_loss(p, X, y, activation, expected_indices):
    """Mean cross-entropy of softmax(code @ W_head + b_head), the code from the reference
    encode (its selection must stay that of the unperturbed problem)."""
    values, indices = ref.encode(X, p["W_enc_t"].T, p["b_enc"], p["b_dec"], K, activation)
    np.testing.assert_array_equal(np.sort(indices, axis=1), np.sort(expected_indices, axis=1))
    logits = ref.densify(values, indices, N_LATENTS) @ p["W_head"] + p["b_head"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -np.mean(logp[np.arange(len(y)), y])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_classifier_sgd_step_follows_finite_difference_gradient(activation):
    # One step of the classifier (encoder and head together) moves each of its parameters by
    # lr times the central-difference gradient of the cross-entropy; b_dec does not move.
    sae, p, X = model_problem(activation)
    y = np.arange(BATCH) % 3
    clf = ksae.SparseClassifier(sae, 3).fit(X, y, epochs=1, batch_size=BATCH, optimizer="sgd",
                                            momentum=0.0, lr=1e-300)
    rng = np.random.default_rng(5)
    clf.W_head_[:] = rng.standard_normal((N_LATENTS, 3))  # a head that passes a gradient back
    clf.b_head_[:] = rng.standard_normal(3)
    p = {"W_enc_t": clf.W_enc_.T.copy(order="C"), "b_enc": clf.b_enc_.copy(),
         "b_dec": clf.b_dec_.copy(), "W_head": clf.W_head_.copy(), "b_head": clf.b_head_.copy()}
    _, indices = ref.encode(X, p["W_enc_t"].T, p["b_enc"], p["b_dec"], K, activation)
    ws = {"centered": np.empty_like(X), "pre": np.empty((BATCH, N_LATENTS)),
          "selected_pre": np.empty((BATCH, K))}
    lr = 1e-3
    clf._step(X, y, ksae.SGD(lr=lr), None, ws)
    after = {"W_enc_t": clf.W_enc_.T, "b_enc": clf.b_enc_, "W_head": clf.W_head_, "b_head": clf.b_head_}
    for name, moved in after.items():
        numeric = central_differences(lambda q: classifier_loss(q, X, y, activation, indices), p, name)
        assert np.linalg.norm(numeric) > 1e-6, name
        assert rel_err((p[name] - moved) / lr, numeric) < 1e-6, name
    np.testing.assert_array_equal(clf.b_dec_, p["b_dec"])
