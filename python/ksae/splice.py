"""The spliced-in metric: what an SAE's reconstruction does to the model it was harvested
from (the ``hf`` extra).

The store's held-out documents are rebuilt into the harvest's contexts from their token
ids. Each context runs three times: clean, with the layer's activations at the text tokens
replaced by the SAE's reconstruction, and with them zeroed (special tokens and padding are
left as they are). The model's own output is compared:

- a causal LM: next-token cross-entropy of each run (CE_clean, CE_sae, CE_zero), the loss
  recovered, ``(CE_zero - CE_sae) / (CE_zero - CE_clean)``, and the KL divergence of the
  spliced runs' next-token distributions from the clean one;
- an encoder: the cosine similarity of the final hidden states to the clean ones, per text
  token and of the mean-pooled embedding (all-MiniLM's sentence embedding), and the
  embedding recovered, ``(d_zero - d_sae) / d_zero`` with ``d = 1 - cosine`` of the pooled
  embeddings.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from .activation_store import ActivationStore
from .transformer import LoadedModel, batch_inputs, load_model, run_with_layer


def held_out_contexts(store: ActivationStore, max_tokens: int | None) -> Iterator[list[int]]:
    """The text tokens of the contexts the harvest made of the store's documents (this
    view's), up to about ``max_tokens`` tokens."""
    meta = store.metadata
    room = meta["context_length"] - len(meta["special_prefix"]) - len(meta["special_suffix"])
    done = 0
    for shard in range(len(store.manifest["shards"])):
        tokens, positions = store.tokens_and_positions(shard)
        text = positions[:, 1] >= 0
        tokens, positions = tokens[text], positions[text]
        for document in np.unique(positions[:, 0]):
            mine = positions[:, 0] == document
            ids = tokens[mine][np.argsort(positions[mine, 1], kind="stable")].tolist()
            for start in range(0, len(ids), room):
                if max_tokens is not None and done >= max_tokens:
                    return
                yield ids[start:start + room]
                done += len(ids[start:start + room])


def _text_mask(loaded: LoadedModel, pieces: list[list[int]], width: int) -> Any:
    import torch

    mask = torch.zeros((len(pieces), width), dtype=torch.bool)
    for i, piece in enumerate(pieces):
        mask[i, len(loaded.prefix):len(loaded.prefix) + len(piece)] = True
    return mask


def _editor(mask: Any, replace: Callable[[np.ndarray], np.ndarray] | None) -> Callable[[Any], Any]:
    """An edit of the layer's (batch, seq, d) activations at the ``mask`` positions: the
    SAE's reconstruction of them (``replace``), or zeros (None)."""
    import torch

    def edit(hidden: Any) -> Any:
        out = hidden.clone()
        rows = hidden[mask]
        new = torch.zeros_like(rows) if replace is None else torch.from_numpy(
            replace(rows.float().numpy())).to(hidden.dtype)
        out[mask] = new
        return out
    return edit


class _Totals:
    """Float64 sums of per-token (or per-context) figures over the evaluation."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, values: Any) -> None:
        values = values.double()
        self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.counts[name] = self.counts.get(name, 0) + int(values.numel())

    def mean(self, name: str) -> float:
        return self.sums[name] / max(self.counts[name], 1)


def _causal_batch(outs: dict[str, Any], inputs: dict[str, Any], totals: _Totals) -> None:
    import torch.nn.functional as F

    ids, attn = inputs["input_ids"], inputs["attention_mask"].bool()
    keep = attn[:, 1:] & attn[:, :-1]
    targets = ids[:, 1:][keep]
    logp = {run: F.log_softmax(out.logits[:, :-1][keep].double(), dim=-1) for run, out in outs.items()}
    for run, lp in logp.items():
        totals.add(f"ce_{run}", -lp.gather(1, targets[:, None])[:, 0])
        if run != "clean":
            totals.add(f"kl_{run}", (logp["clean"].exp() * (logp["clean"] - lp)).sum(-1))


def _encoder_batch(outs: dict[str, Any], inputs: dict[str, Any], mask: Any, totals: _Totals) -> None:
    import torch.nn.functional as F

    attn = inputs["attention_mask"].double()[..., None]
    final = {run: out.last_hidden_state.double() for run, out in outs.items()}
    pooled = {run: (h * attn).sum(1) / attn.sum(1) for run, h in final.items()}
    for run in ("sae", "zero"):
        totals.add(f"token_cosine_{run}", F.cosine_similarity(final[run][mask], final["clean"][mask], dim=-1))
        totals.add(f"embedding_cosine_{run}", F.cosine_similarity(pooled[run], pooled["clean"], dim=-1))


def spliced_metrics(sae: Any, store: ActivationStore, *, max_tokens: int | None = 16384,
                    batch_size: int = 16, loaded: LoadedModel | None = None) -> dict[str, float]:
    """The spliced-in figures (see the module) of ``sae`` on ``store``'s documents (pass
    the held-out view), over about ``max_tokens`` text tokens; ``loaded`` reuses a model
    already loaded (else the store's is)."""
    meta = store.metadata
    if "model" not in meta or "layer" not in meta:
        raise ValueError(f"store: {store.path} was not written by ksae harvest (its manifest "
                         "names no model and layer)")
    loaded = loaded or load_model(meta["model"], revision=meta.get("revision"),
                                  torch_dtype=meta.get("torch_dtype", "float32"))
    totals, n_tokens = _Totals(), 0
    pieces = list(held_out_contexts(store, max_tokens))
    for start in range(0, len(pieces), batch_size):
        batch = pieces[start:start + batch_size]
        inputs = batch_inputs([loaded.prefix + p + loaded.suffix for p in batch], loaded.pad_id)
        mask = _text_mask(loaded, batch, inputs["input_ids"].shape[1])
        outs = {"clean": run_with_layer(loaded.model, meta["layer"], inputs, None),
                "sae": run_with_layer(loaded.model, meta["layer"], inputs, _editor(mask, sae.reconstruct)),
                "zero": run_with_layer(loaded.model, meta["layer"], inputs, _editor(mask, None))}
        if loaded.causal:
            _causal_batch(outs, inputs, totals)
        else:
            _encoder_batch(outs, inputs, mask, totals)
        n_tokens += int(mask.sum())
    if not n_tokens:
        raise ValueError(f"store: {store.path} has no text tokens to evaluate on")
    return _summary(totals, loaded.causal, n_tokens, len(pieces))


def _summary(totals: _Totals, causal: bool, n_tokens: int, n_contexts: int) -> dict[str, float]:
    figures: dict[str, float] = {name: totals.mean(name) for name in totals.sums}
    if causal:
        gap = figures["ce_zero"] - figures["ce_clean"]
        figures["loss_recovered"] = (figures["ce_zero"] - figures["ce_sae"]) / gap if gap else float("nan")
    else:
        d_zero = 1 - figures["embedding_cosine_zero"]
        d_sae = 1 - figures["embedding_cosine_sae"]
        figures["embedding_recovered"] = (d_zero - d_sae) / d_zero if d_zero else float("nan")
    return {**figures, "tokens": n_tokens, "contexts": n_contexts}
