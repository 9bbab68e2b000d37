"""Where a training step's time goes, phase by phase, at several thread counts.

Times each ``ksae._core`` call of one ``partial_fit`` step on the model's own buffers (the
encode with its product and selection, the sparse decode, the loss, the backward, the Adam
update of all four parameters) next to the bare NumPy product ``X @ W_enc`` and the whole
step, each thread count in a fresh child process with every pool pinned (see harness.py).

Each phase is first timed alone, called over and over, so its data stays in cache; "step" is
the default ``partial_fit`` step, which makes all its kernels one call
(``_core.train_step_adam``). A second table times the kernels inside real ``partial_fit``
steps made with the kernels called one by one (encode, decode_mse, backward_adam with Adam
fused in, mark_fired), where each finds the caches as the other phases left them; "Python and
the rest" is what that step spends outside them, and "one call" the default step again. A third figure, "Adam at cache speed", is
the Adam update's arithmetic alone: the update of an L2-sized slice on one thread, scaled to
the model's parameter count and divided by the thread count. Against the in-step backward it shows what the memory traffic of the
parameters and moments costs.

    python benchmarks/bench_phases.py --threads 1,2 --shape 1024,768,16384,32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, median, parse_shape, pin_threads, run_json_child, time_calls  # noqa: E402

PHASES = ("floor", "step", "encode", "decode", "loss", "backward", "adam")
IN_STEP = ("encode", "decode_mse", "decode", "loss", "backward_adam", "mark_fired")  # "-": not called


def in_step(sae: Any, X: Any, seconds: float) -> dict[str, float]:
    """Median seconds of the whole step and of each kernel it calls, timed inside real
    partial_fit steps that call the kernels one by one (the default step makes them one
    call): the step's and the model state's modules see a view of _core (and of the loss)
    that times every call."""
    import ksae.state
    import ksae.steps

    calls: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            result = fn(*args, **kwargs)
            calls.setdefault(name, []).append(time.perf_counter() - t)
            return result
        return call

    class TimedCore:
        def __init__(self, core: Any) -> None:
            self._core = core

        def __getattr__(self, name: str) -> Any:
            return timed(name, getattr(self._core, name))

    core, loss, fuses = ksae.steps._core, ksae.steps.reconstruction_loss, ksae.steps.fuses_step
    ksae.steps._core = ksae.state._core = TimedCore(core)
    ksae.steps.reconstruction_loss = timed("loss", loss)
    ksae.steps.fuses_step = lambda *args: False  # the kernels one by one
    try:
        steps = time_calls(lambda: sae.partial_fit(X), seconds)
    finally:
        ksae.steps._core = ksae.state._core = core
        ksae.steps.reconstruction_loss, ksae.steps.fuses_step = loss, fuses
    n = len(steps)  # time_calls' warm-up calls came first: keep the timed steps' calls
    out = {name: median(samples[-n:]) for name, samples in calls.items()}
    out["step"] = median(steps)
    return out


def adam_at_cache_speed(sae: Any, threads: int) -> float:
    """Seconds the Adam update of all the model's parameters would take if its arithmetic
    were the only cost: a 2**16-element slice (1 MiB of parameter, gradient and moments, in
    L2) updated over and over on one thread, scaled to the parameter count."""
    import numpy as np

    from ksae import _core
    from ksae.buffers import aligned_empty

    n = 1 << 16
    rng = np.random.default_rng(0)
    param, grad, m, v = (aligned_empty((1, n), np.float32) for _ in range(4))  # as the model's
    param[:], grad[:], m[:], v[:] = rng.standard_normal(n), rng.standard_normal(n), 0, 1e-4
    calls = 2000
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            _core.adam_update(param, grad, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0, 10, False, 1)
        samples.append((time.perf_counter() - t) / calls)
    total = sum(value.size for value in sae.state_.params.values())
    return median(samples) * total / n / threads


def child(shape: tuple[int, int, int, int], threads: int, seconds: float) -> dict[str, float]:
    pin_threads(threads)
    from harness import limit_blas_threads

    limit_blas_threads(threads)
    import numpy as np

    import ksae
    from ksae import _core
    from ksae.losses import mse_loss

    batch, d_in, n_latents, k = shape
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, d_in), dtype=np.float32)
    sae = ksae.SparseAutoencoder(n_latents, k, random_state=0, n_threads=threads)
    sae.partial_fit(X)
    p, g = sae.state_.params, sae.state_.grads
    ws = sae.state_.buffers(batch)  # no pre-activation buffer: the encode fuses the selection
    W_enc = np.ascontiguousarray(p["W_enc_t"].T)
    out: dict[str, float] = {}
    out["floor"] = median(time_calls(lambda: X @ W_enc, seconds))
    out["step"] = median(time_calls(lambda: sae.partial_fit(X), seconds))
    encode = lambda: _core.encode(X, p["W_enc_t"], p["b_enc"], p["b_dec"], k, "relu", threads,  # noqa: E731
                                  ws["centered"], None, None)
    values, indices = encode()
    out["encode"] = median(time_calls(encode, seconds))
    decode = lambda: _core.decode(values, indices, p["W_dec"], p["b_dec"], threads, ws["x_hat"])  # noqa: E731
    out["decode"] = median(time_calls(decode, seconds))
    x_hat = decode()
    out["loss"] = median(time_calls(lambda: mse_loss(x_hat.copy(), X), seconds))
    _, grad_out = mse_loss(x_hat.copy(), X)
    out["backward"] = median(time_calls(lambda: _core.backward(
        grad_out, ws["centered"], values, indices, p["W_enc_t"], p["W_dec"], "relu", True,
        threads, g["W_enc_t"], g["b_enc"], g["W_dec"], g["b_dec"], False, None), seconds))
    opt = sae._optimizer
    out["adam"] = median(time_calls(lambda: opt.step(p, g, unit_norm_rows=frozenset({"W_dec"}),
                                                     n_threads=threads), seconds))
    out.update({f"in_step_{name}": value for name, value in in_step(sae, X, seconds).items()})
    out["adam_at_cache_speed"] = adam_at_cache_speed(sae, threads)
    return {name: 1e3 * value for name, value in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--shape", default="1024,768,16384,32", help="batch,d_in,n_latents,k")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per phase")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = parse_shape(args.shape)
    if args.child:
        import json

        print(json.dumps(child(shape, int(args.child), args.seconds)))
        return
    counts = [int(t) for t in args.threads.split(",")]
    print(f"{machine()}\nshape (batch, d_in, n_latents, k) = {shape}; medians in ms\n")
    print("Each phase alone:\n")
    print("| threads | " + " | ".join(PHASES) + " | step / floor | rest of step |")
    print("|---" * (len(PHASES) + 3) + "|")
    results = {}
    for n in counts:
        r = results[n] = run_json_child([__file__, "--shape", args.shape, "--seconds",
                                         str(args.seconds), "--child", str(n)], n)
        rest = r["step"] - r["encode"] - r["decode"] - r["loss"] - r["backward"] - r["adam"]
        print(f"| {n} | " + " | ".join(f"{r[p]:.2f}" for p in PHASES)
              + f" | {r['step'] / r['floor']:.2f}x | {rest:.2f} |", flush=True)
    print("\nThe kernels inside partial_fit steps that call them one by one (same children):\n")
    print("| threads | floor | step | " + " | ".join(IN_STEP)
          + " | Python and the rest | step / floor | one call | one call / floor"
          " | Adam at cache speed |")
    print("|---" * (len(IN_STEP) + 8) + "|")
    for n, r in results.items():
        parts = [r.get(f"in_step_{name}") for name in IN_STEP]
        step = r["in_step_step"]
        cells = " | ".join("-" if v is None else f"{v:.2f}" for v in parts)
        parts = [v for v in parts if v is not None]
        print(f"| {n} | {r['floor']:.2f} | {step:.2f} | " + cells
              + f" | {step - sum(parts):.2f} | {step / r['floor']:.2f}x | {r['step']:.2f}"
              f" | {r['step'] / r['floor']:.2f}x | {r['adam_at_cache_speed']:.2f} |")


if __name__ == "__main__":
    main()
