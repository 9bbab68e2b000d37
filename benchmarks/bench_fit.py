"""What fit's loop costs beyond its steps.

Times one-epoch ``fit`` calls on synthetic rows next to the same number of ``partial_fit``
steps on batches gathered beforehand (the steps alone), alternating the two in rounds within
one process pinned to the thread count, after the bare NumPy product ``X @ W_enc`` of one
batch (timed first, before any ksae kernel runs). fit's extra time per step is everything its loop adds: the shuffled batch's
gather, the learning-rate schedule, the per-span statistics, the total variance for fve
(once per call) and the history records.

    python benchmarks/bench_fit.py --threads 2 --shape 256,784,1000,25 --batches 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (limit_blas_threads, machine, median, parse_shape, pin_threads,  # noqa: E402
                     time_calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", default="256,784,1000,25", help="batch,d_in,n_latents,k")
    parser.add_argument("--batches", type=int, default=200, help="steps in the epoch")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    pin_threads(args.threads)
    blas = limit_blas_threads(args.threads)
    import numpy as np

    import ksae

    batch, d_in, n_latents, k = parse_shape(args.shape)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch * args.batches, d_in), dtype=np.float32)
    order = rng.permutation(X.shape[0])
    gathered = [X[order[i * batch:(i + 1) * batch]] for i in range(args.batches)]

    def model() -> "ksae.SparseAutoencoder":
        return ksae.SparseAutoencoder(n_latents, k, random_state=0, n_threads=args.threads)

    def fit() -> float:
        sae = model()
        t = time.perf_counter()
        sae.fit(X, epochs=1, batch_size=batch)
        return time.perf_counter() - t

    # The floor first: after a ksae kernel its idle OpenMP threads spin for a while and would
    # take cores from NumPy's BLAS threads.
    W_enc = rng.standard_normal((d_in, n_latents), dtype=np.float32)
    floor = median(time_calls(lambda: gathered[0] @ W_enc, 1.0))
    stepper = model()
    stepper.partial_fit(gathered[0])

    def steps() -> float:
        t = time.perf_counter()
        for B in gathered:
            stepper.partial_fit(B)
        return time.perf_counter() - t

    fit(), steps()  # warm up
    fits, step_runs = [], []
    for _ in range(args.rounds):
        fits.append(fit() / args.batches)
        step_runs.append(steps() / args.batches)
    f, s, p = 1e3 * median(fits), 1e3 * median(step_runs), 1e3 * floor
    print(f"{machine()}\nshape (batch, d_in, n_latents, k) = {(batch, d_in, n_latents, k)}; "
          f"{args.batches} steps an epoch on {X.shape[0]} rows; threads {args.threads} "
          f"(BLAS: {blas}); medians over {args.rounds} rounds, ms a step\n")
    print("| floor | partial_fit step | fit step (one epoch / steps) | fit - partial_fit "
          "| fit / partial_fit | fit / floor |")
    print("|---|---|---|---|---|---|")
    print(f"| {p:.2f} | {s:.2f} | {f:.2f} | {f - s:.2f} | {f / s:.2f}x | {f / p:.2f}x |")


if __name__ == "__main__":
    main()
