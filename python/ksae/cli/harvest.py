"""``ksae harvest``: a transformer's activations at one layer into an activation store."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..activation_store import STORED_DTYPES
from ..texts import SPLITS
from .errors import usage_errors


def add_harvest_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``ksae harvest``."""
    parser.add_argument("model", metavar="MODEL",
                        help="a transformers model: a local directory, or a hub name where a "
                             "network or the cache has it")
    parser.add_argument("texts", metavar="TEXTS",
                        help="a .txt file (a document per paragraph), a .jsonl file (a document "
                             "per line), a directory of them, or a Hugging Face dataset name")
    parser.add_argument("--out", type=Path, required=True, metavar="STORE",
                        help="the store directory to write; an interrupted harvest into it resumes")
    parser.add_argument("--layer", required=True,
                        help="a hidden_states index (3: the residual stream entering block 3) "
                             "or a module path (encoder.layer.3.output, transformer.h.3.mlp)")
    parser.add_argument("--context-length", type=int, default=128, metavar="N",
                        help="tokens per context, special tokens included (default: 128)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N",
                        help="contexts per forward (default: 32)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="stop after storing N rows (default: all the text)")
    parser.add_argument("--dtype", choices=STORED_DTYPES, default="float32",
                        help="stored row type (bfloat16 is kept as uint16; default: float32)")
    parser.add_argument("--model-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the model's compute type (default: float32)")
    parser.add_argument("--keep-special-tokens", action="store_true",
                        help="also store rows of special tokens such as [CLS] (at position -1)")
    parser.add_argument("--revision", default=None, help="the model's hub revision")
    parser.add_argument("--text-field", default="text",
                        help="the text's key in .jsonl records and datasets (default: text)")
    parser.add_argument("--split", choices=SPLITS, default="paragraphs",
                        help=".txt files: a document per paragraph, per line, or per file "
                             "(default: paragraphs)")
    parser.add_argument("--shard-rows", type=int, default=65536, metavar="N",
                        help="rows per shard file (default: 65536)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads (default: torch's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def harvest_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Harvest, resuming an interrupted store; print what was written."""
    from ..harvest import harvest

    with usage_errors(out="--out", context_length="--context-length", batch_size="--batch-size",
                      max_tokens="--max-tokens", shard_rows="--shard-rows", n_threads="--threads",
                      text_field="--text-field", layer="--layer", dtype="--dtype",
                      model="MODEL", texts="TEXTS"):
        store = harvest(args.model, args.texts, args.out, layer=args.layer, revision=args.revision,
                        context_length=args.context_length, batch_size=args.batch_size,
                        max_tokens=args.max_tokens, dtype=args.dtype,
                        keep_special_tokens=args.keep_special_tokens, text_field=args.text_field,
                        split=args.split, torch_dtype=args.model_dtype, shard_rows=args.shard_rows,
                        n_threads=args.threads, progress=not args.quiet)
    print(f"wrote {args.out}: {len(store)} rows of width {store.shape[1]} in "
          f"{len(store.manifest['shards'])} shards")
    return 0
