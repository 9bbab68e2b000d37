"""``ksae.harvest``: a transformer's activations at one layer, over text, into an activation
store (the ``hf`` extra).

Each document is tokenized without special tokens and cut into contexts of at most
``context_length`` tokens (the tokenizer's special tokens, such as BERT's [CLS] and [SEP],
are added around each piece and count toward the length). Contexts go through the model
``batch_size`` at a time, padded on the right; the forward stops after the layer. A row is
stored per text token (padding never; the special tokens only with
``keep_special_tokens``, at position -1), with its token id and (document, position in the
document).

Resuming: running the same harvest on the same directory goes on after the last whole
shard. Batches are the same slices of the stream of contexts in both runs (a resumed run
recomputes the batch it resumes in), and shards are cut at the same documents, so a resumed
store is byte for byte the store an uninterrupted harvest writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import __version__
from .activation_store import VOCABULARY_FILE, ActivationStore, ActivationStoreWriter, read_manifest
from .config import check_choice, check_int
from .serialization import atomic_write_bytes
from .texts import SPLITS, iter_documents
from .transformer import LoadedModel, batch_inputs, check_layer, load_model, read_layer, vocabulary


@dataclass(frozen=True)
class HarvestSettings:
    """What decides the rows of a store; recorded in its manifest, the same on resume."""

    model: str
    texts: str
    layer: str
    revision: str | None = None
    context_length: int = 128
    batch_size: int = 32
    max_tokens: int | None = None
    keep_special_tokens: bool = False
    text_field: str = "text"
    split: str = "paragraphs"
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_int("context_length", self.context_length, 2)
        check_int("batch_size", self.batch_size, 1)
        if self.max_tokens is not None:
            check_int("max_tokens", self.max_tokens, 1)
        check_choice("split", self.split, SPLITS)
        check_choice("torch_dtype", self.torch_dtype, ("float32", "bfloat16", "float16"))


@dataclass(frozen=True)
class Context:
    """A piece of a document: its tokens (no special ones) from ``start`` on."""

    document: int
    start: int
    tokens: list[int]
    last: bool  # the document's last piece


def contexts(documents: Iterator[str], tokenizer: Any, length: int) -> Iterator[Context]:
    """Every document's pieces of at most ``length`` text tokens, in order."""
    for document, text in enumerate(documents):
        ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        for start in range(0, len(ids), length):
            yield Context(document, start, ids[start:start + length], start + length >= len(ids))


def _batches(pieces: Iterator[Context], size: int, first_document: int) -> Iterator[list[Context]]:
    """Slices of ``size`` contexts of the whole stream, from the slice holding
    ``first_document``'s first context on (the slices an uninterrupted run makes)."""
    batch: list[Context] = []
    started = first_document == 0
    for piece in pieces:
        batch.append(piece)
        started = started or piece.document >= first_document
        if len(batch) == size:
            if started:
                yield batch
            batch = []
    if batch and started:
        yield batch


class _Rows:
    """One document's rows as they come, piece by piece."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, rows: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> None:
        self.parts.append((rows, tokens, positions))

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, tokens, positions = (np.concatenate(p) for p in zip(*self.parts))
        self.parts = []
        return rows, tokens, positions


def _piece_rows(loaded: LoadedModel, piece: Context, hidden: np.ndarray,
                keep_special: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored rows of one context from its (seq, d) activations."""
    n_pre, n = len(loaded.prefix), len(piece.tokens)
    positions = np.arange(piece.start, piece.start + n, dtype=np.int64)
    if not keep_special:
        return hidden[n_pre:n_pre + n], np.asarray(piece.tokens, np.int64), positions
    tokens = loaded.prefix + piece.tokens + loaded.suffix
    marks = np.full(len(loaded.prefix), -1), positions, np.full(len(loaded.suffix), -1)
    return hidden[:len(tokens)], np.asarray(tokens, np.int64), np.concatenate(marks).astype(np.int64)


def harvest(model: str, texts: str | os.PathLike, out: str | os.PathLike, *, layer: str | int,
            revision: str | None = None, context_length: int = 128, batch_size: int = 32,
            max_tokens: int | None = None, dtype: str = "float32", keep_special_tokens: bool = False,
            text_field: str = "text", split: str = "paragraphs", torch_dtype: str = "float32",
            shard_rows: int = 65536, n_threads: int | None = None,
            progress: bool = True) -> ActivationStore:
    """Harvest ``model``'s activations at ``layer`` over ``texts`` into the store ``out``
    (see the module) and return it; an incomplete store in ``out`` from the same settings
    is resumed. ``dtype`` is the stored rows' type (float32, float16 or bfloat16)."""
    settings = HarvestSettings(model=str(model), texts=str(texts), layer=str(layer), revision=revision,
                               context_length=context_length, batch_size=batch_size,
                               max_tokens=max_tokens, keep_special_tokens=keep_special_tokens,
                               text_field=text_field, split=split, torch_dtype=torch_dtype)
    out = Path(out)
    if (out / "manifest.json").is_file() and read_manifest(out).get("complete"):
        raise ValueError(f"out: {str(out)!r} already holds a complete store")
    loaded = load_model(settings.model, revision=revision, torch_dtype=torch_dtype)
    check_layer(loaded.model, settings.layer)
    limit = _position_limit(loaded.model.config)
    if limit is not None and settings.context_length > limit:
        raise ValueError(f"context_length: {context_length} exceeds the model's {limit} positions")
    if settings.context_length <= loaded.n_special:
        raise ValueError(f"context_length: {context_length} leaves no room for text after the "
                         f"tokenizer's {loaded.n_special} special tokens")
    if n_threads is not None:
        import torch
        torch.set_num_threads(check_int("n_threads", n_threads, 1))
    writer = ActivationStoreWriter(out, _width(loaded, settings.layer), dtype=dtype,
                                   shard_rows=shard_rows, metadata=_metadata(loaded, settings))
    if not (out / VOCABULARY_FILE).is_file():
        atomic_write_bytes(out / VOCABULARY_FILE, json.dumps(vocabulary(loaded.tokenizer)).encode())
    _run(loaded, settings, writer, progress)
    return writer.close()


def _position_limit(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(config, name, None), int):
            return int(getattr(config, name))
    return None


def _width(loaded: LoadedModel, layer: str) -> int:
    """The layer's activation width, from one short forward."""
    probe = batch_inputs([loaded.prefix + loaded.tokenizer("a", add_special_tokens=False)["input_ids"]
                          + loaded.suffix], loaded.pad_id)
    return int(read_layer(loaded.model, layer, probe).shape[-1])


def _metadata(loaded: LoadedModel, settings: HarvestSettings) -> dict[str, Any]:
    import torch
    import transformers

    return {**asdict(settings), "model_class": type(loaded.model).__name__, "causal": loaded.causal,
            "special_prefix": loaded.prefix, "special_suffix": loaded.suffix,
            "versions": {"ksae": __version__, "torch": torch.__version__.split("+")[0],
                         "transformers": transformers.__version__}}


def _run(loaded: LoadedModel, settings: HarvestSettings, writer: ActivationStoreWriter,
         progress: bool) -> None:
    """Feed the writer whole documents until the texts or the token budget run out."""
    from tqdm.auto import tqdm

    first = writer.documents_done
    stored = sum(s["rows"] for s in writer.manifest["shards"])
    budget = settings.max_tokens
    length = settings.context_length - loaded.n_special
    docs = iter_documents(settings.texts, text_field=settings.text_field, split=settings.split)
    pending = _Rows()
    with tqdm(total=budget, initial=stored, unit="tok", disable=not progress,
              desc="harvest") as bar:
        for batch in _batches(contexts(docs, loaded.tokenizer, length), settings.batch_size, first):
            sequences = [loaded.prefix + p.tokens + loaded.suffix for p in batch]
            hidden = read_layer(loaded.model, settings.layer, batch_inputs(sequences, loaded.pad_id))
            for piece, h in zip(batch, hidden):
                if piece.document < first:
                    continue
                pending.add(*_piece_rows(loaded, piece, h, settings.keep_special_tokens))
                if not piece.last:
                    continue
                rows, tokens, positions = pending.take()
                if budget is not None:
                    keep = max(budget - stored, 0)
                    rows, tokens, positions = rows[:keep], tokens[:keep], positions[:keep]
                if len(rows):
                    documents = np.full(len(rows), piece.document, dtype=np.int64)
                    writer.add(rows, tokens, documents, positions)
                stored += len(rows)
                bar.update(len(rows))
                if budget is not None and stored >= budget:
                    return
