"""The feature page (``ksae.features``, ``ksae features``): streamed top activations held to
a brute-force computation on all the codes at once, contexts that stay in their document,
an escaped self-contained page whose data matches its JSON, and the command's errors."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import ksae
import numpy as np
import pytest
from ksae.activation_store import ActivationStoreWriter
from ksae.cli import main
from ksae.features import KeptBest, feature_report

D, VOCAB = 12, 40
TRICKY = ["<script>alert(1)</script>", "a & b", '"quoted"', "\n", "</script><!--"]
VOCABULARY = TRICKY + [f" word{i}" for i in range(len(TRICKY), VOCAB)]


def write_store(path: Path, n_documents: int = 50, vocabulary: list[str] | None = VOCABULARY):
    """Documents of 4..30 tokens; a row is its token's embedding (plus noise), so latents
    learn tokens. Shards of about 150 rows."""
    rng = np.random.default_rng(1)
    embedding = rng.standard_normal((VOCAB, D)).astype(np.float32)
    writer = ActivationStoreWriter(path, D, shard_rows=150, metadata={"model": "toy", "layer": 1})
    for doc in range(n_documents):
        n = int(rng.integers(4, 30))
        tokens = rng.integers(0, VOCAB, n)
        rows = embedding[tokens] + 0.1 * rng.standard_normal((n, D)).astype(np.float32)
        writer.add(rows, tokens, np.full(n, doc), np.arange(n))
    store = writer.close()
    if vocabulary is not None:
        (path / "vocabulary.json").write_text(json.dumps(vocabulary))
    return store


@pytest.fixture(scope="module")
def store_and_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("features") / "store"
    store = write_store(path)
    sae = ksae.SparseAutoencoder(n_latents=24, k=3, random_state=0, n_threads=1)
    sae.fit(store, epochs=3, batch_size=64)
    return store, sae


def all_of(view):
    """Every row of a view with its token ids and (document, position), in order."""
    rows = np.concatenate(list(view.batches(10**6, seed=None)))
    parts = [view.tokens_and_positions(i) for i in range(len(view._shards))]
    return rows, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def brute_force_top(dense: np.ndarray, latent: int, top: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, rows) of a latent's ``top`` largest non-zero activations, earlier row first on ties."""
    rows = np.flatnonzero(dense[:, latent])
    order = np.lexsort((rows, -dense[rows, latent]))[:top]
    return dense[rows[order], latent], rows[order]


def page_data(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.DOTALL)
    assert found is not None
    return json.loads(found.group(1))


@pytest.mark.parametrize("batch_size", [1, 37, 4096])
def test_top_contexts_are_the_top_activations(store_and_model, tmp_path, batch_size):
    store, sae = store_and_model
    data = feature_report(sae, store, tmp_path / "f.html", top=5, context=3, batch_size=batch_size)
    rows, tokens, positions = all_of(store)
    dense = sae.transform(rows)
    assert data["n_rows"] == len(rows) and len(data["latents"]) == sae.n_latents
    for entry in data["latents"]:
        latent = entry["latent"]
        values, top_rows = brute_force_top(dense, latent, 5)
        assert [e["row"] for e in entry["top"]] == top_rows.tolist()
        np.testing.assert_allclose([e["value"] for e in entry["top"]], values, rtol=1e-6)
        assert entry["count"] == int((dense[:, latent] != 0).sum())
        assert entry["density"] == pytest.approx(entry["count"] / len(rows))
        assert entry["max"] == (entry["top"][0]["value"] if entry["top"] else None)
        for example in entry["top"] + entry["quantiles"]:
            row = example["row"]
            assert dense[row, latent] == pytest.approx(example["value"], rel=1e-6)
            assert example["tokens"][example["at"]] == tokens[row]
            assert [example["document"], example["position"]] == positions[row].tolist()


def test_contexts_stay_in_their_document(store_and_model, tmp_path):
    store, sae = store_and_model
    data = feature_report(sae, store, tmp_path / "f.html", top=10, context=4)
    _, tokens, positions = all_of(store)
    documents = positions[:, 0]
    checked = 0
    for entry in data["latents"]:
        for example in entry["top"] + entry["quantiles"]:
            row, at = example["row"], example["at"]
            span = np.arange(row - at, row - at + len(example["tokens"]))
            want = [r for r in range(row - 4, row + 5) if 0 <= r < len(tokens) and documents[r] == documents[row]]
            assert span.tolist() == want
            assert example["tokens"] == tokens[span].tolist()
            checked += at < 4 or len(example["tokens"]) - at - 1 < 4  # cut at a document's edge
    assert checked > 0


def test_the_quantile_sample_spans_the_activations(store_and_model, tmp_path):
    store, sae = store_and_model
    rows, _, _ = all_of(store)
    data = feature_report(sae, store, tmp_path / "f.html", quantiles=(0, 0.5, 1), sample_size=len(rows))
    dense = sae.transform(rows)
    for entry in data["latents"]:
        if not entry["count"]:
            assert entry["quantiles"] == [] and entry["top"] == [] and entry["max"] is None
            continue
        active = np.sort(dense[dense[:, entry["latent"]] != 0, entry["latent"]])
        low, middle, high = (e["value"] for e in entry["quantiles"])  # the sample holds them all
        assert [e["q"] for e in entry["quantiles"]] == [0, 0.5, 1]
        assert low == pytest.approx(active[0], rel=1e-6) and high == pytest.approx(active[-1], rel=1e-6)
        assert middle == pytest.approx(active[int(np.rint(0.5 * (len(active) - 1)))], rel=1e-6)


def test_the_sample_is_reproducible_whatever_the_batch_size(store_and_model, tmp_path):
    store, sae = store_and_model
    runs = [feature_report(sae, store, tmp_path / f"{b}.html", sample_size=3, seed=5, batch_size=b)
            for b in (50, 50, 1000)]
    samples = [[e["quantiles"] for e in run["latents"]] for run in runs]
    assert samples[0] == samples[1] == samples[2]
    other = feature_report(sae, store, tmp_path / "other.html", sample_size=3, seed=6)
    assert [e["quantiles"] for e in other["latents"]] != samples[0]


@pytest.mark.parametrize("slots_n, size", [(7, 4), (60, 120)])  # merging often, only at the end
def test_kept_best_merges_exactly_like_a_full_sort(slots_n, size):
    rng = np.random.default_rng(0)
    n = 5000
    slots, keys = rng.integers(0, slots_n, n), rng.integers(0, 20, n).astype(float)  # many ties
    kept = KeptBest(slots_n, size)
    for start in range(0, n, 333):
        part = slice(start, start + 333)
        kept.offer(slots[part], keys[part], np.arange(n)[part], keys[part] * 2)
    kept.flush()
    for slot in range(slots_n):
        rows = np.flatnonzero(slots == slot)
        want = rows[np.lexsort((rows, -keys[rows]))[:size]]
        filled = kept.rows[slot] >= 0
        assert kept.rows[slot][filled].tolist() == want.tolist()
        assert kept.values[slot][filled].tolist() == (keys[want] * 2).tolist()


def test_the_page_is_escaped_self_contained_and_matches_the_json(store_and_model, tmp_path):
    store, sae = store_and_model
    out = tmp_path / "page" / "features.html"
    data = feature_report(sae, store, out, title="<b>toy</b> & co")
    page = out.read_text(encoding="utf-8")
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(data))
    for raw in ("<script>alert", "<b>toy", "</script><!--"):
        assert raw not in page
    assert page.count("<script") == 2 and page.count("</script>") == 2  # the data and the code
    assert "<title>&lt;b&gt;toy&lt;/b&gt; &amp; co</title>" in page
    assert not re.search(r"(src|href)\s*=|https?://|<link|@import", page)  # nothing fetched
    shown = page_data(page)
    used = set(saved["tokens"])
    assert used & {"0", "1", "4"}  # the tricky tokens are in the page
    for token, text in saved["tokens"].items():
        assert text == VOCABULARY[int(token)]
        assert shown["tokens"][token] == html.escape(text).replace("\n", "\u21b5")
    assert shown["latents"] == saved["latents"] and shown["n_rows"] == saved["n_rows"]


def test_token_ids_without_a_vocabulary(tmp_path):
    store = write_store(tmp_path / "s", n_documents=10, vocabulary=None)
    sae = ksae.SparseAutoencoder(n_latents=8, k=2, random_state=0, n_threads=1).fit(store, epochs=1)
    data = feature_report(sae, store, tmp_path / "f.html", top=2)
    assert data["tokens"] and all(text == f"<{t}>" for t, text in data["tokens"].items())
    assert "&lt;" in page_data((tmp_path / "f.html").read_text())["tokens"][next(iter(data["tokens"]))]


def test_chosen_latents(store_and_model, tmp_path):
    store, sae = store_and_model
    whole = feature_report(sae, store, tmp_path / "all.html")
    some = feature_report(sae, store, tmp_path / "some.html", latents=[7, 2, 7])
    assert [e["latent"] for e in some["latents"]] == [2, 7]
    for entry in some["latents"]:
        same = whole["latents"][entry["latent"]]
        assert entry["top"] == same["top"] and entry["count"] == same["count"]


@pytest.mark.parametrize("kwargs, message", [
    ({"latents": [0, 99]}, r"latents: expected ids in \[0, 24\)"),
    ({"latents": []}, "latents: expected a non-empty list"),
    ({"top": 0}, "top: expected an integer >= 1"),
    ({"context": -1}, "context: expected an integer >= 0"),
    ({"quantiles": (0.5, 2)}, r"quantiles: expected levels in \[0, 1\]"),
])
def test_bad_arguments_are_named(store_and_model, tmp_path, kwargs, message):
    store, sae = store_and_model
    with pytest.raises(ValueError, match=message):
        feature_report(sae, store, tmp_path / "f.html", **kwargs)


def test_a_store_of_another_width_or_a_bad_vocabulary_is_refused(store_and_model, tmp_path):
    store, sae = store_and_model
    with pytest.raises(TypeError, match="store: expected a ksae.ActivationStore"):
        feature_report(sae, np.zeros((3, D), np.float32), tmp_path / "f.html")
    with pytest.raises(ValueError, match="out_html: expected a file ending in .html"):
        feature_report(sae, store, tmp_path / "f.txt")
    other = ksae.SparseAutoencoder(n_latents=8, k=2, random_state=0).fit(np.ones((20, 5), np.float32), epochs=1)
    with pytest.raises(ValueError, match="store: its rows have 12 features, the model expects 5"):
        feature_report(other, store, tmp_path / "f.html")
    bad = write_store(tmp_path / "bad", n_documents=4, vocabulary=None)
    (tmp_path / "bad" / "vocabulary.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="vocabulary.json: expected a JSON list of strings"):
        feature_report(sae, bad, tmp_path / "f.html")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A ksae train run on a store, and the store."""
    base = tmp_path_factory.mktemp("run")
    write_store(base / "store")
    assert main(["train", "--dataset", "store", "--path", str(base / "store"), "--out", str(base / "run"),
                 "--quiet", "--n-latents", "16", "--k", "2", "--epochs", "1", "--batch-size", "64",
                 "--n-threads", "1", "--test-fraction", "0.2"]) == 0
    return base


def test_the_command_reads_the_runs_test_documents(run_dir, tmp_path, capsys):
    out = tmp_path / "features.html"
    assert main(["features", str(run_dir / "run"), "--out", str(out), "--latents", "0-2,5",
                 "--top", "3", "--context", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    data = json.loads(out.with_suffix(".json").read_text())
    test = ksae.ActivationStore(run_dir / "store").split_documents(0.2)[1]
    assert data["n_rows"] == len(test) and [e["latent"] for e in data["latents"]] == [0, 1, 2, 5]
    assert all(len(e["top"]) <= 3 and all(len(x["tokens"]) <= 5 for x in e["top"]) for e in data["latents"])
    out2 = tmp_path / "whole.html"
    assert main(["features", str(run_dir / "run" / "model"), "--store", str(run_dir / "store"),
                 "--out", str(out2)]) == 0
    assert json.loads(out2.with_suffix(".json").read_text())["n_rows"] == len(ksae.ActivationStore(run_dir / "store"))


def usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["--latents", "1,x"], "--latents: expected latent ids and ranges"),
    (["--latents", "5-2"], "--latents: expected latent ids and ranges"),
    (["--latents", "999"], r"latents: expected ids in \[0, 16\)"),
    (["--top", "0"], "top: expected an integer >= 1"),
])
def test_command_errors_are_one_line(run_dir, tmp_path, capsys, args, message):
    err = usage_error(capsys, ["features", str(run_dir / "run"), "--out", str(tmp_path / "f.html"), *args])
    assert err.startswith("ksae features: error: ") and re.search(message, err)


def test_command_errors_about_the_run(run_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "f.html")]
    assert "is not a directory" in usage_error(capsys, ["features", str(tmp_path / "nope"), *out])
    assert "name the activation store to read with --store" in usage_error(
        capsys, ["features", str(run_dir / "run" / "model"), *out])
    assert "a saved ksae model?" in usage_error(capsys, ["features", str(run_dir / "store"), *out])
    assert "expected a file ending in .html" in usage_error(
        capsys, ["features", str(run_dir / "run"), "--out", str(tmp_path / "f.txt")])
    assert "not found" in usage_error(
        capsys, ["features", str(run_dir / "run"), "--store", str(tmp_path / "nostore"), *out])
