"""Times a TopK training step and an encode: ksae against the dense NumPy reference model,
next to the bare encoder product ``X @ W_enc`` in NumPy (the floor), in one run.

    python benchmarks/bench_step.py                 # all shapes, all cores
    python benchmarks/bench_step.py --threads 1 --shapes 256,784,1000,25

Thread counts are pinned before NumPy loads (OpenBLAS/MKL/OpenMP variables) and the same
count is given to ksae. ksae runs in a child process of its own, as it would in a training
script: NumPy's idle BLAS workers otherwise take cores from the next kernel (a 4.5 ms ksae
step measured 6-16 ms right after a NumPy matmul in the same process). Rounds alternate
between that child and the NumPy measurements here, so a noisy spell on this shared machine
hits both; every figure is the median of all timed calls over --repeats rounds. The child
also reports its peak resident memory. Prints a Markdown table (paste it into
benchmarks/RESULTS.md) and, with --json, writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import limit_blas_threads, machine, median, peak_rss_mib, pin_threads, time_calls  # noqa: E402

DEFAULT_SHAPES = ["256,784,1000,25", "256,784,4096,32", "1024,768,16384,32"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every library")
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds (ksae child, then NumPy) per shape")
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="batch,d_in,n_latents,k")
    ap.add_argument("--json", help="write the raw figures here")
    ap.add_argument("--ksae-child", help=argparse.SUPPRESS)  # internal: time ksae at one shape
    return ap.parse_args(argv)


def make_problem(shape, seed=0):
    import numpy as np

    batch, d_in, n_latents, k = shape
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, d_in), dtype=np.float32)
    return X


def make_model(shape, threads):
    import ksae

    batch, d_in, n_latents, k = shape
    return ksae.SparseAutoencoder(n_latents=n_latents, k=k, random_state=0, n_threads=threads)


def ksae_child(shape, threads) -> None:
    """Child process: time a ksae training step and encode at `shape`; print JSON with the
    samples, the loss of the initial weights and the peak resident memory."""
    import numpy as np

    X = make_problem(shape)
    sae = make_model(shape, threads)
    sae.partial_fit(X, lr=1e-12)  # initialise (the same weights the parent builds)
    loss = float(np.mean((sae.reconstruct(X) - X) ** 2))
    result = {"loss": loss, "ksae_step": time_calls(lambda: sae.partial_fit(X)),
              "ksae_encode": time_calls(lambda: sae.encode(X))}
    result["ksae_peak_mib"] = peak_rss_mib()
    print(json.dumps(result))


def bench_shape(shape, threads, rounds):
    import numpy as np

    from ksae.reference import DenseNumpySAE

    X = make_problem(shape)
    sae = make_model(shape, threads)
    sae.partial_fit(X, lr=1e-12)  # the same initial weights as the child's
    W_enc = np.ascontiguousarray(sae.W_enc_)
    ref = DenseNumpySAE(W_enc, sae.b_enc_, sae.W_dec_, sae.b_dec_, shape[3])
    loss_ref = float(np.mean((ref.encode_decode(X) - X) ** 2))
    del sae
    numpy_fns = {"floor": lambda: X @ W_enc, "numpy_step": lambda: ref.step(X),
                 "numpy_encode": lambda: ref.encode(X)}
    samples: dict[str, list[float]] = {name: [] for name in ["ksae_step", "ksae_encode", *numpy_fns]}
    peak = 0.0
    for _ in range(rounds):
        out = subprocess.run([sys.executable, __file__, "--threads", str(threads),
                              "--ksae-child", ",".join(map(str, shape))],
                             capture_output=True, text=True, check=True, env=os.environ)
        child = json.loads(out.stdout.strip().splitlines()[-1])
        # Same model, same loss from the same weights: checked before any timing is used.
        assert abs(child["loss"] - loss_ref) <= 1e-4 * abs(loss_ref), (child["loss"], loss_ref)
        samples["ksae_step"] += child["ksae_step"]
        samples["ksae_encode"] += child["ksae_encode"]
        peak = max(peak, child["ksae_peak_mib"])
        for name, fn in numpy_fns.items():
            samples[name] += time_calls(fn, seconds=0.5 if name == "floor" else 0.0,
                                        warmup=0.2 if name == "floor" else 0.0)
    r = {name: median(ts) for name, ts in samples.items()}
    r["ksae_peak_mib"] = peak
    r["calls"] = {name: len(ts) for name, ts in samples.items()}
    return r


def main(argv=None) -> None:
    args = parse_args(argv)
    pin_threads(args.threads)
    if args.ksae_child:
        ksae_child(tuple(int(v) for v in args.ksae_child.split(",")), args.threads)
        return
    import numpy as np

    import ksae

    info = ksae.build_info()
    blas = limit_blas_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"ksae {ksae.__version__} ({info}), numpy {np.__version__}, threads {args.threads} "
          f"for ksae and NumPy's BLAS ({blas}), medians over {args.repeats} alternating rounds")
    print()
    print("| batch, d_in, n_latents, k | X @ W_enc (floor) | ksae step | step / floor | NumPy step "
          "| NumPy / ksae step | ksae encode | encode / floor | NumPy encode | ksae peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for spec in args.shapes:
        shape = tuple(int(v) for v in spec.split(","))
        r = bench_shape(shape, args.threads, args.repeats)
        results[spec] = r
        ms = lambda s: f"{s * 1e3:.1f} ms"
        print(f"| {spec.replace(',', ', ')} | {ms(r['floor'])} | {ms(r['ksae_step'])} | "
              f"{r['ksae_step'] / r['floor']:.2f}x | {ms(r['numpy_step'])} | "
              f"{r['numpy_step'] / r['ksae_step']:.1f}x | {ms(r['ksae_encode'])} | "
              f"{r['ksae_encode'] / r['floor']:.2f}x | {ms(r['numpy_encode'])} | "
              f"{r['ksae_peak_mib']:.0f} MiB |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "threads": args.threads, "build": info,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
