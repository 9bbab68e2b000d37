"""Command-line options and config files derived from the configuration dataclasses.

Every field of ModelConfig, TrainConfig and DataConfig (``ksae.config``) is a flag
(``n_latents`` -> ``--n-latents``) and a key of the matching table of a TOML or YAML config
file (``model``, ``train``, ``data``). Precedence, lowest first: the dataclass defaults, the
experiment defaults below (for synthetic data), the config file, the flags.
"""

from __future__ import annotations

import argparse
import re
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..config import DataConfig, ModelConfig, TrainConfig, check_known_keys, field_names
from .errors import renamed

SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}

SYNTHETIC_DEFAULTS: dict[str, dict[str, Any]] = {
    # The default experiment: 256 latents, k = 4, on 64-wide samples made of 4 of 128 planted
    # directions; it recovers the planted dictionary in a few seconds. Other data (array,
    # store, images) gets the API's defaults (ModelConfig's: 1024 latents, k = 32).
    "model": {"n_latents": 256, "k": 4},
}

DEFAULT_HELP: dict[str, str] = {
    "model.n_latents": "256 with --dataset synthetic, else 1024",
    "model.k": "4 with --dataset synthetic, else 32",
    "model.random_state": "--seed",
}
"""The default a flag's help names where it is not the dataclass field's own."""

SECTION_HELP: dict[str, str] = {
    "model": "The model's architecture (ksae.ModelConfig; the [model] table of a config file).",
    "train": "How the model is trained (ksae.TrainConfig; the [train] table of a config file).",
    "data": "The data (ksae.DataConfig; the [data] table of a config file): synthetic (generated, "
            "offline), mnist or fashion-mnist (images, downloaded once), array (a .npy or .npz "
            "file) or store (an activation store directory).",
}

FLAGS = "flags"
"""The source name of the command line's own layer of options (see ``configure``)."""

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")

Tables = dict[str, dict[str, Any]]
"""Options by section and field name: ``{"model": {"k": 8}, "data": {...}}``."""

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


def experiment_defaults(dataset: str) -> Tables:
    """The command line's defaults for ``dataset`` over the dataclasses': a small, fast
    model for synthetic data, the API's own for every other dataset."""
    return SYNTHETIC_DEFAULTS if dataset == "synthetic" else {}


def plain(text: str) -> str:
    """Docstring markup (````x````) as plain text, safe in argparse's help (``%`` escaped)."""
    return re.sub(r"``([^`]+)``", r"\1", text).replace("%", "%%")


def help_text(section: str, f: Any) -> str:
    """A field's help with its default named once: the help's own ``(default: ...)``, else
    ``DEFAULT_HELP``'s, else the field's (none for None)."""
    text = plain(f.metadata.get("help", ""))
    default = DEFAULT_HELP.get(f"{section}.{f.name}")
    if default is None:
        if "(default:" in text or f.default is None or f.default is MISSING:
            return text
        default = f.default
        if isinstance(default, bool):
            default = flag_name(f.name) if default else flag_name("no_" + f.name)
    return f"{text} (default: {default})"


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
        group = parser.add_argument_group(f"{section} options", SECTION_HELP[section])
        for f in fields(cls):
            if f"{section}.{f.name}" in skipped:
                continue
            kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS,
                                      "help": help_text(section, f)}
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


def configure(layers: Sequence[tuple[str | None, Tables]], seed: int) -> Config:
    """``build_config`` of the layers merged in order, lowest first. Each layer is named by
    its source: ``FLAGS``, a file, or None (defaults); an error's leading field name becomes
    where its value was given (``--k``, ``run/config.json [model] k``)."""
    names: dict[str, str] = {}
    for source, tables in layers:
        for section, table in tables.items():
            for name in table:
                names[name] = (flag_name(name) if source == FLAGS else
                               f"{source} [{section}] {name}" if source else name)
    try:
        return build_config(merge(*(tables for _, tables in layers)), seed)
    except (TypeError, ValueError) as exc:
        raise type(exc)(renamed(str(exc), names)) from None


def build_config(tables: dict[str, dict[str, Any]], seed: int) -> Config:
    """Validated config objects from merged tables; the model's ``random_state`` defaults
    to ``seed``. Raises TypeError/ValueError naming the bad option."""
    model = dict(tables.get("model", {}))
    model.setdefault("random_state", seed)
    return {"model": ModelConfig(**model), "train": TrainConfig(**tables.get("train", {})),
            "data": DataConfig(**tables.get("data", {}))}
