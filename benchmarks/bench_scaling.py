"""Thread scaling of a TopK training step: the ksae step, the bare NumPy product
``X @ W_enc`` (the floor) and, when PyTorch is installed, the sparse-aware PyTorch step, at
each thread count, with the speed-up over 1 and over 2 threads.

    python benchmarks/bench_scaling.py --threads 1,2,4,8,16 --shape 1024,768,16384,32
    python benchmarks/bench_scaling.py --threads 1,2 --shape 256,784,4096,32 --repeats 2 --json benchmarks/out/scaling.json

Every measurement runs in a fresh child process (``steps.py time``) whose thread pools are
pinned to that count before any import (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS,
MKL_NUM_THREADS; threadpoolctl where installed; ``torch.set_num_threads`` and one inter-op
thread; ksae's ``n_threads``). Rounds interleave all thread counts and implementations (in
a rotating order) so that a noisy spell hits each; figures are medians of all timed calls
over --repeats rounds. Thread counts above the machine's logical CPUs are run but flagged.
Before timing, the models are checked to agree at this shape (see ``bench_torch.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch import STEPS, check_agreement  # noqa: E402
from harness import machine, median, parse_shape, pin_threads, run_json_child  # noqa: E402
from steps import have_torch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2,4,8,16", help="comma-separated thread counts")
    ap.add_argument("--shape", type=parse_shape, default=parse_shape("1024,768,16384,32"),
                    help="batch,d_in,n_latents,k")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--seconds", type=float, default=0.5, help="timed calls per measurement fill about this long")
    ap.add_argument("--warmup", type=float, default=0.5, help="untimed calls first, about this long")
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if installed")
    ap.add_argument("--json", help="also write the raw figures here")
    return ap.parse_args(argv)


def measure(shape, thread_counts: list[int], impls: list[str], args) -> dict[tuple[str, int], dict[str, Any]]:
    """Medians per (implementation, thread count), over interleaved rounds."""
    cells = [(impl, n) for n in thread_counts for impl in impls]
    samples: dict[tuple[str, int], list[float]] = {cell: [] for cell in cells}
    settings: dict[tuple[str, int], str] = {}
    spec = ",".join(map(str, shape))
    for r in range(args.repeats):
        for impl, n in cells[r % len(cells):] + cells[:r % len(cells)]:
            child = run_json_child([STEPS, "time", impl, spec, "--threads", str(n),
                                    "--seconds", str(args.seconds), "--warmup", str(args.warmup)], n)
            samples[(impl, n)] += child["times"]
            settings[(impl, n)] = child["threads"]
    return {cell: {"median_s": median(ts), "calls": len(ts), "threads": settings[cell]}
            for cell, ts in samples.items()}


def speedup(results, impl: str, n: int, base: int) -> str:
    if (impl, base) not in results:
        return "n/a"
    return f"{results[(impl, base)]['median_s'] / results[(impl, n)]['median_s']:.2f}x"


def main(argv=None) -> None:
    args = parse_args(argv)
    thread_counts = sorted({int(v) for v in args.threads.split(",")})
    pin_threads(1)  # this process computes nothing; each child gets its own count
    impls = ["floor", "ksae"] + (["torch_sparse"] if have_torch() and not args.no_torch else [])
    cpus = os.cpu_count() or 1
    print(f"machine: {machine()}")
    if "torch_sparse" not in impls:
        print("PyTorch left out or not installed: timing ksae and the NumPy product only")
    check_agreement(args.shape, [i for i in impls if i != "floor"], min(thread_counts[-1], cpus))
    results = measure(args.shape, thread_counts, impls, args)

    print(f"\nshape (batch, d_in, n_latents, k) = {args.shape}; medians over {args.repeats} "
          "interleaved rounds, each measurement in a fresh process")
    print()
    header = ["threads"]
    for impl, label in (("floor", "X @ W_enc (floor)"), ("ksae", "ksae step"), ("torch_sparse", "torch sparse-aware")):
        if impl in impls:
            header += [label, "vs 1 thread", "vs 2 threads"]
    header += ["ksae / floor"] + (["torch sparse / ksae"] if "torch_sparse" in impls else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for n in thread_counts:
        cells = [f"{n}" + (" (more than the CPUs)" if n > cpus else "")]
        for impl in impls:
            cells += [f"{results[(impl, n)]['median_s'] * 1e3:.1f} ms", speedup(results, impl, n, 1),
                      speedup(results, impl, n, 2)]
        t = lambda impl: results[(impl, n)]["median_s"]
        cells.append(f"{t('ksae') / t('floor'):.2f}x")
        if "torch_sparse" in impls:
            cells.append(f"{t('torch_sparse') / t('ksae'):.2f}x")
        print("| " + " | ".join(cells) + " |", flush=True)
    print("\nthreads in effect at the largest count: " + "; ".join(
        f"{impl}: {results[(impl, thread_counts[-1])]['threads']}" for impl in impls))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "shape": list(args.shape), "repeats": args.repeats,
                       "results": [{"impl": impl, "threads": n, **r} for (impl, n), r in results.items()]},
                      f, indent=2)


if __name__ == "__main__":
    main()
