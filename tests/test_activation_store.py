"""The activation store: shards written atomically with their manifest, resumed after an
interruption into the same files, damaged shards named, read back as a batch source that
``fit`` trains from (shuffled across shards, bounded windows), documents held out whole."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ksae
from ksae.activation_store import ActivationStore, ActivationStoreWriter, from_stored, to_stored

D = 12


def documents(n_documents: int, seed: int = 0, lengths=(5, 40)):
    """(rows, tokens, document ids, positions) of each document: activations with structure
    (a few directions with sparse weights) so a model can learn them."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((24, D)).astype(np.float32)
    for doc in range(n_documents):
        n = int(rng.integers(*lengths))
        weights = rng.exponential(1.0, (n, 24)) * (rng.random((n, 24)) < 0.15)
        rows = (weights @ atoms).astype(np.float32)
        yield rows, rng.integers(0, 30000, n), np.full(n, doc), np.arange(n)


def write_store(path, n_documents=60, shard_rows=200, dtype="float32", stop_after=None):
    writer = ActivationStoreWriter(path, D, dtype=dtype, shard_rows=shard_rows,
                                   metadata={"model": "test", "layer": 3})
    for i, doc in enumerate(documents(n_documents)):
        if i < writer.documents_done:
            continue  # a resumed harvest skips what is written
        if stop_after is not None and i == stop_after:
            return writer  # interrupted: the waiting rows are lost, the shards are whole
        writer.add(*doc)
    return writer.close()


def all_rows(n_documents=60):
    return np.concatenate([doc[0] for doc in documents(n_documents)])


def test_a_store_holds_every_row_with_its_token_and_position(tmp_path):
    store = write_store(tmp_path / "s")
    expected = all_rows()
    assert store.shape == expected.shape
    np.testing.assert_array_equal(np.concatenate(list(store.batches(64, None))), expected)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["metadata"] == {"model": "test", "layer": 3}
    assert len(manifest["shards"]) > 3 and all(s["rows"] >= 200 for s in manifest["shards"][:-1])
    tokens, positions = store.tokens_and_positions(0)
    first = next(documents(1))
    np.testing.assert_array_equal(tokens[:len(first[1])], first[1])
    np.testing.assert_array_equal(positions[:len(first[1])], np.stack([first[2], first[3]], 1))
    np.testing.assert_array_equal(store.row(333), expected[333])
    assert store.total_variance() == pytest.approx(
        float(((expected.astype(np.float64) - expected.mean(axis=0, dtype=np.float64)) ** 2).sum()), rel=1e-9)


def test_an_interrupted_harvest_resumes_into_the_same_files(tmp_path):
    write_store(tmp_path / "whole")
    write_store(tmp_path / "cut", stop_after=37)  # leaves whole shards only
    assert not json.loads((tmp_path / "cut" / "manifest.json").read_text())["complete"]
    write_store(tmp_path / "cut")  # reopened: resumes after the written shards
    for name in sorted(p.name for p in (tmp_path / "whole").iterdir()):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name


def test_a_resume_with_other_settings_or_a_complete_store_is_refused(tmp_path):
    write_store(tmp_path / "s", stop_after=20)
    with pytest.raises(ValueError, match="dtype='float32'"):
        ActivationStoreWriter(tmp_path / "s", D, dtype="float16", metadata={"model": "test", "layer": 3})
    write_store(tmp_path / "s")
    with pytest.raises(ValueError, match="complete"):
        ActivationStoreWriter(tmp_path / "s", D, metadata={"model": "test", "layer": 3})


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_shard_is_named(tmp_path, damage):
    store = write_store(tmp_path / "s")
    shard = tmp_path / "s" / "shard-00002.npy"
    if damage == "delete":
        shard.unlink()
    else:
        blob = bytearray(shard.read_bytes())
        blob = blob[:-40] if damage == "truncate" else blob[:-3] + bytes([blob[-3] ^ 1]) + blob[-2:]
        shard.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="shard-00002.npy: shard 2 of the store is damaged"):
        list(ActivationStore(tmp_path / "s").batches(64, seed=1))
    assert store.path == tmp_path / "s"


def test_shuffled_epochs_cover_every_row_once_in_bounded_windows(tmp_path):
    store = ActivationStore(write_store(tmp_path / "s").path, window_shards=2)
    rows = all_rows()
    epoch = list(store.batches(50, seed=3))
    assert len(epoch) == -(-rows.shape[0] // 50) and all(len(b) == 50 for b in epoch[:-1])
    seen = np.concatenate(epoch)
    assert not np.array_equal(seen, rows)  # shuffled ...
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(key(seen), key(rows))  # ... a permutation of the rows
    again = list(store.batches(50, seed=3, skip=4))
    for a, b in zip(epoch[4:], again):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_and_float16_rows_round_trip_at_their_precision(tmp_path):
    x = np.array([[1.0, -2.5, 3.14159, 1e-3, 65504.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(from_stored(to_stored(x, "bfloat16"), "bfloat16", np.float32), x, rtol=2 ** -8)
    for dtype, rtol in (("bfloat16", 2 ** -8), ("float16", 2 ** -11)):
        store = write_store(tmp_path / dtype, n_documents=10, dtype=dtype)
        np.testing.assert_allclose(np.concatenate(list(store.batches(64, None))), all_rows(10),
                                   rtol=rtol, atol=1e-3)


def test_fit_trains_from_the_store_and_scores_on_held_out_documents(tmp_path):
    store = write_store(tmp_path / "s", n_documents=150)
    train, test = store.split_documents(0.2, seed=0)
    _, train_positions = zip(*(train.tokens_and_positions(i) for i in range(len(store.manifest["shards"]))))
    _, test_positions = zip(*(test.tokens_and_positions(i) for i in range(len(store.manifest["shards"]))))
    train_docs = set(np.concatenate(train_positions)[:, 0])
    test_docs = set(np.concatenate(test_positions)[:, 0])
    assert not train_docs & test_docs and len(test_docs) == 30
    assert train.shape[0] + test.shape[0] == store.shape[0]
    X_test = np.concatenate(list(test.batches(256, None)))
    sae = ksae.SparseAutoencoder(n_latents=48, k=4, random_state=0)
    sae.fit(train, epochs=1, batch_size=64)
    before = sae.score(X_test)
    sae.fit(train, epochs=8, batch_size=64)
    assert sae.score(X_test) > max(before, 0.6)
    with pytest.raises(ValueError, match="open it with dtype='float64'"):
        ksae.SparseAutoencoder(n_latents=48, k=4, dtype="float64").fit(train)


def test_a_run_on_the_store_resumes_bit_for_bit(tmp_path):
    store = write_store(tmp_path / "s", n_documents=40)
    whole = ksae.SparseAutoencoder(n_latents=32, k=3, random_state=0).fit(store, epochs=3, batch_size=64)
    checkpoint = tmp_path / "run.safetensors"
    ksae.SparseAutoencoder(n_latents=32, k=3, random_state=0).fit(store, epochs=1, batch_size=64,
                                                                  checkpoint=checkpoint)
    resumed = ksae.resume(checkpoint, ActivationStore(tmp_path / "s"), epochs=3)
    for name in ("W_enc_", "b_enc_", "W_dec_", "b_dec_"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name), err_msg=name)
    with pytest.raises(ValueError, match="not the data the checkpoint"):
        ksae.resume(checkpoint, write_store(tmp_path / "other", n_documents=41), epochs=3)


def test_ksae_train_runs_on_a_store_with_documents_held_out(tmp_path):
    from ksae.cli import main

    write_store(tmp_path / "s", n_documents=80)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "store", "--path", str(tmp_path / "s"), "--n-latents", "32",
                 "--k", "4", "--epochs", "2", "--test-fraction", "0.25", "--out", str(out),
                 "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    n_rows = all_rows(80).shape[0]
    assert metrics["n_train"] + metrics["n_test"] == n_rows and metrics["n_test"] > 0
    assert ksae.load(out / "model").n_features_in_ == D
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "store", "--out", str(tmp_path / "bad")])


def test_ksae_evaluate_reports_the_field_metrics_on_the_held_out_documents(tmp_path, capsys):
    from ksae.cli import main
    from ksae.field_metrics import store_metrics

    write_store(tmp_path / "s", n_documents=80)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "store", "--path", str(tmp_path / "s"), "--n-latents", "32",
                 "--k", "4", "--epochs", "2", "--test-fraction", "0.25", "--out", str(out),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--out", str(tmp_path / "e.json")]) == 0
    figures = json.loads((tmp_path / "e.json").read_text())
    test = ActivationStore(tmp_path / "s").split_documents(0.25)[1]
    expected = store_metrics(ksae.load(out / "model"), test)
    for name in ("fvu", "l0", "dead_fraction", "dense_fraction", "relative_reconstruction_bias"):
        assert figures[f"test_{name}"] == pytest.approx(expected[name], rel=1e-12)
    assert figures["test_log_density_histogram"] == expected["log_density_histogram"]
    assert figures["test_fvu"] == pytest.approx(1 - figures["test_fve"], rel=1e-5)


def test_ksae_evaluate_spliced_needs_a_store_run(tmp_path, capsys):
    from ksae.cli import main

    out = tmp_path / "run"
    assert main(["train", "--n-samples", "400", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(out), "--spliced"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "ksae evaluate: error: --spliced: needs a model trained on an activation store (--dataset store)")
