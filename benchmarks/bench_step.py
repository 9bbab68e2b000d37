"""Times a TopK training step and an encode: ksae against the dense NumPy reference model,
next to the bare encoder product ``X @ W_enc`` in NumPy (the floor), in one run.

    python benchmarks/bench_step.py                 # all shapes, all cores
    python benchmarks/bench_step.py --threads 1 --shapes 256,784,1000,25

Thread counts are pinned before NumPy loads (OpenBLAS/MKL/OpenMP variables) and the same
count is given to ksae. Every timing is the median of --repeats runs after a warm-up; peak
memory of a ksae training run is measured in a fresh child process per shape. Prints a
Markdown table (paste it into benchmarks/RESULTS.md) and, with --json, writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

DEFAULT_SHAPES = ["256,784,1000,25", "256,784,4096,32", "1024,768,16384,32"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every library")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="batch,d_in,n_latents,k")
    ap.add_argument("--json", help="write the raw figures here")
    ap.add_argument("--peak-memory-child", help=argparse.SUPPRESS)  # internal: one shape
    return ap.parse_args(argv)


def pin_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, page faults, lazy initialisation
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


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


def peak_memory_child(shape, threads) -> None:
    """Child process: train a few steps at `shape` and print the peak resident set (MiB)."""
    X = make_problem(shape)
    sae = make_model(shape, threads)
    for _ in range(3):
        sae.partial_fit(X)
    print(peak_rss_mib())


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Unlike getrusage's ru_maxrss, which on
    Linux carries the parent's peak across fork+exec, it counts this process only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_shape(shape, threads, repeats):
    import numpy as np

    import ksae
    from ksae.reference import DenseNumpySAE

    X = make_problem(shape)
    sae = make_model(shape, threads)
    sae.partial_fit(X, lr=1e-12)  # initialise the weights (a negligible step)
    W_enc = np.ascontiguousarray(sae.W_enc_)
    ref = DenseNumpySAE(W_enc, sae.b_enc_, sae.W_dec_, sae.b_dec_, shape[3])

    # Same model, same loss: check before timing.
    loss_ref = ref.step(X)
    loss_ksae = float(np.mean((sae.reconstruct(X) - X) ** 2))
    assert abs(loss_ref - loss_ksae) <= 1e-4 * abs(loss_ref), (loss_ref, loss_ksae)

    r = {}
    r["floor"] = median_time(lambda: X @ W_enc, repeats)
    r["ksae_step"] = median_time(lambda: sae.partial_fit(X), repeats)
    r["ksae_encode"] = median_time(lambda: sae.encode(X), repeats)
    r["numpy_step"] = median_time(lambda: ref.step(X), max(3, repeats // 2))
    r["numpy_encode"] = median_time(lambda: ref.encode(X), max(3, repeats // 2))
    out = subprocess.run([sys.executable, __file__, "--threads", str(threads),
                          "--peak-memory-child", ",".join(map(str, shape))],
                         capture_output=True, text=True, check=True, env=os.environ)
    r["ksae_peak_mib"] = float(out.stdout.strip().splitlines()[-1])
    return r


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def main(argv=None) -> None:
    args = parse_args(argv)
    pin_threads(args.threads)
    if args.peak_memory_child:
        peak_memory_child(tuple(int(v) for v in args.peak_memory_child.split(",")), args.threads)
        return
    import numpy as np

    import ksae

    info = ksae.build_info()
    print(f"machine: {machine()}")
    print(f"ksae {ksae.__version__} ({info}), numpy {np.__version__}, threads {args.threads} "
          f"for ksae and NumPy's BLAS, median of {args.repeats}")
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
