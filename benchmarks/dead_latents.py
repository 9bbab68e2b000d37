"""When do latents die? (issue 25, item 1.) Trains on Fashion-MNIST (1000 latents, k=25, 20
epochs, batch 256 by default) and, every ``--every`` steps, records two fractions of the
latents: those that have never fired since the start, and those that have not fired in the
last ``--window`` training samples (the trainer's dead test, ``dead_after_samples``). At the
end it prints the test MSE and the fraction of latents that fire on no test image.

    PYTHONPATH=python python benchmarks/dead_latents.py '{"auxk_coef": 0.03125}'

The argument is a JSON object of options: constructor options (``b_dec_init``) and fit's.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

import ksae

CONSTRUCTOR = ("b_dec_init", "init", "n_latents", "k")
REPORTED_STEPS = (20, 40, 60, 100, 200, 400, 600, 1000, 2000, 3000, 4680)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("options", nargs="?", default="{}", help="JSON object of options")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--every", type=int, default=20, help="steps between records")
    parser.add_argument("--window", type=int, default=100_000, help="samples of the dead test")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    options: dict[str, Any] = json.loads(args.options)
    model = {"n_latents": 1000, "k": 25, **{k: options.pop(k) for k in list(options) if k in CONSTRUCTOR}}
    X = ksae.load_mnist("fashion-mnist", "train").images.astype(np.float32)
    X_test = ksae.load_mnist("fashion-mnist", "test").images.astype(np.float32)
    sae = ksae.SparseAutoencoder(random_state=0, **model)
    records: list[tuple[int, float, float]] = []

    def record(rec: dict[str, Any]) -> None:
        if rec.get("event") == "step":
            state = sae.state_
            since = state.samples_since_fired
            records.append((state.n_iter, float(np.mean(since >= state.n_iter * options.get("batch_size", 256))),
                            float(np.mean(since >= args.window))))

    start = time.perf_counter()
    sae.fit(X, epochs=args.epochs, callback=record, log_every=args.every, **options)
    code = sae.encode(X_test)
    fired = np.zeros(model["n_latents"], dtype=bool)
    fired[code.indices[code.values > 0]] = True
    mse = float(np.mean((sae.reconstruct(X_test) - X_test) ** 2))
    print(f"{args.options}: {time.perf_counter() - start:.0f} s, test MSE {mse:.5f}, "
          f"dead on the test set {1 - fired.mean():.3f}")
    for step, never, window in records:
        if step in REPORTED_STEPS:
            print(f"  step {step:5d}: never fired {never:.3f}, not fired in the last "
                  f"{args.window} samples {window:.3f}")


if __name__ == "__main__":
    main()
