"""``ksae encode``: a dataset's sparse codes, written to an ``.npz`` file."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..serialization import atomic_write_bytes
from .data import ExperimentData
from .errors import UsageError, output_directory, usage_errors
from .saved import add_model_and_data_arguments, load_model_and_data

SPLITS = ("train", "test", "all")


def add_encode_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``ksae encode``."""
    parser.add_argument("--out", type=Path, required=True,
                        help="the .npz file to write: values (n, k), indices (n, k) and, for "
                             "labelled data, labels (n,)")
    parser.add_argument("--split", choices=SPLITS, default="all",
                        help="rows to encode: the training rows, the test rows, or all (training "
                             "rows first; for an array file held out by test_fraction, the file "
                             "in order) (default: all)")
    parser.add_argument("--chunk-rows", type=int, default=4096, metavar="N",
                        help="rows encoded at a time (default: 4096)")
    add_model_and_data_arguments(parser)


def _chunks(data: ExperimentData, split: str, chunk_rows: int) -> Iterator[np.ndarray]:
    if split in ("train", "all"):
        yield from data.train_chunks(chunk_rows)
    if split in ("test", "all"):
        for start in range(0, len(data.test), chunk_rows):
            yield data.test[start:start + chunk_rows]


def _labels(data: ExperimentData, split: str) -> np.ndarray | None:
    if not data.labelled:
        return None
    parts = {"train": [data.train_labels], "test": [data.test_labels],
             "all": [data.train_labels, data.test_labels]}[split]
    return np.concatenate(parts)


def save_npz_atomically(path: Path, arrays: dict[str, Any]) -> None:
    """``np.savez`` of ``arrays`` to ``path``, written whole or not at all
    (``atomic_write_bytes``: temporary file, fsync, rename)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def encode_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Encode the chosen split chunk by chunk and write values, indices (and labels)."""
    if args.out.suffix.lower() != ".npz":
        raise UsageError(f"--out: expected a file ending in .npz, got {str(args.out)!r}")
    if args.chunk_rows < 1:
        raise UsageError(f"--chunk-rows: expected an integer >= 1, got {args.chunk_rows}")
    with usage_errors():
        output_directory(args.out.parent, "--out")
        sae, data, _ = load_model_and_data(args)
    values, indices = [], []
    for chunk in _chunks(data, args.split, args.chunk_rows):
        code = sae.encode(chunk)
        values.append(code.values)
        indices.append(code.indices)
    arrays: dict[str, Any] = {"values": np.concatenate(values), "indices": np.concatenate(indices)}
    labels = _labels(data, args.split)
    if labels is not None:
        arrays["labels"] = labels
    save_npz_atomically(args.out, arrays)
    n, k = arrays["values"].shape
    print(f"wrote {args.out}: {', '.join(arrays)} for {n} rows ({args.split}), {k} latents each")
    return 0
