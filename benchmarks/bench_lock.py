"""What the model's readers-writer lock and the weights' finiteness check cost (issue 27,
item 6): a small step (partial_fit on 256 x 784, 1000 latents, k=25) and a small encode
(64 rows) in three variants: "now" (the lock and the check of the weights for NaN and
infinity, once per step), "lock only" (the check switched off) and "before" (the lock
disabled too: ``ksae.locking._NoLock``, the behaviour of the commit before them), interleaved
round by round in one process so that a loaded machine slows all alike; medians. Each round
times, per variant: a step, the encode right after it (which pays the check, once per step)
and an encode of the unchanged model (which pays nothing for it); then the check alone and
one uncontended read lock (enter and exit).

    PYTHONPATH=python python benchmarks/bench_lock.py [ROUNDS] [N_THREADS]   # 201, 0 (all)
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

import ksae
from ksae.locking import _NoLock


def timed(f) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    f()
    return (time.perf_counter() - start) * 1e6


def _enter_exit(state: ksae.ModelState) -> float:
    """One uncontended read lock, entered and left, in us (the mean of 1000)."""
    start = time.perf_counter()
    for _ in range(1000):
        with state.access.read:
            pass
    return (time.perf_counter() - start) * 1e3


def main(rounds: int = 201, n_threads: int = 0) -> None:
    rng = np.random.default_rng(0)
    X = rng.random((256, 784), dtype=np.float32)
    X_small = X[:64].copy()
    models = {}
    for variant in ("now", "lock only", "before"):
        sae = ksae.SparseAutoencoder(n_latents=1000, k=25, random_state=0,
                                     n_threads=n_threads or None).partial_fit(X)
        if variant != "now":  # private switches, for this comparison only
            sae.state_.check_weights = lambda again=False: None
        if variant == "before":
            sae.state_.access = _NoLock()
        models[variant] = sae
    whats = ("step", "encode after a step", "encode")
    figures: dict[str, list[float]] = {f"{what}, {variant}": [] for what in whats
                                       for variant in models}
    figures["check_weights alone"], figures["read lock alone"] = [], []
    state = models["now"].state_
    for r in range(rounds + 5):  # the first 5 rounds warm up
        order = list(models)[r % 3:] + list(models)[:r % 3]
        for variant in order:
            sae = models[variant]
            times = (timed(lambda sae=sae: sae.partial_fit(X)),
                     timed(lambda sae=sae: sae.encode(X_small)),
                     timed(lambda sae=sae: sae.encode(X_small)))
            if r >= 5:
                for what, t in zip(whats, times):
                    figures[f"{what}, {variant}"].append(t)
        alone = (timed(lambda: state.check_weights(again=True)), _enter_exit(state))
        if r >= 5:
            figures["check_weights alone"].append(alone[0])
            figures["read lock alone"].append(alone[1])
    first, *others = (models[v].state_.params["W_dec"] for v in models)
    assert all(np.array_equal(first, o) for o in others), "the lock must not change training"
    print(f"{rounds} rounds, n_threads={n_threads or 'all'}, medians in us")
    for name, values in figures.items():
        print(f"  {name:32s} {statistics.median(values):9.1f}   ({len(values)} repeats)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
