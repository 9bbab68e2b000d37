"""The activation store: a model's activations on disk, one row per token, in shards.

A store is a directory::

    manifest.json                  what the rows are (model, revision, layer, d, dtype, the
                                   harvest settings) and, per shard, its rows, documents and
                                   the SHA-256 of each of its files
    shard-00000.npy                (rows, d) activations: float32, float16, or bfloat16 kept
                                   as uint16 (the manifest says which)
    shard-00000.tokens.npy         (rows,) int64 token ids
    shard-00000.positions.npy      (rows, 2) int64 (document, position in the document)
    vocabulary.json                optional (ksae harvest writes it): each token id's text,
                                   for the feature page

``ActivationStoreWriter`` writes it shard by shard: each shard's files go to temporary names
and are renamed into place before the manifest (itself replaced atomically) names them, so
an interrupted harvest leaves a store of whole shards, and reopening the writer resumes after
them. ``ActivationStore`` reads it as a batch source (``ksae.BatchSource``): ``fit`` trains
from it streaming, shuffled across shards a window at a time; ``split_documents`` holds out
whole documents for testing. A shard whose files are missing, truncated or changed is named
in a ValueError when it is first read.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import _core
from .batches import INIT_SAMPLE_ROWS
from .config import check_choice, check_int
from .serialization import atomic_write_bytes

FORMAT, FORMAT_VERSION, MANIFEST = "ksae-activations", 1, "manifest.json"
VOCABULARY_FILE = "vocabulary.json"
"""Optional, beside the manifest: a JSON list, entry i the display text of token id i."""
STORED_DTYPES = ("float32", "float16", "bfloat16")
PARTS = ("rows", "tokens", "positions")


def shard_files(index: int) -> dict[str, str]:
    """The file names of shard ``index``, per part."""
    stem = f"shard-{index:05d}"
    return {"rows": f"{stem}.npy", "tokens": f"{stem}.tokens.npy", "positions": f"{stem}.positions.npy"}


def to_stored(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Activations as stored: bfloat16 as the upper 16 bits of float32 (rounded to nearest
    even), kept as uint16; float16 and float32 as themselves."""
    if dtype != "bfloat16":
        return np.ascontiguousarray(rows, dtype=dtype)
    bits = np.ascontiguousarray(rows, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_stored(stored: np.ndarray, dtype: str, out_dtype: np.dtype | str) -> np.ndarray:
    """Stored activations as a C-contiguous array of ``out_dtype``."""
    if dtype == "bfloat16":
        stored = (np.asarray(stored, dtype=np.uint32) << np.uint32(16)).view(np.float32)
    return np.ascontiguousarray(stored, dtype=out_dtype)


def _file_sha256(path: Path, block: int = 1 << 20) -> str:
    """The SHA-256 of a file, read a block at a time (a shard is never wholly in memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ActivationStoreWriter:
    """Writes a store: ``add`` rows (whole documents per call, document ids increasing), a
    shard is written whenever ``shard_rows`` rows are waiting, ``close`` writes the rest and
    marks the store complete. Opening a directory that holds an incomplete store of the same
    ``d``, ``dtype`` and ``metadata`` resumes it: ``documents_done`` says where to go on.

    ``metadata`` (model, revision, layer, harvest settings: anything JSON) goes to the
    manifest; a resumed store must be given the same."""

    def __init__(self, path: str | os.PathLike, d: int, *, dtype: str = "float32",
                 shard_rows: int = 65536, metadata: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.dtype = check_choice("dtype", dtype, STORED_DTYPES)
        self.shard_rows = check_int("shard_rows", shard_rows, 1)
        self.manifest: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "d": check_int("d", d, 1),
            "dtype": self.dtype, "metadata": metadata or {}, "shards": [], "complete": False}
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / MANIFEST).exists():
            self._resume()
        self._last_document = self.documents_done - 1
        self._waiting: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._waiting_rows = 0

    def _resume(self) -> None:
        found = read_manifest(self.path)
        for key in ("d", "dtype", "metadata"):
            if found[key] != self.manifest[key]:
                raise ValueError(f"path: {self.path} holds a store with {key}={found[key]!r}, "
                                 f"not {self.manifest[key]!r}; write to another directory")
        if found["complete"]:
            raise ValueError(f"path: the store in {self.path} is complete; write to another directory")
        self.manifest = found

    @property
    def documents_done(self) -> int:
        """Documents whose rows are all in written shards: a resumed harvest starts here."""
        shards = self.manifest["shards"]
        return shards[-1]["documents"][1] + 1 if shards else 0

    def add(self, rows: np.ndarray, tokens: np.ndarray, documents: np.ndarray,
            positions: np.ndarray) -> None:
        """Queue rows (n, d) with their token ids and (document, position), n each; whole
        documents, in increasing order of document id, continuing from ``documents_done``."""
        rows = np.asarray(rows)
        n = rows.shape[0]
        if rows.ndim != 2 or rows.shape[1] != self.manifest["d"]:
            raise ValueError(f"rows: expected shape (n, {self.manifest['d']}), got {rows.shape}")
        keys = np.stack([np.asarray(documents, np.int64), np.asarray(positions, np.int64)], axis=1)
        tokens = np.asarray(tokens, np.int64)
        if tokens.shape != (n,) or keys.shape != (n, 2):
            raise ValueError(f"tokens, documents, positions: expected {n} of each")
        if n and (keys[0, 0] <= self._last_document or np.any(np.diff(keys[:, 0]) < 0)):
            raise ValueError(f"documents: expected whole documents in increasing order after "
                             f"document {self._last_document}, got {keys[0, 0]}..{keys[-1, 0]}")
        if n:
            self._last_document = int(keys[-1, 0])
        self._waiting.append((to_stored(rows, self.dtype), tokens, keys))
        self._waiting_rows += n
        if self._waiting_rows >= self.shard_rows:
            self._write_shard()

    def _write_shard(self) -> None:
        if not self._waiting_rows:
            return
        parts = dict(zip(PARTS, (np.concatenate(p) for p in zip(*self._waiting))))
        self._waiting, self._waiting_rows = [], 0
        names = shard_files(len(self.manifest["shards"]))
        checksums = {}
        for part, array in parts.items():
            blob = _npy_bytes(array)
            atomic_write_bytes(self.path / names[part], blob)
            checksums[part] = hashlib.sha256(blob).hexdigest()
        documents = parts["positions"][:, 0]
        self.manifest["shards"].append({"files": names, "rows": int(len(documents)),
                                        "documents": [int(documents[0]), int(documents[-1])],
                                        "sha256": checksums})
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.manifest["rows"] = sum(s["rows"] for s in self.manifest["shards"])
        atomic_write_bytes(self.path / MANIFEST, (json.dumps(self.manifest, indent=1) + "\n").encode())

    def close(self) -> "ActivationStore":
        """Write the waiting rows as the last shard, mark the store complete, open it."""
        self._write_shard()
        self.manifest["complete"] = True
        self._write_manifest()
        return ActivationStore(self.path)


def read_manifest(path: Path) -> dict[str, Any]:
    """A store's manifest, checked for its format and fields."""
    where = path / MANIFEST
    if not where.is_file():
        raise FileNotFoundError(f"path: {str(where)!r} not found; is {str(path)!r} an activation store?")
    try:
        manifest = json.loads(where.read_text())
        ok = (manifest.get("format") == FORMAT and manifest.get("format_version") == FORMAT_VERSION
              and manifest.get("dtype") in STORED_DTYPES and isinstance(manifest.get("shards"), list))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(f"{where}: not a {FORMAT} version {FORMAT_VERSION} manifest")
    return manifest


class ActivationStore:
    """A store read as a batch source of ``dtype`` rows (``fit(store)`` trains on it).

    Batches stream ``window_shards`` shards at a time (memory-mapped), in an order drawn
    from the epoch's seed, their rows shuffled within the window; at most about
    ``window_shards * shard_rows`` rows are in memory. ``split_documents`` gives views
    holding out whole documents."""

    def __init__(self, path: str | os.PathLike, *, dtype: str = "float32",
                 window_shards: int = 4) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.dtype = np.dtype(check_choice("dtype", dtype, ("float32", "float64")))
        self.window_shards = check_int("window_shards", window_shards, 1)
        self._shards = self.manifest["shards"]
        self._verified: set[tuple[int, str]] = set()
        self._hold(None)

    def _hold(self, keep: list[np.ndarray] | None) -> None:
        """Hold the rows ``keep`` (per shard, indices into it; None: all of them)."""
        self._keep = keep
        counts = [len(k) for k in keep] if keep is not None else [s["rows"] for s in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.shape = (int(self._starts[-1]), int(self.manifest["d"]))
        self._variance: float | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        """What the manifest says of the rows' source (model, layer, harvest settings)."""
        return self.manifest["metadata"]

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def shard_offsets(self) -> np.ndarray:
        """Per shard, the index (in this view's rows) of its first row; then the row count."""
        return self._starts.copy()

    def _part(self, index: int, part: str) -> np.ndarray:
        """One part of shard ``index``, memory-mapped, its checksum verified on first use."""
        shard = self._shards[index]
        where = self.path / shard["files"][part]
        key = (index, part)
        try:
            if key not in self._verified:
                if _file_sha256(where) != shard["sha256"][part]:
                    raise ValueError("its contents do not match the manifest's checksum")
                self._verified.add(key)
            array = np.load(where, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where}: shard {index} of the store is damaged or missing ({exc})") from None
        if array.shape[0] != shard["rows"]:
            raise ValueError(f"{where}: shard {index} holds {array.shape[0]} rows, its manifest "
                             f"{shard['rows']}")
        return array

    def _rows(self, index: int, keep: np.ndarray | None = None) -> np.ndarray:
        stored = self._part(index, "rows")
        if self._keep is not None:
            keep = self._keep[index] if keep is None else self._keep[index][keep]
        return from_stored(stored if keep is None else stored[keep], self.manifest["dtype"], self.dtype)

    def batches(self, batch_size: int, seed: int | None, skip: int = 0,
                n_threads: int = 0) -> Iterator[np.ndarray]:
        """One epoch's batches (see the class); the same seed gives the same batches."""
        rng = None if seed is None else np.random.default_rng(seed)
        order = np.arange(len(self._shards)) if rng is None else rng.permutation(len(self._shards))
        carry = np.empty((0, self.shape[1]), dtype=self.dtype)
        produced = 0
        for start in range(0, len(order), self.window_shards):
            window = [carry] + [self._rows(int(i)) for i in order[start:start + self.window_shards]]
            rows = np.concatenate(window)
            del window, carry  # only this window's rows stay in memory
            if rng is not None:
                rows = _core.take_rows(rows, rng.permutation(len(rows)), n_threads)
            last = start + self.window_shards >= len(order)
            full = len(rows) if last else len(rows) - len(rows) % batch_size
            for offset in range(0, full, batch_size):
                if produced >= skip:
                    yield np.ascontiguousarray(rows[offset:offset + batch_size])
                produced += 1
            carry = rows[full:].copy()  # a copy: a view would keep the whole window alive
            del rows

    def total_variance(self, n_threads: int = 0) -> float:
        """``sum((X - mean)**2)`` over the store's rows, in float64 (two passes, cached)."""
        if self._variance is None:
            sums = np.zeros(self.shape[1])
            for i in range(len(self._shards)):
                sums += _core.sums_and_squares(self._rows(i), n_threads)[0]
            mean = sums / max(self.shape[0], 1)
            self._variance = 0.0
            for i in range(len(self._shards)):
                centered = self._rows(i).astype(np.float64) - mean
                self._variance += float(np.einsum("ij,ij->", centered, centered))
        return self._variance

    def sample(self) -> np.ndarray:
        """The first rows (up to 65536): for one-off estimates such as ``b_dec_init``."""
        rows, count = [], 0
        for i in range(len(self._shards)):
            if count >= INIT_SAMPLE_ROWS:
                break
            rows.append(self._rows(i))
            count += len(rows[-1])
        return np.concatenate(rows)[:INIT_SAMPLE_ROWS]

    def _shard_of(self, row: int) -> int:
        return int(np.searchsorted(self._starts, row, side="right") - 1)

    def row(self, i: int) -> np.ndarray:
        index = self._shard_of(i)
        return self._rows(index, np.array([i - self._starts[index]]))[0]

    def tokens_and_positions(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard ``index``'s token ids and (document, position) pairs, for this view's rows."""
        tokens, positions = self._part(index, "tokens"), self._part(index, "positions")
        keep = self._keep[index] if self._keep is not None else slice(None)
        return np.asarray(tokens[keep]), np.asarray(positions[keep])

    def split_documents(self, test_fraction: float, seed: int = 0) -> tuple["ActivationStore", "ActivationStore"]:
        """(train, test) views of the store, ``test_fraction`` of its documents (drawn from
        ``seed``) held out whole in test, so no test row's context was trained on."""
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
        documents = [self.tokens_and_positions(i)[1][:, 0] for i in range(len(self._shards))]
        ids = np.unique(np.concatenate(documents))
        n_test = int(round(test_fraction * len(ids)))
        if not 0 < n_test < len(ids):
            raise ValueError(f"test_fraction: {test_fraction} of {len(ids)} documents leaves no "
                             "training or no test documents")
        test_ids = np.random.default_rng(seed).choice(ids, n_test, replace=False)
        views = []
        for held in (False, True):
            keep = [np.flatnonzero(np.isin(d, test_ids) == held) for d in documents]
            if self._keep is not None:
                keep = [k_self[k] for k_self, k in zip(self._keep, keep)]
            view = copy.copy(self)
            view._verified = set(self._verified)
            view._hold(keep)
            views.append(view)
        return views[0], views[1]
