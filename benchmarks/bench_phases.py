"""Where a training step's time goes, phase by phase, at several thread counts.

Times each ``ksae._core`` call of one ``partial_fit`` step on the model's own buffers (the
encode with its product and selection, the sparse decode, the loss, the backward, the Adam
update of all four parameters) next to the bare NumPy product ``X @ W_enc`` and the whole
step, each thread count in a fresh child process with every pool pinned (see harness.py).

    python benchmarks/bench_phases.py --threads 1,2 --shape 1024,768,16384,32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, median, parse_shape, pin_threads, run_json_child  # noqa: E402

PHASES = ("floor", "step", "encode", "decode", "loss", "backward", "adam")


def child(shape: tuple[int, int, int, int], threads: int, seconds: float) -> dict[str, float]:
    pin_threads(threads)
    from harness import limit_blas_threads, time_calls

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
    p, g = sae._params, sae._grads
    ws = sae._buffers(batch)  # no pre-activation buffer: the encode fuses the selection
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
    print("| threads | " + " | ".join(PHASES) + " | step / floor | rest of step |")
    print("|---" * (len(PHASES) + 3) + "|")
    for n in counts:
        r = run_json_child([__file__, "--shape", args.shape, "--seconds", str(args.seconds),
                            "--child", str(n)], n)
        rest = r["step"] - r["encode"] - r["decode"] - r["loss"] - r["backward"] - r["adam"]
        print(f"| {n} | " + " | ".join(f"{r[p]:.2f}" for p in PHASES)
              + f" | {r['step'] / r['floor']:.2f}x | {rest:.2f} |", flush=True)


if __name__ == "__main__":
    main()
