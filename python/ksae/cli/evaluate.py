"""``ksae evaluate``: a saved model's figures on a dataset's test split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..training import evaluate
from .saved import add_model_and_data_arguments, load_model_and_data
from .train import probe_accuracy, wants_probe, write_json


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``ksae evaluate``."""
    parser.add_argument("--out", type=Path, default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--probe", action="store_true",
                        help="also fit a linear probe (softmax regression) on the codes of the "
                             "training split and report its test accuracy (labelled data only)")
    add_model_and_data_arguments(parser)


def evaluate_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Print (and with --out write) test MSE, FVE, L0, dead fraction and probe accuracy."""
    try:
        sae, data, seed = load_model_and_data(args)
        wants_probe(args.probe, data)
    except (TypeError, ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    metrics = {f"test_{name}": value for name, value in evaluate(sae, data.test).items()}
    if args.probe:
        metrics["probe_accuracy"] = probe_accuracy(sae, data, seed)
    metrics["n_test"] = int(len(data.test))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, metrics)
    print(json.dumps(metrics, indent=2))
    return 0
