"""Feature inspection: what makes each latent fire, read from an activation store's tokens.

``feature_report`` streams a store view once, a batch of rows at a time, never holding more
than one batch's codes, and keeps per latent:

- its firing count (rows where its code value is non-zero, ``ksae.sparsity.active_mask``);
- its ``top`` largest activations as (value, row), merged batch by batch with one vectorised
  sort: a batch's active entries that beat their latent's current ``top``-th value are
  sorted with the kept ones by (latent, value descending, row ascending) and the first
  ``top`` of each latent are kept, so the result is exactly the ``top`` largest (the
  earlier row first on ties) whatever the batch size;
- a uniform random sample of ``sample_size`` of its activations, without replacement: each
  active entry draws a uniform random key and the ``sample_size`` smallest keys are kept per
  latent (bottom-k sampling, a reservoir merged by the same sort). Sorted by value, the
  sample gives, for each level q of ``quantiles``, an example whose activation is at about
  the q-quantile of the latent's activations: what a typical firing looks like, beside the
  top ones.

Memory is O(batch_size * k + n_latents * (top + sample_size)) beyond the store's own window
of one shard. The contexts (``context`` tokens either side, from the same document only)
are read afterwards from the store's token ids, one shard at a time, for the kept rows only.

The page is one self-contained HTML file (inline CSS and JavaScript, no external resource):
the report's data is embedded as JSON, token text escaped with ``html.escape``, and the
latents are rendered by page (50 at a time) as they are asked for, so the page opens fast
with thousands of latents; a search box filters by latent id ("42", "3-10", "1,5,9") and
``#42`` in the address jumps to latent 42. The JSON file beside it holds the same data with
the tokens' raw text.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .activation_store import VOCABULARY_FILE
from .config import check_int
from .field_metrics import fired_latents, row_batches
from .serialization import atomic_write_bytes
from .sparsity import active_mask

FORMAT, FORMAT_VERSION = "ksae-features", 1
DEFAULT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


class KeptBest:
    """Per slot, the ``size`` entries of largest key offered (ties: lowest row first), as
    (key, row, value) arrays ``keys``, ``rows``, ``values`` of shape (n_slots, size), read
    after ``flush``; empty places hold key -inf, row -1.

    ``offer`` drops the entries that cannot be kept (key not above their slot's ``size``-th
    key at the last merge: the kept ones are as large and from earlier rows) and queues the
    rest; a merge (one sort of the kept and queued entries by slot, key descending, row)
    runs when as many are queued as are kept, so each costs O(n_slots * size) amortised over
    at least as many entries, and the result does not depend on when merges happen."""

    def __init__(self, n_slots: int, size: int) -> None:
        self.keys = np.full((n_slots, size), -np.inf)
        self.rows = np.full((n_slots, size), -1, dtype=np.int64)
        self.values = np.zeros((n_slots, size))
        self._queued: list[tuple[np.ndarray, ...]] = []
        self._n_queued = 0

    def offer(self, slots: np.ndarray, keys: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
        """Offer entries: one per element of the four 1-D arrays."""
        beat = keys > self.keys[slots, -1]
        self._queued.append((slots[beat], keys[beat], rows[beat], values[beat]))
        self._n_queued += int(beat.sum())
        if self._n_queued >= self.keys.size:
            self.flush()

    def flush(self) -> None:
        """Merge the queued entries into ``keys``, ``rows``, ``values``."""
        if not self._n_queued:
            self._queued = []
            return
        n_slots, size = self.keys.shape
        slots, keys, rows, values = (np.concatenate(parts) for parts in zip(
            (np.repeat(np.arange(n_slots), size), self.keys.ravel(), self.rows.ravel(), self.values.ravel()),
            *self._queued))
        self._queued, self._n_queued = [], 0
        order = np.lexsort((rows, -keys, slots))
        starts = np.searchsorted(slots[order], np.arange(n_slots))
        keep = order[(starts[:, None] + np.arange(size)).ravel()]  # the first ``size`` of each slot
        self.keys, self.rows, self.values = (a[keep].reshape(n_slots, size) for a in (keys, rows, values))


def _check_latents(latents: Sequence[int] | None, n_latents: int) -> np.ndarray:
    if latents is None:
        return np.arange(n_latents)
    chosen = np.unique(np.asarray(list(latents)))
    if chosen.size == 0 or chosen.dtype.kind not in "iu":
        raise ValueError(f"latents: expected a non-empty list of latent ids, got {latents!r}")
    if chosen[0] < 0 or chosen[-1] >= n_latents:
        raise ValueError(f"latents: expected ids in [0, {n_latents}), got {chosen[0]}..{chosen[-1]}")
    return chosen.astype(np.int64)


def _check_quantiles(quantiles: Sequence[float]) -> list[float]:
    levels = [float(q) for q in quantiles]
    if not all(0 <= q <= 1 for q in levels):
        raise ValueError(f"quantiles: expected levels in [0, 1], got {list(quantiles)!r}")
    return levels


def _scan(sae: Any, store: Any, chosen: np.ndarray, top: int, sample_size: int,
          batch_size: int, seed: int) -> tuple[np.ndarray, int, KeptBest, KeptBest]:
    """One pass: (firing counts of every latent, rows, top activations, random samples)."""
    cfg = sae.config
    slot_of = np.full(cfg.n_latents, -1, dtype=np.int64)
    slot_of[chosen] = np.arange(len(chosen))
    best, sample = KeptBest(len(chosen), top), KeptBest(len(chosen), sample_size)
    counts = np.zeros(cfg.n_latents, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n = 0
    for X in row_batches(store, batch_size):
        values, indices = sae.encode(X)
        counts += fired_latents(values, indices, cfg)
        slots = slot_of[indices]
        row, column = np.nonzero(active_mask(values, cfg) & (slots >= 0))
        slots, activations, rows = slots[row, column], values[row, column].astype(np.float64), row + n
        best.offer(slots, activations, rows, activations)
        sample.offer(slots, -rng.random(len(slots)), rows, activations)
        n += len(X)
    best.flush()
    sample.flush()
    return counts, n, best, sample


def _contexts(store: Any, rows: np.ndarray, context: int) -> dict[int, tuple[int, int, int, list[int]]]:
    """For each row of the view (sorted, unique): (document, position, index of the row in
    its tokens, the token ids of up to ``context`` rows either side in the same document)."""
    starts = store.shard_offsets
    shard_of = np.searchsorted(starts, rows, side="right") - 1
    offsets = np.arange(-context, context + 1)
    found: dict[int, tuple[int, int, int, list[int]]] = {}
    for index in np.unique(shard_of):
        tokens, positions = store.tokens_and_positions(int(index))
        local = rows[shard_of == index] - starts[index]
        window = local[:, None] + offsets
        inside = (window >= 0) & (window < len(tokens))
        clipped = np.clip(window, 0, len(tokens) - 1)
        documents = positions[:, 0]
        same = inside & (documents[clipped] == documents[local][:, None])
        first, length = same.argmax(axis=1), same.sum(axis=1)  # a document's rows are contiguous
        ids = tokens[clipped].tolist()
        for i, (row, a, b) in enumerate(zip((local + starts[index]).tolist(), first.tolist(),
                                            (first + length).tolist())):
            found[row] = (int(documents[local[i]]), int(positions[local[i], 1]), context - a, ids[i][a:b])
    return found


def _example(value: float, row: int, contexts: dict[int, tuple[int, int, int, list[int]]]) -> dict[str, Any]:
    document, position, at, tokens = contexts[row]
    return {"value": value, "row": row, "document": document, "position": position, "at": at,
            "tokens": tokens}


def read_vocabulary(path: Path) -> list[str] | None:
    """The store's ``vocabulary.json`` (entry i: the text of token id i), or None if absent."""
    where = path / VOCABULARY_FILE
    if not where.is_file():
        return None
    try:
        vocabulary = json.loads(where.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(vocabulary, list) or not all(isinstance(t, str) for t in vocabulary):
        raise ValueError(f"{where}: expected a JSON list of strings (entry i: the text of token id i)")
    return vocabulary


def token_text(token: int, vocabulary: list[str] | None) -> str:
    """A token id's text: its vocabulary entry, else ``<id>``."""
    return vocabulary[token] if vocabulary is not None and 0 <= token < len(vocabulary) else f"<{token}>"


def _latent_entries(chosen: np.ndarray, counts: np.ndarray, n: int, best: KeptBest,
                    picks: list[list[tuple[float, float, int]]], contexts: dict) -> list[dict[str, Any]]:
    """Per chosen latent: its count, density, max, top examples and quantile examples."""
    entries = []
    for slot, latent in enumerate(chosen.tolist()):
        kept = best.rows[slot] >= 0
        top = [_example(v, r, contexts) for v, r in zip(best.values[slot][kept].tolist(),
                                                        best.rows[slot][kept].tolist())]
        entries.append({"latent": latent, "count": int(counts[latent]),
                        "density": float(counts[latent] / n) if n else 0.0,
                        "max": top[0]["value"] if top else None, "top": top,
                        "quantiles": [{"q": q, **_example(v, r, contexts)} for q, v, r in picks[slot]]})
    return entries


def _quantile_picks(sample: KeptBest, slot: int, levels: list[float]) -> list[tuple[float, float, int]]:
    """(level, value, row) of the sampled activation at each quantile level of the sample."""
    kept = sample.rows[slot] >= 0
    if not kept.any():
        return []
    values, rows = sample.values[slot][kept], sample.rows[slot][kept]
    order = np.lexsort((rows, values))
    picks = np.rint(np.asarray(levels) * (len(order) - 1)).astype(np.int64)
    return [(q, float(values[order[i]]), int(rows[order[i]])) for q, i in zip(levels, picks)]


def feature_report(sae: Any, store: Any, out_html: str | os.PathLike, *,
                   latents: Sequence[int] | None = None, top: int = 20, context: int = 8,
                   quantiles: Sequence[float] = DEFAULT_QUANTILES, sample_size: int = 64,
                   batch_size: int = 1024, seed: int = 0, title: str | None = None) -> dict[str, Any]:
    """Write the feature page ``out_html`` and its data beside it (``.json``), for the
    latents ``latents`` (default: all) of ``sae`` on the rows of ``store`` (an
    ``ActivationStore`` or a view of it, such as a run's test split): per latent its firing
    count and density, its ``top`` largest activations and, for each level of
    ``quantiles``, an example from a random sample of ``sample_size`` of its activations
    (drawn from ``seed``), each with ``context`` tokens either side in its document. Token
    text comes from the store's ``vocabulary.json`` (ids shown as ``<id>`` without it).
    One streaming pass of ``batch_size`` rows (see the module). Returns the JSON's data."""
    if not hasattr(store, "tokens_and_positions"):
        raise TypeError(f"store: expected a ksae.ActivationStore (or a view of one), got "
                        f"{type(store).__name__}")
    if store.shape[1] != sae.n_features_in_:
        raise ValueError(f"store: its rows have {store.shape[1]} features, the model expects "
                         f"{sae.n_features_in_}")
    out_html = Path(out_html)
    if out_html.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"out_html: expected a file ending in .html, got {str(out_html)!r}")
    chosen = _check_latents(latents, sae.config.n_latents)
    levels = _check_quantiles(quantiles)
    check_int("context", context, 0)
    vocabulary = read_vocabulary(Path(store.path))
    counts, n, best, sample = _scan(sae, store, chosen, check_int("top", top, 1),
                                    check_int("sample_size", sample_size, 1),
                                    check_int("batch_size", batch_size, 1), seed)
    picks = [_quantile_picks(sample, slot, levels) for slot in range(len(chosen))]
    wanted = np.unique(np.concatenate([best.rows.ravel(), [r for p in picks for _, _, r in p]]).astype(np.int64))
    contexts = _contexts(store, wanted[wanted >= 0], context)
    entries = _latent_entries(chosen, counts, n, best, picks, contexts)
    used = sorted({t for c in contexts.values() for t in c[3]})
    cfg = sae.config
    data = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "title": title or f"Features of {cfg.n_latents} latents on {store.path}",
            "model": {"n_latents": cfg.n_latents, "k": cfg.k, "d_in": int(sae.n_features_in_),
                      "sparsity": cfg.sparsity},
            "store": str(store.path), "metadata": store.metadata, "n_rows": n, "top": top,
            "context": context, "quantiles": levels, "sample_size": sample_size,
            "tokens": {str(t): token_text(t, vocabulary) for t in used}, "latents": entries}
    out_html.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_html.with_suffix(".json"), json.dumps(data, separators=(",", ":")).encode())
    atomic_write_bytes(out_html, render_page(data).encode("utf-8"))
    return data


def _display(text: str) -> str:
    """Token text for the page: escaped (``html.escape``), line breaks and tabs made visible."""
    return html.escape(text).replace("\n", "\u21b5").replace("\r", "").replace("\t", "\u21e5")


def render_page(data: dict[str, Any]) -> str:
    """The self-contained HTML page of a report's data (see the module)."""
    shown = {**data, "tokens": {t: _display(text) for t, text in data["tokens"].items()},
             "title": html.escape(data["title"]), "store": html.escape(data["store"]),
             "metadata": {html.escape(str(k)): html.escape(str(v)) for k, v in data["metadata"].items()
                          if isinstance(v, (str, int, float))}}
    payload = (json.dumps(shown, separators=(",", ":"), ensure_ascii=False)
               .replace("<", "\\u003c"))  # no "</script>" nor "<!--" can end the JSON early
    parts = {"TITLE": shown["title"], "STYLE": _STYLE, "SCRIPT": _SCRIPT, "DATA": payload}
    return re.sub(r"__(TITLE|STYLE|SCRIPT|DATA)__", lambda m: parts[m.group(1)], _PAGE)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: .6em 1.2em; z-index: 1; }
h1 { font-size: 1.2em; margin: 0 0 .3em; }
.about { color: #555; font-size: .9em; }
.controls { margin-top: .5em; display: flex; gap: .8em; align-items: center; flex-wrap: wrap; }
input[type=search] { width: 22em; padding: .3em; }
main { padding: .5em 1.2em; }
.latent { background: #fff; border: 1px solid #ddd; border-radius: 6px; margin: .8em 0; padding: .5em .9em; }
.latent h2 { font-size: 1em; margin: .2em 0 .4em; }
.latent h2 .stats { font-weight: normal; color: #555; }
.latent h3 { font-size: .85em; margin: .5em 0 .2em; color: #444; }
table { border-collapse: collapse; width: 100%; }
td { padding: 1px .4em; vertical-align: top; font-size: .9em; }
td.v { width: 5.5em; text-align: right; font-variant-numeric: tabular-nums; color: #333; }
td.q { width: 3.5em; color: #777; }
.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.ctx span { border-radius: 2px; }
.ctx mark { background: #ffb347; font-weight: bold; padding: 0 1px; }
.dead { color: #a00; }
.pager button { margin: 0 .2em; }
""".strip()

_SCRIPT = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const T = D.tokens, PAGE = 50;
let order = D.latents.map((_, i) => i), page = 0;
const $ = id => document.getElementById(id);
function tok(id) { const t = T[id]; return t === undefined ? '&lt;' + id + '&gt;' : t; }
function ctx(e) {
  return e.tokens.map((id, i) => i === e.at ? '<mark title="token ' + id + '">' + tok(id) + '</mark>'
                                           : '<span title="token ' + id + '">' + tok(id) + '</span>').join('');
}
function fmt(x) { return x === null ? '-' : (Math.abs(x) >= 100 ? x.toFixed(1) : x.toPrecision(4)); }
function rows(list, q) {
  return '<table>' + list.map(e => '<tr>' + (q ? '<td class="q">q' + e.q + '</td>' : '') +
    '<td class="v">' + fmt(e.value) + '</td><td class="ctx">' + ctx(e) + '</td></tr>').join('') + '</table>';
}
function card(L) {
  const pct = (100 * L.density).toPrecision(3) + '%';
  let s = '<section class="latent" id="latent-' + L.latent + '"><h2>Latent ' + L.latent +
    ' <span class="stats">density ' + pct + ' (' + L.count + ' of ' + D.n_rows + ' rows), max ' + fmt(L.max) + '</span></h2>';
  if (!L.count) return s + '<p class="dead">never active on these rows</p></section>';
  s += '<h3>Top ' + L.top.length + ' activations</h3>' + rows(L.top, false);
  if (L.quantiles.length) s += '<h3>Quantile sample (of ' + Math.min(L.count, D.sample_size) + ' random activations)</h3>' + rows(L.quantiles, true);
  return s + '</section>';
}
function parse(text) {
  text = text.trim();
  if (!text) return null;
  const want = new Set();
  for (const part of text.split(/[\s,]+/)) {
    const m = part.match(/^(\d+)(?:-(\d+))?$/);
    if (!m) return undefined;
    const a = +m[1], b = m[2] === undefined ? a : +m[2];
    for (let i = a; i <= Math.min(b, a + 100000); i++) want.add(i);
  }
  return want;
}
function update() {
  const want = parse($('search').value), key = $('sort').value, live = $('live').checked;
  if (want === undefined) { $('list').innerHTML = '<p>Type latent ids: 42, 3-10 or 1,5,9.</p>'; $('count').textContent = ''; return; }
  order = D.latents.map((_, i) => i).filter(i => (!want || want.has(D.latents[i].latent)) && (!live || D.latents[i].count));
  if (key !== 'latent') order.sort((i, j) => (D.latents[j][key] || 0) - (D.latents[i][key] || 0));
  page = 0; show();
}
function show() {
  const pages = Math.max(1, Math.ceil(order.length / PAGE));
  page = Math.min(Math.max(page, 0), pages - 1);
  const part = order.slice(page * PAGE, (page + 1) * PAGE);
  $('list').innerHTML = part.length ? part.map(i => card(D.latents[i])).join('') : '<p>No latent matches.</p>';
  $('count').textContent = order.length ? (page * PAGE + 1) + '\u2013' + (page * PAGE + part.length) + ' of ' + order.length + ' latents' : '';
  $('pageno').textContent = 'page ' + (page + 1) + ' of ' + pages;
}
function fromHash() {
  const m = location.hash.match(/^#(\d+)$/);
  if (m) { $('search').value = m[1]; update(); }
}
$('about').innerHTML = D.n_rows + ' rows of ' + D.store + ' \u00b7 ' + D.model.n_latents +
  ' latents, k=' + D.model.k + ', d_in=' + D.model.d_in + ' \u00b7 ' + D.latents.length + ' latents shown, ' +
  D.latents.filter(L => !L.count).length + ' never active' +
  Object.entries(D.metadata).map(([k, v]) => ' \u00b7 ' + k + ': ' + v).join('');
$('search').addEventListener('input', update);
$('sort').addEventListener('change', update);
$('live').addEventListener('change', update);
$('prev').addEventListener('click', () => { page--; show(); scrollTo(0, 0); });
$('next').addEventListener('click', () => { page++; show(); scrollTo(0, 0); });
window.addEventListener('hashchange', fromHash);
update(); fromHash();
""".strip()

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
__STYLE__
</style>
</head>
<body>
<header>
<h1>__TITLE__</h1>
<div class="about" id="about"></div>
<div class="controls">
<input type="search" id="search" placeholder="latent ids: 42, 3-10, 1,5,9" aria-label="latent ids">
<label>sort by <select id="sort"><option value="latent">latent id</option>
<option value="density">firing density</option><option value="max">max activation</option></select></label>
<label><input type="checkbox" id="live"> hide latents never active</label>
<span class="pager"><button id="prev">&larr;</button><span id="pageno"></span><button id="next">&rarr;</button></span>
<span id="count"></span>
</div>
</header>
<main id="list"></main>
<script type="application/json" id="data">__DATA__</script>
<script>
__SCRIPT__
</script>
</body>
</html>
"""
