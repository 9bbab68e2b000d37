"""Documents of text for ``ksae harvest``: a file, a directory of files, or a Hugging Face
``datasets`` name.

- a ``.txt`` file: one document per paragraph (lines separated by a blank line, the lines of
  a paragraph joined by spaces), or per line with ``split="lines"``, or the whole file with
  ``split="file"``;
- a ``.jsonl`` file: one document per line, the string under ``text_field``;
- a directory: its ``.txt`` and ``.jsonl`` files (searched recursively) in sorted order;
- anything else that is not a path: a Hugging Face dataset, streamed (the ``datasets``
  package is needed; it is not a dependency of ksae).

Empty documents are skipped, so document ids (their order in the stream) are the same on
every read of the same text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from .config import check_choice

TEXT_SUFFIXES = (".txt", ".jsonl")
SPLITS = ("paragraphs", "lines", "file")


def iter_documents(source: str | os.PathLike, *, text_field: str = "text",
                   split: str = "paragraphs", dataset_split: str = "train") -> Iterator[str]:
    """The non-empty documents of ``source`` (see the module), in a fixed order."""
    check_choice("split", split, SPLITS)
    path = Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"texts: the directory {str(path)!r} holds no .txt or .jsonl file")
    else:
        yield from _dataset_documents(str(source), text_field, dataset_split)
        return
    for file in files:
        yield from (doc for doc in _file_documents(file, text_field, split) if doc.strip())


def _file_documents(path: Path, text_field: str, split: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field)
    elif path.suffix == ".txt":
        with path.open(encoding="utf-8", errors="replace") as f:
            yield from (_paragraphs(f) if split == "paragraphs" else
                        (line.strip() for line in f) if split == "lines" else [f.read()])
    else:
        raise ValueError(f"texts: {str(path)!r} is neither a .txt nor a .jsonl file")


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Blank-line-separated paragraphs, each one line of text."""
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line.strip())
        elif paragraph:
            yield " ".join(paragraph)
            paragraph = []
    if paragraph:
        yield " ".join(paragraph)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"texts: {path} line {number} is not JSON ({exc.msg})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"texts: {path} line {number} has no string field "
                                 f"{text_field!r} (set text_field / --text-field)")
            yield text


def _dataset_documents(name: str, text_field: str, dataset_split: str) -> Iterator[str]:
    try:
        import datasets  # optional: only for hub datasets
    except ImportError:
        raise FileNotFoundError(f"texts: {name!r} is not a file or directory (and the 'datasets' "
                                "package, needed to read it as a Hugging Face dataset, is not "
                                "installed)") from None
    for record in datasets.load_dataset(name, split=dataset_split, streaming=True):
        text = record.get(text_field)
        if not isinstance(text, str):
            raise ValueError(f"texts: the dataset {name!r} has no string field {text_field!r}")
        if text.strip():
            yield text
