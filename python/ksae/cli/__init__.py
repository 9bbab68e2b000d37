"""The ``ksae`` command: ``ksae train``, ``ksae evaluate``, ``ksae encode``, ``ksae harvest``,
``ksae sweep``, ``ksae export`` and ``ksae features``.

``ksae-train`` is ``ksae train``. Options of the model, training and data are generated from
the configuration dataclasses (``ksae.config``, see ``ksae.cli.options``), so an option is
written once, with its help text, and is a flag and a config-file key alike.

Errors are one line, ``ksae COMMAND: error: ...`` (``ksae.cli.errors``); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .errors import RUN_ERRORS, CommandError, Parser, UsageError, add_debug_flag, report
from .train import INTERRUPTED, Interrupted, add_train_arguments, train_command

__all__ = ["main", "train_main", "build_parser"]

Command = Callable[[argparse.Namespace, argparse.ArgumentParser], int]


def build_parser() -> argparse.ArgumentParser:
    """The ``ksae`` parser with one sub-parser per command."""
    from .encode import add_encode_arguments, encode_command
    from .evaluate import add_evaluate_arguments, evaluate_command
    from .export import add_export_arguments, export_command
    from .features import add_features_arguments, features_command
    from .harvest import add_harvest_arguments, harvest_command
    from .sweep import add_sweep_arguments, sweep_command

    parser = Parser(prog="ksae", description="Train, evaluate and apply k-sparse autoencoders.")
    add_debug_flag(parser)
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    specs: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Command]] = [
        ("train", "train a model; write model, metrics, config, checkpoint, plots and report "
                  "into a run directory", add_train_arguments, train_command),
        ("evaluate", "test MSE, FVE, L0, dead fraction (and probe accuracy) of a saved model "
                     "on a dataset's test split", add_evaluate_arguments, evaluate_command),
        ("encode", "encode a dataset to sparse codes (.npz with values and indices)",
         add_encode_arguments, encode_command),
        ("harvest", "store a transformer's activations at one layer over text (the hf extra)",
         add_harvest_arguments, harvest_command),
        ("sweep", "train one run per k and compare them (and PCA) in one report",
         add_sweep_arguments, sweep_command),
        ("export", "write a saved model in SAELens's or sparsify's format",
         add_export_arguments, export_command),
        ("features", "a page of each latent's top-activating contexts in an activation store "
                     "(HTML and JSON)", add_features_arguments, features_command),
    ]
    for name, help_text, add_arguments, command in specs:
        sub = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        add_arguments(sub)
        add_debug_flag(sub, default=argparse.SUPPRESS)  # ksae train --debug as ksae --debug train
        sub.set_defaults(run=command, parser=sub)
    return parser


def _run(args: argparse.Namespace, command: Command, parser: argparse.ArgumentParser) -> int:
    """Run ``command``; what a user can cause is one line on stderr (``--debug``: the
    traceback), exit 2 for a refusal and 1 for a failure; Ctrl-C exits 130."""
    try:
        return command(args, parser)
    except (UsageError, CommandError, *RUN_ERRORS) as exc:
        return report(exc, parser, getattr(args, "debug", False))
    except Interrupted as exc:
        print(exc.message, file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """``ksae COMMAND ...``; returns the exit status."""
    args = build_parser().parse_args(argv)
    return _run(args, args.run, args.parser)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``ksae-train ...``, the same as ``ksae train ...``."""
    parser = Parser(prog="ksae-train", description="Train a k-sparse autoencoder (the same as ksae "
                    "train); with no arguments, the default experiment on synthetic data, offline.")
    add_train_arguments(parser)
    add_debug_flag(parser)
    return _run(parser.parse_args(argv), train_command, parser)
