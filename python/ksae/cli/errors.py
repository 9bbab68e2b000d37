"""How the ``ksae`` commands report what a user got wrong: one line on stderr,
``ksae COMMAND: error: ...``, naming the flag, file or row, and no traceback (``--debug``
shows it).

Exit status 2: the command was refused before it started its work (an unknown or misspelled
flag, a bad value, an input file that is missing, damaged or holds NaN rows, an output path
that cannot be a directory); nothing was written. Exit status 1: the command failed while
working (a download, a full disk, training that diverged). Ctrl-C keeps its own status, 130.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

USAGE = 2
FAILURE = 1

USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError)
"""What a command's checks of its arguments and inputs raise: refused, exit 2."""
RUN_ERRORS = (ValueError, TypeError, OSError, ImportError, MemoryError, ArithmeticError)
"""What a command raises while working for a reason a user can cause: exit 1, one line."""

API_WORDS = (
    # ksae's Python API names its arguments; the command line names its flags.
    (re.compile(r"\bdata_dir=? (a directory)"), r"--path \1"),
    (re.compile(r"\bdata_dir="), "--path"),
    (re.compile(r"\bdownload=True\b"), "--download"),
    (re.compile(r"\bcache_dir=(?!\w)"), "--cache-dir"),
    (re.compile(r"pass overwrite=True, or --force on the command line,"), "pass --force"),
    # NumPy's advice to load a file "unsafely" with allow_pickle is never passed on.
    (re.compile(r" \((?:[^()]|\([^()]*\))*allow_pickle(?:[^()]|\([^()]*\))*\)"),
     " (it holds no .npy array of numbers; ksae never loads pickled objects)"),
)


class UsageError(Exception):
    """The command line, or an input it names, is wrong: the command stops before it starts
    (exit 2). The message is already in the command line's terms."""


class CommandError(Exception):
    """The command failed while working (exit 1); the message is in the command line's terms."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (and a hint to ``--help``), with no
    abbreviated flags (``--epoch`` is not ``--epochs``) and a "did you mean" for a misspelled
    one. Sub-parsers (``add_subparsers``) are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` and a hint to ``--help``; exit 2."""
        self.exit(USAGE, f"{self.prog}: error: {message}\nrun '{self.prog} --help' for the options\n")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """As argparse's, but an unknown flag is reported by the (sub-)command that met it,
        with the closest flag it has."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = getattr(parsed, "parser", self)
            owner.error(unrecognized(owner, extras))
        return parsed


def unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """``unrecognized arguments: --n-latnets 5; did you mean --n-latents?``"""
    flags = [flag for action in parser._actions for flag in action.option_strings]
    message = f"unrecognized argument{'s' if len(extras) > 1 else ''}: {' '.join(extras)}"
    for extra in extras:
        if extra.startswith("--"):
            close = difflib.get_close_matches(extra.split("=", 1)[0], flags, n=1)
            if close:
                return f"{message}; did you mean {close[0]}?"
    return message


def add_debug_flag(parser: argparse.ArgumentParser, *, default: Any = False) -> None:
    """``--debug``: show the traceback of an error instead of its one line."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, show its Python traceback (for a bug report) "
                             "instead of one line")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line, in the command line's terms."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{os.fspath(exc.filename)!r}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, MemoryError):
            text = f"out of memory ({text})"
    for pattern, replacement in API_WORDS:
        text = pattern.sub(replacement, text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    joined = lines[0] if lines else ""
    for line in lines[1:]:
        joined += (" " if joined.endswith(":") else "; ") + line
    return joined


def renamed(message: str, names: dict[str, str]) -> str:
    """``message`` with its leading argument name (``X: ...``) replaced as ``names`` says."""
    name, sep, rest = message.partition(": ")
    return f"{names[name]}: {rest}" if sep and name in names else message


@contextmanager
def renaming(**names: str) -> Iterator[None]:
    """Re-raise a ValueError, TypeError or FileNotFoundError whose message leads with an API
    argument in ``names`` as the same error leading with the command line's name for it
    (``path="--test-path"``)."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as exc:
        message = renamed(str(exc), names)
        if message == str(exc):
            raise
        raise type(exc)(message) from exc


@contextmanager
def usage_errors(**names: str) -> Iterator[None]:
    """Turn what a command's checks raise into a UsageError (exit 2); ``names`` renames the
    API's argument that leads a message (``checkpoint="--resume"``)."""
    try:
        yield
    except USAGE_ERRORS as exc:
        raise UsageError(renamed(one_line(exc), names)) from exc


@contextmanager
def run_errors(**names: str) -> Iterator[None]:
    """Turn what a command raises while working into a CommandError (exit 1) whose leading
    argument name is renamed as ``names`` says (``X="--path"``)."""
    try:
        yield
    except RUN_ERRORS as exc:
        raise CommandError(renamed(one_line(exc), names)) from exc


def report(exc: BaseException, parser: argparse.ArgumentParser, debug: bool) -> int:
    """Print the one line of ``exc`` (re-raise it with ``debug``); the exit status."""
    if debug:
        raise exc
    if isinstance(exc, UsageError):  # exits as argparse's own usage errors do
        parser.exit(USAGE, f"{parser.prog}: error: {exc}\n")
    message = str(exc) if isinstance(exc, CommandError) else one_line(exc)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return FAILURE


def output_directory(path: Path, flag: str) -> Path:
    """``path``, created (with its parents) if missing; a UsageError naming ``flag`` when it
    cannot be a directory (a file, a dangling link or a loop of links, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"{flag}: {str(path)!r} {_not_a_directory(path)}") from None
    except OSError as exc:
        reason = "a loop of symbolic links" if exc.errno == errno.ELOOP else exc.strerror
        raise UsageError(f"{flag}: cannot create the directory {str(path)!r} ({reason})") from None
    return path


def _not_a_directory(path: Path) -> str:
    """Why an existing ``path`` is not a directory."""
    if not path.is_symlink():
        return "exists and is not a directory"
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is in a loop of symbolic links"
        return "is a symbolic link to nothing"
    return "is a symbolic link to something that is not a directory"
