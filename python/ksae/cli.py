"""``ksae-train``: run a complete experiment from flags or a TOML config file.

The options are generated from the configuration dataclasses (``ksae.config``): every field
of ModelConfig, TrainConfig and DataConfig is a flag (``n_latents`` -> ``--n-latents``) and a
key of the matching TOML table (``[model]``, ``[train]``, ``[data]``). Precedence, lowest
first: the experiment defaults below, the config file, the flags.

With no arguments it trains on a synthetic planted-dictionary dataset (no network needed) and
writes the model, ``metrics.json`` and the resolved ``config.json`` into a run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import typing
from dataclasses import MISSING, asdict, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import DataConfig, ModelConfig, TrainConfig, check_known_keys, field_names
from .training import evaluate

SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}

EXPERIMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    # The default experiment: 256 latents, k = 4, on 64-wide samples made of 4 of 128 planted
    # directions; it recovers the planted dictionary in a few seconds.
    "model": {"n_latents": 256, "k": 4},
    "train": {"epochs": 10},
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(cls: type, name: str) -> type:
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_config_options(parser: argparse.ArgumentParser, section: str, cls: type) -> None:
    """One flag per field of ``cls``, stored as ``<section>.<field>``; absent flags stay
    absent (so a config file's value is not overridden by a default)."""
    group = parser.add_argument_group(f"{section} options", (cls.__doc__ or "").split("\n")[0])
    for f in fields(cls):
        default = EXPERIMENT_DEFAULTS.get(section, {}).get(f.name, f.default)
        if default is MISSING:  # pragma: no cover - every field has a default
            default = None
        kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS,
                                  "help": f"{f.metadata.get('help', '')} (default: {default})"}
        typ = _field_type(cls, f.name)
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = typ
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            else:
                kwargs["metavar"] = f.name.upper()
        group.add_argument(_flag(f.name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ksae-train", description="Train a k-sparse autoencoder and write the model, "
        "metrics.json and the resolved config.json into a run directory.")
    parser.add_argument("--config", type=Path, help="TOML file with [model], [train] and [data] tables")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: runs/<date>-<time>)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the data and, unless --random-state is given, the model (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    for section, cls in SECTIONS.items():
        add_config_options(parser, section, cls)
    return parser


def read_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """The tables of a TOML config file, checked for unknown sections and keys."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--config: {str(path)!r} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config: {path} is not valid TOML ({exc})") from None
    check_known_keys(f"{path}", data, list(SECTIONS))
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: [{section}] must be a table")
        check_known_keys(f"{path} [{section}]", table, field_names(SECTIONS[section]))
    return data


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Merge experiment defaults < config file < flags into validated config objects."""
    layers = [EXPERIMENT_DEFAULTS]
    if args.config is not None:
        layers.append(read_config_file(args.config))
    flags: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            flags.setdefault(section, {})[name] = value
    layers.append(flags)
    merged: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for layer in layers:
        for section, table in layer.items():
            merged[section].update(table)
    merged["model"].setdefault("random_state", args.seed)
    return {section: cls(**merged[section]) for section, cls in SECTIONS.items()}


def load_data(data: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Train and test arrays, and what the report needs to know about the data."""
    from .datasets import make_sparse_dictionary

    made = make_sparse_dictionary(n_samples=data.n_samples, d_in=data.d_in,
                                  n_components=data.n_components, n_active=data.n_active,
                                  noise=data.noise, random_state=seed)
    n_test = max(1, int(round(data.n_samples * data.test_fraction)))
    return made.X[:-n_test], made.X[-n_test:], {"directions": made.directions}


def run(config: dict[str, Any], out: Path, seed: int, quiet: bool = False) -> dict[str, Any]:
    """Train, evaluate and write the run directory; returns the metrics."""
    import ksae

    model_cfg: ModelConfig = config["model"]
    train_cfg: TrainConfig = config["train"]
    X_train, X_test, extra = load_data(config["data"], seed)
    sae = ksae.SparseAutoencoder(**asdict(model_cfg))

    def progress(record: dict[str, Any]) -> None:
        if not quiet and record["event"] == "epoch":
            print(f"epoch {record['epoch']:>3}/{train_cfg.epochs}  loss {record['loss']:.5f}  "
                  f"test fve {record['val_fve']:.4f}  L0 {record['l0']:.1f}  "
                  f"dead {100 * record['dead_fraction']:.1f}%  {record['time']:.2f}s", flush=True)

    started = time.perf_counter()
    sae.fit(X_train, validation_data=X_test, callback=progress, **asdict(train_cfg))
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {f"test_{name}": value for name, value in evaluate(sae, X_test).items()}
    metrics.update({
        "train_loss": sae.history_["loss"][-1],
        "train_seconds": seconds,
        "train_samples_per_second": X_train.shape[0] * train_cfg.epochs / seconds,
        "steps": sae.n_iter_,
        "n_train": int(X_train.shape[0]),
        "n_test": int(X_test.shape[0]),
    })
    if "directions" in extra:
        metrics["dictionary_recovery"] = ksae.dictionary_recovery(extra["directions"], sae.W_dec_)
    metrics["history"] = sae.history_
    metrics["ksae_version"] = ksae.__version__
    metrics["build"] = ksae.build_info()

    out.mkdir(parents=True, exist_ok=True)
    sae.save(out / "model")
    resolved = {section: asdict(cfg) for section, cfg in config.items()} | {"seed": seed}
    (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = resolve(args)
    except (TypeError, ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    out = args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    metrics = run(config, out, args.seed, quiet=args.quiet)
    summary = {k: metrics[k] for k in ("test_mse", "test_fve", "test_l0", "test_dead_fraction",
                                       "dictionary_recovery", "train_seconds") if k in metrics}
    print(f"wrote {out}/model, {out}/metrics.json, {out}/config.json")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
