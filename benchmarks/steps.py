"""The training steps the benchmarks race, each built from ksae's initial weights, and the
child-process entry points that time one of them or check that all agree.

    floor            NumPy's ``X @ W_enc`` in float32: the one dense product a step must pay
    numpy            ``ksae.reference.DenseNumpySAE.step``: the model in NumPy, dense codes
    ksae             ``SparseAutoencoder.partial_fit``: a full ksae step (input check,
                     encode, decode, loss, backward, Adam, decoder renormalisation)
    torch_idiomatic  ``torch_sae.IdiomaticTopKSAE.step``: nn.Module, dense code, autograd
    torch_sparse     ``torch_sae.SparseTopKSAE.step``: addmm, topk, embedding_bag, a
                     hand-written sparse backward, fused Adam

    python benchmarks/steps.py time ksae 1024,768,16384,32 --threads 2   # timings as JSON
    python benchmarks/steps.py check 1024,768,16384,32 --threads 2       # agreement as JSON

Both print one JSON object as their last line; ``bench_torch.py`` and ``bench_scaling.py``
run them in child processes with every thread pool pinned (see ``harness.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import current_rss_mib, limit_blas_threads, parse_shape, peak_rss_mib, time_calls  # noqa: E402

LR = 1e-3
MODELS = ("ksae", "numpy", "torch_idiomatic", "torch_sparse")
IMPLEMENTATIONS = ("floor", *MODELS)
PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_dec")


def have_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


@dataclass
class Step:
    """One implementation, ready to run on its batch: ``run`` takes one training step (or,
    for the floor, one product), ``loss`` is the reconstruction loss of the current weights,
    ``weights`` their values in the public shapes, ``optimizer`` says which Adam runs."""

    run: Callable[[], Any]
    loss: Callable[[], float] | None = None
    weights: Callable[[], dict[str, Any]] | None = None
    optimizer: str = ""


def make_problem(shape: tuple[int, int, int, int], threads: int):
    """The batch and a ksae model holding its freshly initialised weights (no step taken
    yet): every implementation starts from these."""
    import numpy as np

    import ksae

    batch, d_in, n_latents, k = shape
    X = np.random.default_rng(0).standard_normal((batch, d_in), dtype=np.float32)
    sae = ksae.SparseAutoencoder(n_latents=n_latents, k=k, random_state=0, n_threads=threads)
    # partial_fit would initialise too, but only by taking a step; the others must start
    # from the weights before it: the model state's initialize, as fit and partial_fit do.
    if not hasattr(ksae, "ModelState"):  # a ksae from before the estimator/trainer split (A/B runs)
        sae._initialize(d_in, sae.config, X)
        return X, sae
    state = ksae.ModelState.initialize(sae.config, d_in, np.random.default_rng(0), X)
    return X, ksae.SparseAutoencoder.from_state(state)


def ksae_weights(sae) -> dict[str, Any]:
    import numpy as np

    return {name: np.array(getattr(sae, name + "_"), dtype=np.float32, order="C")
            for name in PARAMETERS}


def mse(X_hat, X) -> float:
    import numpy as np

    return float(np.mean((X_hat - X) ** 2, dtype=np.float64))


def build(impl: str, X, sae, weights: dict[str, Any], k: int) -> Step:
    """Implementation ``impl`` on the batch X, starting from ``weights`` (ksae's own model
    ``sae`` is used, not copied, for "ksae")."""
    if impl == "floor":
        W_enc = weights["W_enc"]
        return Step(lambda: X @ W_enc)
    if impl == "ksae":
        return Step(lambda: sae.partial_fit(X, lr=LR), lambda: mse(sae.reconstruct(X), X),
                    lambda: ksae_weights(sae), "ksae Adam (fused into the backward kernel)")
    if impl == "numpy":
        from ksae.reference import DenseNumpySAE

        ref = DenseNumpySAE(*(weights[name] for name in PARAMETERS), k, lr=LR)
        return Step(lambda: ref.step(X), lambda: mse(ref.encode_decode(X), X),
                    lambda: {name: p.copy() for name, p in ref.params.items()},
                    "ksae.reference.adam_update (NumPy)")
    import torch

    from torch_sae import MODELS as TORCH_MODELS

    model = TORCH_MODELS[impl](*(weights[name] for name in PARAMETERS), k, lr=LR)
    Xt = torch.from_numpy(X)
    return Step(lambda: model.step(Xt), lambda: model.loss(Xt), model.weights,
                model.optimizer_kind)


def library(impl: str) -> str:
    """The library whose threads run ``impl``: numpy, ksae or torch."""
    return "torch" if impl.startswith("torch") else "numpy" if impl == "floor" else impl


def thread_settings(impl: str, threads: int) -> str:
    """Pin the library that ``impl`` (an implementation or a library name) uses to
    ``threads`` (the environment variables were set by the parent) and say what is in
    effect."""
    if library(impl) == "torch":
        from torch_sae import set_threads

        return set_threads(threads)  # first, before PyTorch does any parallel work
    if impl == "ksae":
        import ksae

        return f"ksae n_threads={threads} (OpenMP: {ksae.build_info()['max_threads']} available)"
    return f"NumPy {limit_blas_threads(threads)}"


def time_one(impl: str, shape, threads: int, seconds: float, warmup: float) -> dict[str, Any]:
    """Time ``impl`` at ``shape`` in this process: its initial loss, the timed calls, the
    peak resident memory, the resident memory after the imports (PyTorch alone takes
    hundreds of MiB), the thread settings, and the cache-line round trip between two threads
    just before and just after the timed calls (``ksae.thread_round_trip_ns``: where a
    hypervisor moves virtual CPUs between cores that share an L3 and cores that do not, it
    says which the timings saw)."""
    settings = thread_settings(impl, threads)
    import ksae  # (every child loads it for the initial weights)

    imports_mib = current_rss_mib()  # interpreter and libraries, before any array exists
    X, sae = make_problem(shape, threads)
    weights = ksae_weights(sae)
    if impl != "ksae":
        del sae  # its weights are copied: keep it out of this implementation's peak memory
        sae = None
    step = build(impl, X, sae, weights, shape[3])
    del weights
    loss = step.loss() if step.loss else None
    time_calls(step.run, seconds=0.0, warmup=warmup)  # the warm-up; its one timed call dropped
    trip_before = ksae.thread_round_trip_ns()
    times = time_calls(step.run, seconds=seconds, warmup=0.0)
    trip_after = ksae.thread_round_trip_ns()
    return {"impl": impl, "shape": list(shape), "threads": settings, "loss": loss,
            "optimizer": step.optimizer, "times": times, "peak_mib": peak_rss_mib(),
            "imports_mib": imports_mib, "round_trip_ns": [trip_before, trip_after]}


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def update_difference(before: dict, after: dict, reference_after: dict) -> dict[str, float]:
    """Per parameter, |update - ksae's update| / |ksae's update| (Frobenius norms), where an
    update is the weights after one step minus the weights before. Adam's first step moves
    each weight by about lr * sign(gradient), so where rounding flips the sign of a
    near-zero gradient one weight differs by up to 2 lr: hence a norm over the whole update
    rather than an elementwise tolerance."""
    import numpy as np

    out = {}
    for name in PARAMETERS:
        ref = reference_after[name].astype(np.float64) - before[name]
        mine = after[name].astype(np.float64) - before[name]
        out[name] = float(np.linalg.norm(mine - ref) / max(np.linalg.norm(ref), 1e-30))
    return out


def check(shape, threads: int, impls: list[str]) -> dict[str, Any]:
    """Every model in ``impls`` from ksae's initial weights on the same batch: the loss
    before a step, the loss after one Adam step, and how far each one's update is from
    ksae's. ksae goes first and is the reference; the others are built and freed one at a
    time so that the largest shapes fit."""
    # PyTorch first: its thread pools must be sized before anything runs in parallel.
    used = sorted({"ksae", *map(library, impls)}, key=lambda lib: lib != "torch")
    settings = {lib: thread_settings(lib, threads) for lib in used}
    X, sae = make_problem(shape, threads)
    before = ksae_weights(sae)
    step = build("ksae", X, sae, before, shape[3])
    rows = {"ksae": {"loss_before": step.loss(), "optimizer": step.optimizer}}
    step.run()
    rows["ksae"]["loss_after"] = step.loss()
    reference_after = step.weights()
    del step, sae
    for impl in impls:
        if impl == "ksae":
            continue
        step = build(impl, X, None, before, shape[3])
        row = {"loss_before": step.loss()}
        step.run()
        row["loss_after"] = step.loss()
        row["update_vs_ksae"] = update_difference(before, step.weights(), reference_after)
        row["optimizer"] = step.optimizer
        rows[impl] = row
        del step
    for impl, row in rows.items():
        row["loss_before_vs_ksae"] = relative(row["loss_before"], rows["ksae"]["loss_before"])
        row["loss_after_vs_ksae"] = relative(row["loss_after"], rows["ksae"]["loss_after"])
    return {"shape": list(shape), "threads": settings, "rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("time", help="time one implementation in this process")
    t.add_argument("impl", choices=IMPLEMENTATIONS)
    t.add_argument("shape", type=parse_shape, help="batch,d_in,n_latents,k")
    t.add_argument("--seconds", type=float, default=0.5, help="timed calls fill about this long")
    t.add_argument("--warmup", type=float, default=0.5, help="untimed calls first, about this long")
    c = sub.add_parser("check", help="check that the implementations agree")
    c.add_argument("shape", type=parse_shape, help="batch,d_in,n_latents,k")
    c.add_argument("--impls", default=",".join(MODELS), help="comma-separated models to compare")
    for p in (t, c):
        p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for the library")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "time":
        result = time_one(args.impl, args.shape, args.threads, args.seconds, args.warmup)
    else:
        result = check(args.shape, args.threads, args.impls.split(","))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
