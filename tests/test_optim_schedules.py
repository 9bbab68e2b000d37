"""RMSprop (kernel, reference, optimizer), the squared-norm kernel and gradient clipping by
global norm, and the learning-rate schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest

import ksae
from ksae import _core
from ksae import reference as ref
from ksae.config import TrainConfig
from ksae.optim import RMSprop, clip_grad_norm, make_optimizer
from ksae.schedules import (SCHEDULES, ConstantLR, CosineLR, ExponentialLR, StepLR,
                            make_schedule)

from conftest import DTYPES, THREADS, as64, rel_err, tol

DTYPE_IDS = lambda d: np.dtype(d).name  # noqa: E731


def optimizer_inputs(rng, shape, dtype, steps):
    param = np.ascontiguousarray(rng.standard_normal(shape), dtype=dtype)
    grads = [np.ascontiguousarray(rng.standard_normal(shape), dtype=dtype) for _ in range(steps)]
    return param, grads


# --------------------------------------------------------------------------------- RMSprop
RMSPROP = dict(lr=0.01, alpha=0.9, eps=1e-8)


@pytest.mark.parametrize("shape", [(37,), (13, 29), (1, 16)], ids=str)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("unit_norm_rows", [False, True], ids=["free", "unit"])
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rmsprop_update_matches_reference(rng, shape, momentum, weight_decay, unit_norm_rows,
                                          n_threads, dtype):
    param, grads = optimizer_inputs(rng, shape, dtype, steps=4)
    square_avg = np.zeros_like(param)
    buf = np.zeros_like(param) if momentum else None
    p64, sq64, buf64 = as64(param), np.zeros(shape), np.zeros(shape)
    for step, g in enumerate(grads, start=1):
        _core.rmsprop_update(param, g, square_avg, buf, RMSPROP["lr"], RMSPROP["alpha"],
                             RMSPROP["eps"], momentum, weight_decay, unit_norm_rows, n_threads)
        ref.rmsprop_update(p64, as64(g), sq64, buf64, momentum=momentum,
                           weight_decay=weight_decay, unit_norm_rows=unit_norm_rows, **RMSPROP)
        assert param.dtype == dtype and square_avg.dtype == dtype
        assert rel_err(param, p64) < tol(dtype), f"step {step}"
        assert rel_err(square_avg, sq64) < tol(dtype), f"step {step}"
        if momentum:
            assert rel_err(buf, buf64) < tol(dtype), f"step {step}"
    if unit_norm_rows:
        norms = np.linalg.norm(param.reshape(-1, shape[-1]).astype(np.float64), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=10 * np.finfo(dtype).eps)


def torch_rmsprop(params, grads_per_step, *, lr, alpha, eps, momentum, weight_decay):
    """torch.optim.RMSprop's single-tensor loop (centered=False), op for op."""
    params = {k: v.copy() for k, v in params.items()}
    square_avg = {k: np.zeros_like(v) for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in params.items()}
    for grads in grads_per_step:
        for k, param in params.items():
            grad = grads[k]
            if weight_decay != 0:
                grad = grad + weight_decay * param                   # grad.add(param, alpha=wd)
            square_avg[k] = square_avg[k] * alpha + (1 - alpha) * grad * grad  # mul_.addcmul_
            avg = np.sqrt(square_avg[k]) + eps                        # sqrt().add_(eps)
            if momentum > 0:
                buf[k] = buf[k] * momentum + grad / avg               # mul_.addcdiv_
                param -= lr * buf[k]                                  # add_(buf, alpha=-lr)
            else:
                param -= lr * (grad / avg)                            # addcdiv_(value=-lr)
    return params


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rmsprop_optimizer_follows_torch_formula(rng, momentum, weight_decay, dtype):
    shapes = {"W": (6, 5), "b": (5,)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    steps = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(5)]
    want = torch_rmsprop(params, steps, lr=0.01, alpha=0.99, eps=1e-8, momentum=momentum,
                         weight_decay=weight_decay)
    opt = RMSprop(lr=0.01, momentum=momentum, weight_decay=weight_decay)  # torch's alpha, eps
    got = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in params.items()}
    for grads in steps:
        opt.step(got, {k: np.ascontiguousarray(v, dtype=dtype) for k, v in grads.items()})
    assert opt.n_steps == 5
    for k in shapes:
        assert got[k].dtype == dtype
        assert rel_err(got[k], want[k]) < (1e-13 if dtype == np.float64 else 1e-5), k


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("unit_norm_rows", [False, True], ids=["free", "unit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rmsprop_bitwise_identical_for_one_and_two_threads(rng, momentum, unit_norm_rows, dtype):
    param0, grads = optimizer_inputs(rng, (300, 37), dtype, steps=3)
    results = []
    for nt in THREADS:
        p, sq = param0.copy(), np.zeros_like(param0)
        buf = np.zeros_like(param0) if momentum else None
        for g in grads:
            _core.rmsprop_update(p, g, sq, buf, 1e-2, 0.99, 1e-8, momentum, 0.01, unit_norm_rows, nt)
        results.append((p, sq) if buf is None else (p, sq, buf))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_rmsprop_plain_needs_no_buffer_and_ignores_one(rng):
    param, (g,) = optimizer_inputs(rng, (4, 5), np.float64, 1)
    with pytest.raises(ValueError, match="^momentum_buffer: required"):
        _core.rmsprop_update(param, g, np.zeros_like(param), None, 0.1, 0.9, 1e-8, 0.9, 0.0)
    a, b = param.copy(), param.copy()
    _core.rmsprop_update(a, g, np.zeros_like(param), None, 0.1, 0.9, 1e-8, 0.0, 0.0)
    unused = np.zeros_like(param)
    _core.rmsprop_update(b, g, np.zeros_like(param), unused, 0.1, 0.9, 1e-8, 0.0, 0.0)
    np.testing.assert_array_equal(a, b)
    assert not unused.any()
    # First step from zero state: square_avg = 0.1*g^2, so the step is lr*g/(sqrt(0.1)|g| + eps).
    np.testing.assert_allclose(a, param - 0.1 * g / (np.sqrt(0.1) * np.abs(g) + 1e-8), rtol=1e-14)


@pytest.mark.parametrize("bad,match", [(dict(lr=-1.0), "lr"), (dict(alpha=1.0), "alpha"),
                                       (dict(alpha=-0.1), "alpha"), (dict(eps=0.0), "eps"),
                                       (dict(momentum=1.0), "momentum"),
                                       (dict(momentum=-0.5), "momentum"),
                                       (dict(weight_decay=-1.0), "weight_decay"),
                                       (dict(lr=float("nan")), "lr")])
def test_rmsprop_update_rejects_bad_settings(rng, bad, match):
    param, (g,) = optimizer_inputs(rng, (3, 4), np.float64, 1)
    settings = dict(lr=0.1, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0)
    settings.update(bad)
    before = param.copy()
    with pytest.raises(ValueError, match=f"^{match}: "):
        _core.rmsprop_update(param, g, np.zeros_like(param), np.zeros_like(param), **settings)
    np.testing.assert_array_equal(param, before)


def test_rmsprop_binding_errors(rng):
    param, (g,) = optimizer_inputs(rng, (3, 4), np.float64, 1)
    sq = np.zeros_like(param)
    settings = (0.1, 0.99, 1e-8, 0.9, 0.0)
    with pytest.raises(TypeError, match="^grad: .*float64.*float32"):
        _core.rmsprop_update(param, g.astype(np.float32), sq, np.zeros_like(param), *settings)
    with pytest.raises(ValueError, match=r"^square_avg: .*\(3, 4\).*\(4, 3\)"):
        _core.rmsprop_update(param, g, np.zeros((4, 3)), np.zeros_like(param), *settings)
    with pytest.raises(ValueError, match=r"^momentum_buffer: .*\(3, 4\).*\(3, 5\)"):
        _core.rmsprop_update(param, g, sq, np.zeros((3, 5)), *settings)
    with pytest.raises(ValueError, match="^param: .*not C-contiguous"):
        _core.rmsprop_update(np.asfortranarray(param), g, sq, np.zeros_like(param), *settings)
    read_only = sq.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="^square_avg: .*read-only"):
        _core.rmsprop_update(param, g, read_only, np.zeros_like(param), *settings)
    with pytest.raises(TypeError, match="^param: expected a numpy array"):
        _core.rmsprop_update([1.0, 2.0], g, sq, None, 0.1, 0.99, 1e-8, 0.0, 0.0)


def test_rmsprop_optimizer_settings_and_state():
    opt = RMSprop()
    assert opt.name == "rmsprop"
    assert opt.hyperparameters() == {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "momentum": 0.0,
                                     "weight_decay": 0.0}
    params = {"w": np.ones((2, 3), np.float32)}
    opt.step(params, {"w": np.ones((2, 3), np.float32)})
    assert set(opt.state["w"]) == {"square_avg"}  # no momentum buffer without momentum
    opt = RMSprop(momentum=0.5)
    opt.step(params, {"w": np.ones((2, 3), np.float32)})
    assert set(opt.state["w"]) == {"square_avg", "momentum_buffer"}
    assert ksae.RMSprop is RMSprop


@pytest.mark.parametrize("kwargs,match", [(dict(lr=0.0), "lr"), (dict(alpha=1.0), "alpha"),
                                          (dict(alpha=-0.1), "alpha"), (dict(eps=0.0), "eps"),
                                          (dict(momentum=1.0), "momentum"),
                                          (dict(weight_decay=-1e-3), "weight_decay")])
def test_rmsprop_optimizer_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=f"^{match}: "):
        RMSprop(**kwargs)


def test_make_optimizer_builds_rmsprop():
    opt = make_optimizer(TrainConfig(optimizer="rmsprop", lr=3e-3, weight_decay=1e-4))
    assert isinstance(opt, RMSprop)
    assert opt.hyperparameters() == {"lr": 3e-3, "alpha": 0.99, "eps": 1e-8, "momentum": 0.0,
                                     "weight_decay": 1e-4}


def test_rmsprop_reduces_the_training_loss():
    data = ksae.make_sparse_dictionary(n_samples=1000, d_in=16, n_components=24, n_active=2,
                                       random_state=0)
    sae = ksae.SparseAutoencoder(n_latents=48, k=3, random_state=0, n_threads=1)
    sae.fit(data.X, epochs=4, batch_size=64, lr=3e-3, optimizer="rmsprop")
    loss = sae.history_["loss"]
    assert loss[-1] < 0.5 * loss[0]


# --------------------------------------------------------------------------------- squared norm
CHUNK = 1 << 14  # kNormChunk in cpp/ksae/optim.hpp
NORM_SIZES = [0, 1, 7, 9, 1000, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5]


@pytest.mark.parametrize("size", NORM_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_squared_norm_matches_float64_numpy(rng, size, dtype):
    a = rng.standard_normal(size).astype(dtype)
    want = np.sum(a.astype(np.float64) ** 2)
    got = [_core.squared_norm(a, nt) for nt in (*THREADS, 3, 0)]
    assert all(type(x) is float for x in got)
    assert got[0] == pytest.approx(want, rel=1e-13, abs=0.0)
    assert len({x.hex() for x in got}) == 1, f"differs across thread counts: {got}"


@pytest.mark.parametrize("shape", [(CHUNK + 3, 3), (5, 7, 11), (3, 0)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_squared_norm_any_shape(rng, shape, dtype):
    a = rng.standard_normal(shape).astype(dtype)
    assert _core.squared_norm(a, 1) == _core.squared_norm(a.ravel(), 2)
    assert _core.squared_norm(a) == pytest.approx(ref.squared_norm(a), rel=1e-13, abs=0.0)


def test_squared_norm_exact_on_integers():
    a = np.arange(-70001, 70002, dtype=np.float32)  # squares and their sum are exact in double
    n = 70001
    assert _core.squared_norm(a, 2) == 2 * (n * (n + 1) * (2 * n + 1) // 6)


def test_squared_norm_non_finite():
    a = np.ones(3 * CHUNK)
    a[CHUNK + 2] = np.inf
    assert _core.squared_norm(a, 2) == np.inf
    a[5] = np.nan
    assert math.isnan(_core.squared_norm(a, 2))


@pytest.mark.parametrize("kernel", ["squared_norm", "all_finite"])
def test_flat_array_kernel_errors(kernel):
    call = getattr(_core, kernel)
    with pytest.raises(TypeError, match="^array: expected a numpy array"):
        call([1.0, 2.0])
    with pytest.raises(TypeError, match="^array: "):
        call(np.arange(4))
    with pytest.raises(ValueError, match="^array: .*not C-contiguous"):
        call(np.ones((4, 4))[:, ::2])


# --------------------------------------------------------------------------------- all finite
@pytest.mark.parametrize("size", NORM_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_all_finite_matches_numpy_wherever_the_bad_value_sits(rng, size, dtype):
    # The kernel sums x * 0 in lanes per chunk: a NaN or infinity in any lane, the tail past
    # the last full group of lanes, or any chunk must turn the answer, at every thread count.
    a = rng.standard_normal(size).astype(dtype)
    counts = (*THREADS, 3, 0)
    assert all(_core.all_finite(a, nt) is True for nt in counts)
    positions = sorted({p for p in (0, 1, 15, 16, size // 2, CHUNK, size - 2, size - 1)
                        if 0 <= p < size})
    for bad in (np.nan, np.inf, -np.inf):
        for position in positions:
            b = a.copy()
            b[position] = bad
            assert not np.isfinite(b).all()
            for nt in counts:
                assert _core.all_finite(b, nt) is False, (bad, position, nt)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_all_finite_extreme_finite_values_and_shapes(dtype):
    info = np.finfo(dtype)
    # The largest finite values, subnormals and negative zeros are finite (x * 0 stays zero).
    a = np.array([info.max, -info.max, info.smallest_subnormal, -0.0, info.tiny] * 7, dtype=dtype)
    assert _core.all_finite(a, 1) and _core.all_finite(a.reshape(5, 7), 2)
    assert _core.all_finite(np.empty((3, 0), dtype))
    b = np.full((CHUNK + 3, 3), info.max, dtype)
    assert _core.all_finite(b, 2)
    b[-1, -1] = np.nan
    assert not _core.all_finite(b, 2)


# --------------------------------------------------------------------------------- clipping
def gradients(rng, dtype, scale=1.0):
    """A dict of 4 gradients shaped like a model's."""
    shapes = {"W_enc_t": (40, 9), "b_enc": (40,), "W_dec": (40, 9), "b_dec": (9,)}
    return {k: np.ascontiguousarray(scale * rng.standard_normal(s), dtype=dtype)
            for k, s in shapes.items()}


def global_norm(grads):
    return math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_clip_grad_norm_scales_when_above(rng, dtype):
    grads = gradients(rng, dtype)
    before = {k: g.copy() for k, g in grads.items()}
    ids = {k: id(g) for k, g in grads.items()}
    total = global_norm(grads)
    max_norm = total / 4
    got = clip_grad_norm(grads, max_norm, n_threads=2)
    assert got == pytest.approx(total, rel=1e-13)
    coef = max_norm / (total + 1e-6)
    for k, g in grads.items():
        assert id(g) == ids[k] and g.dtype == dtype
        np.testing.assert_allclose(g, before[k] * coef, rtol=tol(dtype))
    assert global_norm(grads) == pytest.approx(total * coef, rel=10 * tol(dtype))
    assert max_norm - 1e-6 < global_norm(grads) < max_norm + 10 * tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_clip_grad_norm_leaves_gradients_alone_when_below(rng, dtype):
    grads = gradients(rng, dtype)
    before = {k: g.copy() for k, g in grads.items()}
    total = clip_grad_norm(grads, 1e6)
    assert total == pytest.approx(global_norm(grads), rel=1e-13)
    assert clip_grad_norm(grads, total) == total  # at the threshold: not above, untouched
    for k, g in grads.items():
        np.testing.assert_array_equal(g, before[k])


def test_clip_grad_norm_same_for_any_thread_count(rng):
    big = {"a": rng.standard_normal(3 * CHUNK + 11).astype(np.float32),
           "b": rng.standard_normal((CHUNK + 1, 2))}
    norms = [clip_grad_norm({k: g.copy() for k, g in big.items()}, 1e9, nt) for nt in (1, 2, 0)]
    assert len({x.hex() for x in norms}) == 1


def test_clip_grad_norm_non_finite_is_returned_unscaled(rng):
    grads = gradients(rng, np.float64)
    grads["b_dec"][3] = np.inf
    before = {k: g.copy() for k, g in grads.items()}
    assert clip_grad_norm(grads, 1.0) == np.inf
    grads["b_enc"][0] = np.nan
    assert math.isnan(clip_grad_norm(grads, 1.0))
    for k in ("W_enc_t", "W_dec"):
        np.testing.assert_array_equal(grads[k], before[k])


def test_clip_grad_norm_edge_cases_and_errors(rng):
    assert clip_grad_norm({}, 1.0) == 0.0
    assert clip_grad_norm({"z": np.zeros(5)}, 1.0) == 0.0
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="^max_norm: "):
            clip_grad_norm({"g": np.ones(3)}, bad)
    with pytest.raises(TypeError, match=r"^grads\['b'\]: array: "):
        clip_grad_norm({"a": np.ones(3), "b": np.ones(3, np.int64)}, 1.0)
    with pytest.raises(ValueError, match=r"^grads\['b'\]: array: .*not C-contiguous"):
        clip_grad_norm({"a": np.ones(3), "b": np.ones((4, 4)).T}, 1.0)
    read_only = np.ones(3)
    read_only.flags.writeable = False
    first = np.ones(3)
    with pytest.raises(ValueError, match=r"^grads\['b'\]: array is read-only"):
        clip_grad_norm({"a": first, "b": read_only}, 1.0)
    np.testing.assert_array_equal(first, 1.0)  # nothing scaled


# --------------------------------------------------------------------------------- schedules
def curve(schedule, steps):
    return [schedule(s) for s in steps]


def test_constant_schedule_with_and_without_warmup():
    assert curve(ConstantLR(0.1), [0, 1, 1000]) == [0.1, 0.1, 0.1]
    lr = ConstantLR(0.1, warmup_steps=4)
    assert curve(lr, range(7)) == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1],
                                                rel=1e-15)
    assert lr(3) == 0.1  # the last warm-up step reaches base_lr


def test_step_schedule():
    lr = StepLR(0.1, step_size=3, gamma=0.5)
    assert curve(lr, [0, 2, 3, 5, 6, 9, 30]) == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025, 0.0125, 0.1 / 1024], rel=1e-15)
    warm = StepLR(0.1, step_size=3, gamma=0.5, warmup_steps=2)
    # Warm-up 0.05, 0.1; then t = step - 2 decays at t = 3, 6.
    assert curve(warm, [0, 1, 2, 4, 5, 7, 8]) == pytest.approx(
        [0.05, 0.1, 0.1, 0.1, 0.05, 0.05, 0.025], rel=1e-15)
    assert StepLR(1.0, step_size=10)(10) == pytest.approx(0.1, rel=1e-15)  # gamma defaults to 0.1


def test_exponential_schedule():
    assert curve(ExponentialLR(1.0, 0.5), range(5)) == [1.0, 0.5, 0.25, 0.125, 0.0625]
    warm = ExponentialLR(0.2, 0.9, warmup_steps=1)
    assert curve(warm, [0, 1, 2, 11]) == pytest.approx([0.2, 0.2, 0.18, 0.2 * 0.9**10], rel=1e-14)


def test_cosine_schedule():
    lr = CosineLR(2.0, total_steps=4)
    r = math.sqrt(2) / 2
    assert curve(lr, range(7)) == pytest.approx([2.0, 1 + r, 1.0, 1 - r, 0.0, 0.0, 0.0],
                                                rel=1e-14, abs=1e-15)
    warm = CosineLR(1.0, total_steps=10, min_lr=0.1, warmup_steps=2)  # anneals over T = 8 steps
    expect = {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, 6: 0.55,
              9: 0.1 + 0.9 * (1 + math.cos(7 * math.pi / 8)) / 2, 10: 0.1, 500: 0.1}
    for step, want in expect.items():
        assert warm(step) == pytest.approx(want, rel=1e-14), step
    assert warm(10) == 0.1  # exactly min_lr from total_steps on
    post = curve(warm, range(1, 12))
    assert all(a >= b for a, b in zip(post, post[1:]))


def test_schedules_accept_numpy_steps_and_reject_bad_ones():
    lr = ConstantLR(0.1)
    assert lr(np.int64(3)) == 0.1
    with pytest.raises(ValueError, match="^step: "):
        lr(-1)
    with pytest.raises(TypeError, match="^step: "):
        lr(1.5)


@pytest.mark.parametrize("name,cls", [("constant", ConstantLR), ("step", StepLR),
                                      ("exponential", ExponentialLR), ("cosine", CosineLR)])
def test_make_schedule_builds_each_and_ignores_unused_options(name, cls):
    # The training loop passes every option whatever the schedule.
    schedule = make_schedule(name, 0.1, total_steps=100, warmup_steps=10, step_size=20,
                             gamma=0.5, min_lr=0.01)
    assert type(schedule) is cls and schedule.base_lr == 0.1 and schedule.warmup_steps == 10
    assert schedule(4) == pytest.approx(0.05, rel=1e-15)
    assert schedule(10) == pytest.approx(0.1, rel=1e-15)
    assert name in SCHEDULES and repr(schedule).startswith(f"{cls.__name__}(base_lr=0.1, ")
    assert make_schedule(name, 0.1, total_steps=100, step_size=20, gamma=0.5)(0) == 0.1


def test_make_schedule_passes_the_options_on():
    assert make_schedule("step", 1.0, total_steps=5, step_size=2, gamma=0.5)(4) == 0.25
    assert make_schedule("step", 1.0, total_steps=5, step_size=2)(2) == pytest.approx(0.1)
    assert make_schedule("exponential", 1.0, total_steps=5, gamma=0.5)(3) == 0.125
    assert make_schedule("cosine", 1.0, total_steps=4, min_lr=0.5)(2) == pytest.approx(0.75)
    assert SCHEDULES == ("constant", "step", "exponential", "cosine")


@pytest.mark.parametrize("call,error,match", [
    (lambda: make_schedule("cosin", 0.1, total_steps=10), ValueError,
     r"^schedule: .*did you mean 'cosine'\?"),
    (lambda: make_schedule("constant", 0.0, total_steps=10), ValueError, "^base_lr: "),
    (lambda: make_schedule("constant", 0.1, total_steps=0), ValueError, "^total_steps: "),
    (lambda: make_schedule("constant", 0.1, total_steps=2.5), TypeError, "^total_steps: "),
    (lambda: make_schedule("constant", 0.1, total_steps=10, warmup_steps=-1), ValueError,
     "^warmup_steps: "),
    (lambda: make_schedule("step", 0.1, total_steps=10), ValueError, "^step_size: required"),
    (lambda: make_schedule("step", 0.1, total_steps=10, step_size=0), ValueError, "^step_size: "),
    (lambda: make_schedule("step", 0.1, total_steps=10, step_size=2, gamma=0.0), ValueError,
     "^gamma: "),
    (lambda: make_schedule("exponential", 0.1, total_steps=10), ValueError, "^gamma: required"),
    (lambda: make_schedule("exponential", 0.1, total_steps=10, gamma=-0.5), ValueError,
     "^gamma: "),
    (lambda: make_schedule("exponential", 0.1, total_steps=10, gamma=True), TypeError, "^gamma: "),
    (lambda: make_schedule("cosine", 0.1, total_steps=10, warmup_steps=10), ValueError,
     "^total_steps: expected more than warmup_steps = 10"),
    (lambda: make_schedule("cosine", 0.1, total_steps=10, min_lr=-0.1), ValueError, "^min_lr: "),
    (lambda: make_schedule("cosine", 0.1, total_steps=10, min_lr=0.2), ValueError,
     "^min_lr: expected at most base_lr"),
], ids=["name", "base_lr", "total_steps", "total_steps_type", "warmup", "step_size_missing",
        "step_size", "gamma_step", "gamma_missing", "gamma_exp", "gamma_bool", "cosine_warmup",
        "min_lr_negative", "min_lr_above"])
def test_make_schedule_rejects_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
