"""What ``ksae evaluate`` and ``ksae encode`` share: a saved model and the data to apply it to."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .data import ExperimentData, load_data, source_flag
from .options import FLAGS, Tables, add_config_options, configure, flag_values, read_config_file


def add_model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL_DIR, ``--config``, ``--seed`` and the data options."""
    parser.add_argument("model", type=Path, metavar="MODEL_DIR",
                        help="a saved model (the directory ksae.save wrote) or a run directory of "
                             "ksae train, whose data options then are the defaults")
    parser.add_argument("--config", type=Path,
                        help="TOML or YAML config file; its data table is used")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the synthetic data (default: the run's, else 0)")
    add_config_options(parser, ("data",))


def load_model_and_data(args: argparse.Namespace) -> tuple[Any, ExperimentData, int]:
    """The model of ``args.model``, the data (the run's data options < config file < flags)
    and the seed (``--seed``, else the run's, else 0)."""
    import ksae

    path: Path = args.model
    run_config: dict[str, Any] = {}
    if (path / "model").is_dir():  # a run directory
        run_file = path / "config.json"
        if run_file.is_file():
            try:
                run_config = json.loads(run_file.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{run_file} is not valid JSON ({exc})") from None
        path = path / "model"
    if not path.is_dir():
        raise FileNotFoundError(f"MODEL_DIR: {str(args.model)!r} is not a directory")
    sae = ksae.load(path)
    layers: list[tuple[str | None, Tables]] = [(str(args.model / "config.json"),
                                                {"data": run_config.get("data", {})})]
    if args.config is not None:
        layers.append((str(args.config), {"data": read_config_file(args.config).get("data", {})}))
    layers.append((FLAGS, flag_values(args)))
    seed = args.seed if args.seed is not None else run_config.get("seed", 0)
    data_cfg = configure(layers, seed)["data"]
    data = load_data(data_cfg, seed, sae.config.dtype)
    if data.test.shape[1] != sae.n_features_in_:
        raise ValueError(f"{source_flag(data_cfg)}: the data has {data.test.shape[1]} features per "
                         f"row; the model {path} expects {sae.n_features_in_}")
    return sae, data, seed
