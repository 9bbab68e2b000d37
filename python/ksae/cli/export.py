"""``ksae export``: a saved model in SAELens's or sparsify's format (``ksae.exporting``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..exporting import export_model
from ..interchange import FORMATS, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS
from .errors import UsageError, usage_errors


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``ksae export``."""
    parser.add_argument("--format", choices=FORMATS, required=True,
                        help=f"saelens: cfg.json + {SAELENS_WEIGHTS} (sae_lens.SAE.load_from_disk); "
                             f"sparsify: cfg.json + {SPARSIFY_WEIGHTS} (sparsify.Sae.load_from_disk)")
    parser.add_argument("--force", action="store_true",
                        help="write into OUT_DIR even if it is not empty")
    parser.add_argument("model", type=Path, metavar="MODEL_DIR",
                        help="a saved model (the directory ksae.save wrote) or a run directory of "
                             "ksae train")
    parser.add_argument("out", type=Path, metavar="OUT_DIR", help="the directory to write")


def export_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Convert MODEL_DIR and write it to OUT_DIR; a model the format cannot hold is an error."""
    if not args.model.is_dir():
        raise UsageError(f"MODEL_DIR: {str(args.model)!r} is not a directory")
    with usage_errors(out_dir="OUT_DIR", model_dir="MODEL_DIR"):
        out = export_model(args.model, args.out, args.format, overwrite=args.force)
    print(f"wrote {out}: a {args.format} model ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0
