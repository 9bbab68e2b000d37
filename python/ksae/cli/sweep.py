"""``ksae sweep``: one training run per k, compared with each other and with PCA in one report."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..config import ModelConfig
from .data import ExperimentData, load_data
from .errors import output_directory, usage_errors
from .options import add_config_options
from .train import add_common_arguments, resolve, train_run, wants_probe, write_json


def k_list(text: str) -> list[int]:
    """``"5,10,20"`` -> ``[5, 10, 20]`` (argparse type of ``--k``)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 5,10,20, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected one or more integers >= 1, got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct values, got {text!r}")
    return values


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``ksae sweep``: those of ``ksae train`` with ``--k`` a list, less ``--resume``."""
    parser.add_argument("--k", type=k_list, required=True, metavar="K1,K2,...",
                        help="the values of k to train, comma-separated (one run each)")
    parser.add_argument("--out", type=Path, default=None,
                        help="sweep directory: one run directory k=<k>/ per k, and the report "
                             "(default: runs/sweep-<date>-<time>)")
    add_common_arguments(parser)
    add_config_options(parser, ("model", "train", "data"), skip=("model.k",))


def pca_test_mse(data: ExperimentData, ks: Iterable[int], chunk_rows: int = 8192) -> dict[int, float]:
    """Test MSE of PCA with k components fitted on the training data, for each k.

    The covariance is accumulated over training chunks in float64 (about a first chunk's mean,
    so that large offsets do not cancel) and diagonalised with ``np.linalg.eigh``; streamed
    training data is read once, a chunk at a time. ``k >= n_features`` reconstructs exactly."""
    n, shift, gram, total = 0, None, None, None
    for chunk in data.train_chunks(chunk_rows):
        x = np.asarray(chunk, dtype=np.float64)
        if shift is None:
            shift = x.mean(axis=0)
            gram, total = np.zeros((x.shape[1], x.shape[1])), np.zeros(x.shape[1])
        x = x - shift
        gram += x.T @ x
        total += x.sum(axis=0)
        n += len(x)
    assert shift is not None and gram is not None and total is not None
    offset = total / n
    covariance = gram / n - np.outer(offset, offset)
    _, vectors = np.linalg.eigh(covariance)
    components = vectors[:, ::-1]  # largest variance first
    centered = np.asarray(data.test, dtype=np.float64) - (shift + offset)
    captured = np.cumsum(((centered @ components) ** 2).sum(axis=0))
    whole = float((centered ** 2).sum())
    size = centered.size
    d = centered.shape[1]
    return {k: max(whole - float(captured[min(k, d) - 1]), 0.0) / size for k in ks}


def sweep_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Train one run per k into ``OUT/k=<k>/``, then write the sweep report into OUT."""
    out: Path = args.out or Path("runs") / datetime.now().strftime("sweep-%Y%m%d-%H%M%S")
    with usage_errors(k="--k"):  # ModelConfig names --k's values "k"
        base, seed = resolve(args)
        configs = {k: base | {"model": ModelConfig(**{**asdict(base["model"]), "k": k})} for k in args.k}
        data = load_data(base["data"], seed, base["model"].dtype)
        wants_probe(args.probe, data)
        output_directory(out, "--out")
    pca = pca_test_mse(data, args.k)
    rows, reconstructions = [], {}
    originals = data.test[:10]
    for k, config in configs.items():
        if not args.quiet:
            print(f"== k={k}", flush=True)
        sae, metrics = train_run(config, data, out / f"k={k}", seed=seed, probe=args.probe, quiet=args.quiet)
        rows.append(sweep_row(k, metrics, pca[k]))
        if data.image_shape is not None:
            reconstructions[f"k={k}"] = sae.reconstruct(originals)
    write_sweep_outputs(out, base, data, rows, originals, reconstructions, seed)
    print(f"wrote {out}: k=<k>/ run directories, sweep.json, report.html")
    for row in rows:
        print("  ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in row.items()))
    return 0


COLUMN_NAMES = {
    "test_mse": "test MSE", "pca_mse": "PCA test MSE", "mse_ratio": "MSE / PCA MSE",
    "test_fve": "test FVE", "test_fvu": "test FVU", "pca_fvu": "PCA test FVU", "test_l0": "test L0",
    "test_dead_fraction": "dead on test", "probe_accuracy": "probe accuracy",
    "train_seconds": "training (s)", "dataset": "dataset", "n_latents": "latents",
    "batch_size": "batch size", "lr": "learning rate", "n_train": "training rows",
    "n_test": "test rows"}
"""Readable names of the sweep report's columns and figures."""


def sweep_row(k: int, metrics: dict[str, Any], pca_mse: float) -> dict[str, Any]:
    """One line of the sweep table."""
    test_fvu = 1 - metrics["test_fve"]
    row: dict[str, Any] = {"k": k, "test_mse": metrics["test_mse"], "pca_mse": pca_mse,
                           "mse_ratio": metrics["test_mse"] / pca_mse if pca_mse > 0 else None,
                           "test_fve": metrics["test_fve"], "test_fvu": test_fvu,
                           # the same test variance divides both: FVU = MSE / (variance per element)
                           "pca_fvu": test_fvu * pca_mse / metrics["test_mse"] if metrics["test_mse"] > 0 else None,
                           "test_l0": metrics["test_l0"],
                           "test_dead_fraction": metrics["test_dead_fraction"]}
    if "probe_accuracy" in metrics:
        row["probe_accuracy"] = metrics["probe_accuracy"]
    row["train_seconds"] = metrics["train_seconds"]
    return row


def write_sweep_outputs(out: Path, base: dict[str, Any], data: ExperimentData, rows: list[dict[str, Any]],
                        originals: np.ndarray, reconstructions: dict[str, np.ndarray], seed: int) -> None:
    """``sweep.json``, ``sweep.png`` (and ``reconstructions.png``) and the report."""
    import ksae
    from ..plots import plot_frontier, plot_reconstructions

    out.mkdir(parents=True, exist_ok=True)
    config = {section: asdict(cfg) for section, cfg in base.items()} | {"seed": seed}
    del config["model"]["k"]
    write_json(out / "sweep.json", {"rows": rows, "config": config})
    plot_frontier(rows, out / "sweep.png")
    images = [("Test FVU against L0: the k-sparse autoencoder (each point a k) and PCA with k "
               "components", "sweep.png")]
    if reconstructions:
        assert data.image_shape is not None
        plot_reconstructions(originals, reconstructions, data.image_shape, out / "reconstructions.png")
        images.append(("Test images (top) and their reconstructions, one row per k", "reconstructions.png"))
    model, train = base["model"], base["train"]
    summary = {"dataset": base["data"].dataset, "n_latents": model.n_latents, "epochs": train.epochs,
               "batch_size": train.batch_size, "lr": train.lr, "n_train": data.n_train,
               "n_test": int(len(data.test))}
    ksae.write_report(out, f"k sweep: {base['data'].dataset}, n_latents={model.n_latents}", summary, images,
                      table=rows, names=COLUMN_NAMES, notes=f"Data: {data.description}. PCA: the "
                      "top k principal components of the training data, applied to the test split. "
                      "FVU: fraction of the test variance unexplained. Each k's run directory is k=<k>/.")
