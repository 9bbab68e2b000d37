"""Times one TopK training step in ksae, in PyTorch on the CPU (idiomatic and sparse-aware)
and in NumPy, next to the bare encoder product ``X @ W_enc`` (the floor), from the same
initial weights on the same batch.

    python benchmarks/bench_torch.py                          # all shapes, all cores
    python benchmarks/bench_torch.py --threads 2 --shapes 256,784,1000,25 --repeats 3
    python benchmarks/bench_torch.py --json benchmarks/out/torch.json

First, per shape, one child process builds every model from ksae's freshly initialised
weights and checks that they agree: the same loss before a step (relative difference
< 1e-4), the same loss after one Adam step (< 1e-4) and the same update of every parameter
(|update - ksae's update| / |ksae's update| < 1e-3); the script stops if they do not.
Then every implementation is timed in a fresh child process of its own (see
``steps.py``), with all thread pools pinned to --threads: ``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS`` before any import, threadpoolctl for
NumPy's BLAS where installed, ``torch.set_num_threads(n)`` and
``torch.set_num_interop_threads(1)``, ksae's ``n_threads=n``. Rounds interleave the
implementations (in a rotating order) so that a noisy spell hits all of them; every figure
is the median of all timed calls, after warm-up calls, over --repeats rounds.

Each timed child also measures the cache-line round trip between two threads just before and
just after its timed calls (``ksae.thread_round_trip_ns``), and a second table gives ksae's
step and the floor by the placement their children saw: near (both under 150 ns: cores that
share an L3), far (both above: on this project's VM, different CCDs) or mixed. Where a
hypervisor moves virtual CPUs between the two, the main table's medians mix them.

PyTorch is optional: without it the script says so and times ksae and NumPy. The dense
NumPy model needs several batch x n_latents arrays; it is left out above
--numpy-max-elements (batch * n_latents), as at (4096, 2048, 65536, 64).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import machine, median, parse_shape, pin_threads, run_json_child  # noqa: E402
from steps import have_torch  # noqa: E402

STEPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "steps.py")
DEFAULT_SHAPES = ["256,784,1000,25", "256,784,4096,32", "1024,768,16384,32", "4096,2048,65536,64"]
LOSS_TOLERANCE = 1e-4
UPDATE_TOLERANCE = 1e-3


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every library")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds per shape")
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="batch,d_in,n_latents,k")
    ap.add_argument("--seconds", type=float, default=0.5,
                    help="timed calls per implementation per round fill about this long (at least one)")
    ap.add_argument("--warmup", type=float, default=0.5, help="untimed calls first, about this long (at least one)")
    ap.add_argument("--numpy-max-elements", type=int, default=1 << 26,
                    help="leave the dense NumPy model out when batch * n_latents exceeds this")
    ap.add_argument("--update-tolerance", type=float, default=UPDATE_TOLERANCE,
                    help="largest relative difference of one Adam step's updates from ksae's. "
                         "Adam's first step moves a weight by about lr whatever its gradient's "
                         "size, so a float32 near-tie that one library's product rounds the "
                         "other way (a different latent kept in one row) moves whole rows: at "
                         "(4096, 2048, 65536, 64) one such row gave 5.6e-3 (see "
                         "check_selection.py)")
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if installed")
    ap.add_argument("--json", help="also write the raw figures here (e.g. benchmarks/out/torch.json)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also time the ksae step imported from DIR (another version, installed "
                         "with pip install --target DIR), interleaved with the rest, for a "
                         "before/after comparison in one run")
    return ap.parse_args(argv)


def implementations(shape, args) -> list[str]:
    impls = ["floor", "ksae"] + (["ksae_baseline"] if args.baseline else [])
    if shape[0] * shape[2] <= args.numpy_max_elements:
        impls.append("numpy")
    if not args.no_torch and have_torch():
        impls += ["torch_sparse", "torch_idiomatic"]
    return impls


def check_agreement(shape, impls: list[str], threads: int,
                    update_tolerance: float = UPDATE_TOLERANCE) -> dict[str, Any]:
    """Run the agreement check in a child, print it as a table, stop on a disagreement."""
    models = [impl for impl in impls if impl not in ("floor", "ksae_baseline")]
    result = run_json_child([STEPS, "check", ",".join(map(str, shape)), "--threads", str(threads),
                             "--impls", ",".join(models)], threads)
    print(f"\nshape {shape}: loss before and after one Adam step from ksae's initial weights")
    print("| implementation | loss before | vs ksae | loss after | vs ksae | update vs ksae "
          "(W_enc, b_enc, W_dec, b_dec) | optimizer |")
    print("|---|---|---|---|---|---|---|")
    failures = []
    for impl, row in result["rows"].items():
        update = row.get("update_vs_ksae", {})
        shown = ", ".join(f"{v:.1e}" for v in update.values()) if update else "(reference)"
        print(f"| {impl} | {row['loss_before']:.7f} | {row['loss_before_vs_ksae']:.1e} | "
              f"{row['loss_after']:.7f} | {row['loss_after_vs_ksae']:.1e} | {shown} | {row['optimizer']} |")
        if row["loss_before_vs_ksae"] >= LOSS_TOLERANCE or row["loss_after_vs_ksae"] >= LOSS_TOLERANCE:
            failures.append(f"{impl}: loss differs from ksae's")
        failures += [f"{impl}: {name} update differs from ksae's by {v:.1e}"
                     for name, v in update.items() if not v < update_tolerance]
    if failures:
        raise SystemExit("implementations disagree, not timing them:\n  " + "\n  ".join(failures))
    print(f"agree: losses within {LOSS_TOLERANCE:g} (relative), updates within {update_tolerance:g}")
    return result


NEAR_NS = 150.0
"""A child is labelled "near" when the round trip before and after its timed calls were both
below this, "far" when both were above it, "mixed" otherwise: on this project's 2-vCPU VM the
two are about 50 ns (cores sharing an L3) and about 320 ns (different CCDs)."""


def placement(trips: list[float]) -> str:
    if all(0 < t < NEAR_NS for t in trips):
        return "near"
    if all(t >= NEAR_NS for t in trips):
        return "far"
    return "mixed" if all(t > 0 for t in trips) else "unknown"


def bench_shape(shape, impls: list[str], losses: dict[str, float], args) -> dict[str, Any]:
    """Time every implementation at ``shape`` in interleaved rounds of fresh child processes."""
    samples: dict[str, list[float]] = {impl: [] for impl in impls}
    by_placement: dict[str, dict[str, list[float]]] = {impl: {} for impl in impls}
    trips: dict[str, list[list[float]]] = {impl: [] for impl in impls}
    peaks: dict[str, float] = {impl: 0.0 for impl in impls}
    imports: dict[str, float] = {}
    threads: dict[str, str] = {}
    spec = ",".join(map(str, shape))
    for r in range(args.repeats):
        for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
            baseline = impl == "ksae_baseline"
            child = run_json_child([STEPS, "time", "ksae" if baseline else impl, spec,
                                    "--threads", str(args.threads),
                                    "--seconds", str(args.seconds), "--warmup", str(args.warmup)],
                                   args.threads, args.baseline if baseline else None)
            checked = "ksae" if baseline else impl  # the baseline starts from ksae's weights too
            if checked in losses:  # the timed model is the checked one: same loss from the same weights
                assert abs(child["loss"] - losses[checked]) <= LOSS_TOLERANCE * abs(losses[checked]), \
                    (impl, child["loss"], losses[checked])
            samples[impl] += child["times"]
            trips[impl].append(child["round_trip_ns"])
            by_placement[impl].setdefault(placement(child["round_trip_ns"]), []).extend(child["times"])
            peaks[impl] = max(peaks[impl], child["peak_mib"])
            imports[impl] = child["imports_mib"]
            threads[impl] = child["threads"]
    return {"median_s": {impl: median(ts) for impl, ts in samples.items()},
            "calls": {impl: len(ts) for impl, ts in samples.items()},
            "peak_mib": peaks, "imports_mib": imports, "threads": threads,
            "round_trip_ns": trips,
            "median_s_by_placement": {impl: {place: median(ts) for place, ts in groups.items()}
                                      for impl, groups in by_placement.items()},
            "children_by_placement": {impl: {place: sum(placement(t) == place for t in trips[impl])
                                             for place in groups}
                                      for impl, groups in by_placement.items()}}


def placement_rows(spec: str, r: dict[str, Any]) -> list[str]:
    """ksae's step and the floor by the placement their children saw (see NEAR_NS), and
    ksae's step against the floor of all children (NumPy's product barely notices the
    placement: it writes nothing that the other thread reads)."""
    t, n = r["median_s_by_placement"], r["children_by_placement"]
    floor_all = r["median_s"]["floor"]
    rows = []
    for place in ("near", "far", "mixed", "unknown"):
        if place not in t["ksae"]:
            continue
        step = t["ksae"][place]
        floor = t["floor"].get(place)
        same = f"{step / floor:.2f}x" if floor else "n/a"
        floor_ms = f"{floor * 1e3:.2f} ms ({n['floor'][place]})" if floor else "none"
        rows.append(f"| {spec.replace(',', ', ')} | {place} | {step * 1e3:.2f} ms "
                    f"({n['ksae'][place]}) | {floor_ms} | {same} | {step / floor_all:.2f}x |")
    return rows


def table_row(spec: str, r: dict[str, Any]) -> str:
    t, peak, imports = r["median_s"], r["peak_mib"], r["imports_mib"]
    ms = lambda impl: f"{t[impl] * 1e3:.1f} ms" if impl in t else "n/a"
    ratio = lambda a, b: f"{t[a] / t[b]:.2f}x" if a in t and b in t else "n/a"
    mib = lambda impl: f"{peak[impl]:.0f} ({imports[impl]:.0f})" if impl in peak else "n/a"
    return (f"| {spec.replace(',', ', ')} | {ms('floor')} | {ms('ksae')} | {ratio('ksae', 'floor')} | "
            f"{ms('torch_sparse')} | {ratio('torch_sparse', 'ksae')} | {ms('torch_idiomatic')} | "
            f"{ratio('torch_idiomatic', 'ksae')} | {ms('numpy')} | {ratio('numpy', 'ksae')} | "
            f"{mib('ksae')} / {mib('torch_sparse')} / {mib('torch_idiomatic')} MiB |")


def main(argv=None) -> None:
    args = parse_args(argv)
    pin_threads(args.threads)  # this process imports no numerical library; its children inherit
    shapes = [parse_shape(spec) for spec in args.shapes]
    print(f"machine: {machine()}")
    if args.no_torch:
        print("PyTorch left out (--no-torch): timing ksae and NumPy only")
    elif not have_torch():
        print("PyTorch is not installed: timing ksae and NumPy only")

    checks = {}
    for shape in shapes:
        checks[shape] = check_agreement(shape, implementations(shape, args), args.threads,
                                        args.update_tolerance)

    print(f"\nthreads {args.threads} for every library; medians over {args.repeats} interleaved "
          "rounds, each implementation in a fresh process")
    print()
    print("| batch, d_in, n_latents, k | X @ W_enc (floor) | ksae step | ksae / floor | "
          "torch sparse-aware | torch sparse / ksae | torch idiomatic | torch idiomatic / ksae | "
          "NumPy step | NumPy / ksae | peak RSS (after imports) ksae / torch sparse / torch idiomatic |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results, thread_settings = {}, {}
    for shape in shapes:
        spec = ",".join(map(str, shape))
        losses = {impl: row["loss_before"] for impl, row in checks[shape]["rows"].items()}
        r = bench_shape(shape, implementations(shape, args), losses, args)
        results[spec] = {**r, "check": checks[shape]["rows"]}
        thread_settings.update(r["threads"])
        print(table_row(spec, r), flush=True)
    if args.baseline:
        print(f"\nksae from this tree against ksae from {args.baseline}, same rounds:\n")
        print("| batch, d_in, n_latents, k | this ksae | step / floor | baseline ksae | step / floor | this / baseline |")
        print("|---|---|---|---|---|---|")
        for spec, r in results.items():
            t = r["median_s"]
            print(f"| {spec.replace(',', ', ')} | {t['ksae'] * 1e3:.2f} ms | {t['ksae'] / t['floor']:.3f}x | "
                  f"{t['ksae_baseline'] * 1e3:.2f} ms | {t['ksae_baseline'] / t['floor']:.3f}x | "
                  f"{t['ksae'] / t['ksae_baseline']:.3f}x |")
    print(f"\nksae's step and the floor by placement: the cache-line round trip between two threads "
          f"just before and after each child's timed calls, near (both < {NEAR_NS:.0f} ns), far "
          f"(both above) or mixed; medians of those children's calls (children in brackets)")
    print("\n| batch, d_in, n_latents, k | placement | ksae step | floor | ksae / floor | "
          "ksae / floor of all children |")
    print("|---|---|---|---|---|---|")
    for spec, r in results.items():
        for row in placement_rows(spec, r):
            print(row)
    print("\nthreads in effect: " + "; ".join(f"{impl}: {s}" for impl, s in thread_settings.items()))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "threads": args.threads, "repeats": args.repeats,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
