"""``ksae features``: the feature page of a model trained on an activation store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..activation_store import ActivationStore
from ..features import feature_report
from .errors import usage_errors


def add_features_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``ksae features``."""
    parser.add_argument("run_dir", type=Path, metavar="RUN",
                        help="a run directory of ksae train --dataset store (its model, on the "
                             "test documents of its store), or a saved model directory with --store")
    parser.add_argument("--out", type=Path, required=True,
                        help="the HTML page to write; the same data goes beside it as .json")
    parser.add_argument("--store", type=Path, default=None,
                        help="read all the rows of this activation store instead of the run's "
                             "test documents")
    parser.add_argument("--latents", default=None, metavar="IDS",
                        help="the latents to show, as ids and ranges: 1,2,3 or 0-99,512 "
                             "(default: all)")
    parser.add_argument("--top", type=int, default=20, metavar="N",
                        help="top-activating contexts per latent (default: 20)")
    parser.add_argument("--context", type=int, default=8, metavar="N",
                        help="tokens shown either side of the activating one (default: 8)")
    parser.add_argument("--batch-size", type=int, default=1024, metavar="N",
                        help="rows encoded at a time (default: 1024)")


def parse_latents(text: str) -> list[int]:
    """Latent ids from ``1,2,3`` or ``0-99,512``."""
    latents: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            a, b = int(first), int(last or first)
            if b < a:
                raise ValueError
            latents.extend(range(a, b + 1))
    except ValueError:
        raise ValueError(f"--latents: expected latent ids and ranges such as 1,2,3 or 0-99,512, "
                         f"got {text!r}") from None
    return latents


def _model_and_store(run: Path, store: Path | None) -> tuple[Any, Any]:
    """The model of ``run`` and the rows to inspect: ``store`` whole, else the run's test split."""
    from ..loading import load

    model_dir = run / "model" if (run / "model").is_dir() else run
    if not model_dir.is_dir():
        raise FileNotFoundError(f"RUN: {str(run)!r} is not a directory")
    sae = load(model_dir)
    if store is not None:
        return sae, ActivationStore(store, dtype=sae.config.dtype)
    run_file = run / "config.json"
    if model_dir == run or not run_file.is_file():
        raise ValueError(f"--store: {str(run)!r} is a model directory, not a run directory; "
                         "name the activation store to read with --store")
    data = json.loads(run_file.read_text()).get("data", {})
    if data.get("dataset") != "store":
        raise ValueError(f"--store: the run {str(run)!r} was trained on dataset "
                         f"{data.get('dataset')!r}, not an activation store; name one with --store")
    whole = ActivationStore(data["path"], dtype=sae.config.dtype)
    return sae, whole.split_documents(data["test_fraction"])[1]


def features_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Write the feature page and its JSON; print where."""
    with usage_errors(path="--store", store="--store", out_html="--out", latents="--latents",
                      top="--top", context="--context", batch_size="--batch-size"):
        latents = None if args.latents is None else parse_latents(args.latents)
        sae, rows = _model_and_store(args.run_dir, args.store)
        data = feature_report(sae, rows, args.out, latents=latents, top=args.top,
                              context=args.context, batch_size=args.batch_size)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}: {len(data['latents'])} latents "
          f"over {data['n_rows']} rows of {data['store']}")
    return 0
