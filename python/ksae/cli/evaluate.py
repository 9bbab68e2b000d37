"""``ksae evaluate``: a saved model's figures on a dataset's test split; for a model trained
on an activation store, also the field's figures (FVU, L0, dead and dense latents, the
log-density histogram, relative reconstruction bias) and, with ``--spliced``, what its
reconstruction does to the transformer itself."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..activation_store import ActivationStore
from ..field_metrics import store_metrics
from ..training import evaluate
from .errors import UsageError, output_directory, usage_errors
from .saved import add_model_and_data_arguments, load_model_and_data
from .train import probe_accuracy, wants_probe, write_json


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``ksae evaluate``."""
    parser.add_argument("--out", type=Path, default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--probe", action="store_true",
                        help="also fit a linear probe (softmax regression) on the codes of the "
                             "training split and report its test accuracy (labelled data only)")
    parser.add_argument("--spliced", action="store_true",
                        help="activation stores (the hf extra): also run the transformer with the "
                             "layer replaced by the reconstruction on held-out documents and "
                             "report the change in its output against the clean run and against "
                             "zero-ablation (loss recovered for a causal LM, embedding recovered "
                             "for an encoder)")
    parser.add_argument("--spliced-tokens", type=int, default=16384, metavar="N",
                        help="text tokens the spliced-in metric runs over (default: 16384)")
    add_model_and_data_arguments(parser)


def _store_figures(sae: Any, test_store: ActivationStore, spliced: bool,
                   spliced_tokens: int) -> dict[str, Any]:
    """The field's figures on the held-out documents (and the spliced-in ones)."""
    figures = store_metrics(sae, test_store)
    figures.pop("firing_counts")
    out = {f"test_{name}": value for name, value in figures.items()}
    if spliced:
        from ..splice import spliced_metrics
        out.update({f"spliced_{name}": value for name, value in
                    spliced_metrics(sae, test_store, max_tokens=spliced_tokens).items()})
    return out


def evaluate_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Print (and with --out write) test MSE, FVE, L0, dead fraction and probe accuracy."""
    if args.spliced_tokens < 1:
        raise UsageError(f"--spliced-tokens: expected an integer >= 1, got {args.spliced_tokens}")
    with usage_errors():
        if args.out is not None:
            output_directory(args.out.parent, "--out")
        sae, data, seed = load_model_and_data(args)
        wants_probe(args.probe, data)
        if args.spliced and data.test_store is None:
            raise ValueError("--spliced: needs a model trained on an activation store (--dataset store)")
        metrics = {f"test_{name}": value for name, value in evaluate(sae, data.test).items()}
        if data.test_store is not None:
            metrics.update(_store_figures(sae, data.test_store, args.spliced, args.spliced_tokens))
    if args.probe:
        metrics["probe_accuracy"] = probe_accuracy(sae, data, seed)
    metrics["n_test"] = len(data.test)
    if args.out is not None:
        write_json(args.out, metrics)
    print(json.dumps(metrics, indent=2))
    return 0
