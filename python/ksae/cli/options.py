"""Command-line options and config files derived from the configuration dataclasses.

Every field of ModelConfig, TrainConfig and DataConfig (``ksae.config``) is a flag
(``n_latents`` -> ``--n-latents``) and a key of the matching table of a TOML or YAML config
file (``model``, ``train``, ``data``). Precedence, lowest first: the dataclass defaults, the
experiment defaults below, the config file, the flags.
"""

from __future__ import annotations

import argparse
import re
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Iterable

from ..config import DataConfig, ModelConfig, TrainConfig, check_known_keys, field_names

SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}

EXPERIMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    # The default experiment: 256 latents, k = 4, on 64-wide samples made of 4 of 128 planted
    # directions; it recovers the planted dictionary in a few seconds.
    "model": {"n_latents": 256, "k": 4},
    "train": {"epochs": 10},
}

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")

Config = dict[str, Any]
"""The three config objects by section name: ``{"model": ModelConfig, "train": ..., "data": ...}``."""


def flag_name(name: str) -> str:
    """``n_latents`` -> ``--n-latents``."""
    return "--" + name.replace("_", "-")


def field_type(cls: type, name: str) -> type:
    """The type of a field, with ``X | None`` reduced to ``X``."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _optional(cls: type, name: str) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(cls)[name])


def add_config_options(parser: argparse.ArgumentParser, sections: Iterable[str],
                       skip: Iterable[str] = ()) -> None:
    """One flag per field of each section's dataclass, stored as ``<section>.<field>``;
    absent flags stay absent, so a config file's value is not overridden by a default.
    ``skip`` names fields (``"model.k"``) a command defines its own way."""
    skipped = set(skip)
    for section in sections:
        cls = SECTIONS[section]
        group = parser.add_argument_group(f"{section} options", (cls.__doc__ or "").split("\n")[0])
        for f in fields(cls):
            if f"{section}.{f.name}" in skipped:
                continue
            default = EXPERIMENT_DEFAULTS.get(section, {}).get(f.name, f.default)
            if default is MISSING:  # pragma: no cover - every field has a default
                default = None
            kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS,
                                      "help": f"{f.metadata.get('help', '')} (default: {default})"}
            typ = field_type(cls, f.name)
            if typ is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = typ
                if "choices" in f.metadata:
                    kwargs["choices"] = f.metadata["choices"]
                else:
                    kwargs["metavar"] = f.name.upper()
            group.add_argument(flag_name(f.name), **kwargs)


def flag_values(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The config flags given on the command line, as ``{section: {field: value}}``."""
    given: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if name and section in SECTIONS:
            given.setdefault(section, {})[name] = value
    return given


# PyYAML follows YAML 1.1, which reads 1e-3 (no dot) as a string; TOML and YAML 1.2 read a number.
_YAML_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _check_value(where: str, cls: type, name: str, value: Any, yaml: bool) -> Any:
    """``value`` if it has the field's type (an int is a float too); YAML 1.1's string
    spelling of a float such as ``1e-3`` becomes the float. Raises a TypeError naming where."""
    if value is None and _optional(cls, name):
        return value
    typ = field_type(cls, name)
    if typ is float and yaml and isinstance(value, str) and _YAML_FLOAT.match(value):
        return float(value)
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        expected = typ.__name__ + (" or null" if _optional(cls, name) else "")
        raise TypeError(f"{where}: {name} expects {expected}, got {type(value).__name__} {value!r}")
    return value


def read_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """The tables of a TOML (``.toml``) or YAML (``.yaml``/``.yml``) config file, checked for
    unknown sections and keys (with the closest known name) and for values of the wrong type."""
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ValueError(f"--config: expected a file ending in {', '.join(CONFIG_SUFFIXES)}, got {str(path)!r}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"--config: {str(path)!r} not found") from None
    yaml = suffix != ".toml"
    data = _parse_yaml(path, raw) if yaml else _parse_toml(path, raw)
    check_known_keys(f"{path}", data, list(SECTIONS))
    checked: dict[str, dict[str, Any]] = {}
    for section, table in data.items():
        if table is None and yaml:  # "train:" with nothing under it
            table = {}
        if not isinstance(table, dict):
            raise ValueError(f"{path}: {section} must be a table of options, got {type(table).__name__} {table!r}")
        cls = SECTIONS[section]
        check_known_keys(f"{path} [{section}]", table, field_names(cls))
        checked[section] = {name: _check_value(f"{path} [{section}]", cls, name, value, yaml)
                            for name, value in table.items()}
    return checked


def _parse_toml(path: Path, raw: bytes) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        import tomli as tomllib
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--config: {path} is not valid TOML ({exc})") from None


def _parse_yaml(path: Path, raw: bytes) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"--config: {path} is not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping with model, train and data "
                         f"tables, got {type(data).__name__}")
    return data


def merge(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The layers' tables merged section by section, later layers winning."""
    merged: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for layer in layers:
        for section, table in layer.items():
            merged[section].update(table)
    return merged


def build_config(tables: dict[str, dict[str, Any]], seed: int) -> Config:
    """Validated config objects from merged tables; the model's ``random_state`` defaults
    to ``seed``. Raises TypeError/ValueError naming the bad option."""
    model = dict(tables.get("model", {}))
    model.setdefault("random_state", seed)
    return {"model": ModelConfig(**model), "train": TrainConfig(**tables.get("train", {})),
            "data": DataConfig(**tables.get("data", {}))}
