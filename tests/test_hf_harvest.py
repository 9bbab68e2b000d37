"""``ksae harvest`` on tiny random GPT-2 and BERT models built offline (the ``hf`` extra)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import ksae  # noqa: E402
import ksae.harvest as harvest_module  # noqa: E402
from ksae.cli import main  # noqa: E402
from ksae.harvest import harvest  # noqa: E402
from hf_models import tiny_bert, tiny_gpt2, write_texts  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"bert": tiny_bert(root / "bert"), "gpt2": tiny_gpt2(root / "gpt2")}


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_texts(tmp_path_factory.mktemp("texts"))


def _all_rows(store: ksae.ActivationStore) -> np.ndarray:
    return np.concatenate(list(store.batches(1 << 20, seed=None)))


def _reference(model_dir: Path, texts: Path, layer: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """hidden_states[layer] of each context, one context per forward, text tokens only."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    prefix, suffix = ksae.transformer.special_template(tokenizer)
    rows, tokens = [], []
    for doc in ksae.texts.iter_documents(texts):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        room = length - len(prefix) - len(suffix)
        for start in range(0, len(ids), room):
            piece = ids[start:start + room]
            with torch.inference_mode():
                out = model(input_ids=torch.tensor([prefix + piece + suffix]), output_hidden_states=True)
            rows.append(out.hidden_states[layer][0, len(prefix):len(prefix) + len(piece)].numpy())
            tokens.extend(piece)
    return np.concatenate(rows), np.asarray(tokens)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_rows_are_the_models_hidden_states_at_the_text_tokens(models, texts, tmp_path, name, layer):
    store = harvest(str(models[name]), texts, tmp_path / "store", layer=layer, context_length=24,
                    batch_size=3, shard_rows=50, progress=False)
    expected, tokens = _reference(models[name], texts, layer, 24)
    got = _all_rows(store)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)  # padding to the batch only
    stored_tokens = np.concatenate([store.tokens_and_positions(i)[0] for i in range(len(store.manifest["shards"]))])
    np.testing.assert_array_equal(stored_tokens, tokens)
    assert store.manifest["complete"] and store.metadata["layer"] == str(layer)


def test_positions_count_within_documents_across_contexts(models, texts, tmp_path):
    store = harvest(str(models["bert"]), texts, tmp_path / "s", layer=1, context_length=12,
                    batch_size=4, progress=False)
    positions = np.concatenate([store.tokens_and_positions(i)[1] for i in range(len(store.manifest["shards"]))])
    for document in np.unique(positions[:, 0]):
        mine = positions[positions[:, 0] == document, 1]
        np.testing.assert_array_equal(mine, np.arange(len(mine)))
    assert len(mine) > 10  # some documents spanned several 10-token contexts


def test_module_path_reads_that_modules_output(models, texts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = harvest(str(models["gpt2"]), texts, tmp_path / "s", layer="transformer.h.0.mlp",
                    context_length=64, batch_size=1, max_tokens=30, progress=False)
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"]).eval()
    seen = []
    model.transformer.h[0].mlp.register_forward_hook(lambda m, a, out: seen.append(out))
    first = next(iter(ksae.texts.iter_documents(texts)))
    ids = AutoTokenizer.from_pretrained(models["gpt2"])(first)["input_ids"]
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]))
    np.testing.assert_allclose(_all_rows(store), seen[0][0, :30].numpy(), rtol=1e-5, atol=1e-6)


def test_special_tokens_are_dropped_unless_kept(models, texts, tmp_path):
    plain = harvest(str(models["bert"]), texts, tmp_path / "a", layer=1, context_length=64,
                    progress=False)
    kept = harvest(str(models["bert"]), texts, tmp_path / "b", layer=1, context_length=64,
                   keep_special_tokens=True, progress=False)
    tokens, positions = kept.tokens_and_positions(0)
    lengths = np.bincount(plain.tokens_and_positions(0)[1][:, 0])
    n_contexts = int(np.sum(-(-lengths // 62)))  # 62 text tokens fit in a context of 64
    assert len(kept) == len(plain) + 2 * n_contexts  # [CLS] and [SEP] around every context
    assert set(tokens[positions[:, 1] == -1]) == set(kept.metadata["special_prefix"] + kept.metadata["special_suffix"])
    assert -1 not in plain.tokens_and_positions(0)[1][:, 1]


def test_max_tokens_stops_at_exactly_that_many_rows_and_vocabulary_is_written(models, texts, tmp_path):
    store = harvest(str(models["gpt2"]), texts, tmp_path / "s", layer=1, max_tokens=77,
                    context_length=64, progress=False)
    assert len(store) == 77
    vocabulary = json.loads((tmp_path / "s" / "vocabulary.json").read_text())
    tokens = store.tokens_and_positions(0)[0]
    text = "".join(vocabulary[t] for t in tokens[:8])
    assert text == "".join(ksae.texts.iter_documents(texts))[:len(text)]


def test_an_interrupted_harvest_resumes_into_the_same_store(models, texts, tmp_path, monkeypatch):
    kwargs = dict(layer=1, context_length=16, batch_size=3, shard_rows=40, progress=False)
    whole = harvest(str(models["bert"]), texts, tmp_path / "whole", **kwargs)
    real, calls = harvest_module.read_layer, []

    def dies_at_the_sixth_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 1 + 6:  # the width probe, then batches
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(harvest_module, "read_layer", dies_at_the_sixth_batch)
    with pytest.raises(KeyboardInterrupt):
        harvest(str(models["bert"]), texts, tmp_path / "cut", **kwargs)
    monkeypatch.setattr(harvest_module, "read_layer", real)
    partial = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert not partial["complete"] and 0 < len(partial["shards"]) < len(whole.manifest["shards"])
    resumed = harvest(str(models["bert"]), texts, tmp_path / "cut", **kwargs)
    assert resumed.manifest["shards"] == whole.manifest["shards"]
    for shard in whole.manifest["shards"]:
        for name in shard["files"].values():
            assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_a_store_harvested_trains_a_model(models, texts, tmp_path):
    store = harvest(str(models["bert"]), texts, tmp_path / "s", layer=1, context_length=64,
                    progress=False)
    train, test = store.split_documents(0.25)
    sae = ksae.SparseAutoencoder(n_latents=64, k=4, random_state=0).fit(train, epochs=3, batch_size=32)
    assert sae.encode(_all_rows(test)).indices.shape[1] == 4


@pytest.mark.parametrize("argv, message", [
    (["--layer", "9"], "hidden_states index 9 is out of range 0..2"),
    (["--layer", "encoder.nothing"], "has no module 'encoder.nothing'"),
    (["--layer", "1", "--context-length", "2"], "leaves no room for text"),
    (["--layer", "1", "--context-length", "65"], "exceeds the model's 64 positions"),
])
def test_cli_errors_are_one_line(models, texts, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["harvest", str(models["bert"]), str(texts), "--out", str(tmp_path / "s"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ksae harvest: error: ") and message in err[-1]


def test_cli_harvest_then_train_on_the_store(models, texts, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["harvest", str(models["gpt2"]), str(texts), "--out", str(store), "--layer", "1",
                 "--quiet", "--dtype", "bfloat16", "--context-length", "64"]) == 0
    assert "rows of width 32" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a complete store is not harvested again
        main(["harvest", str(models["gpt2"]), str(texts), "--out", str(store), "--layer", "1", "--quiet"])
    assert "already holds a complete store" in capsys.readouterr().err
    assert main(["train", "--dataset", "store", "--path", str(store), "--n-latents", "64", "--k", "4",
                 "--epochs", "2", "--out", str(tmp_path / "run"), "--quiet"]) == 0


def test_importing_the_harvest_modules_does_not_import_torch():
    code = ("import sys, ksae, ksae.harvest, ksae.transformer, ksae.cli.harvest; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
