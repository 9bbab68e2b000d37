"""The spliced-in metric on tiny random GPT-2 and BERT models built offline (the ``hf`` extra)."""

from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import ksae  # noqa: E402
from ksae.harvest import harvest  # noqa: E402
from ksae.splice import held_out_contexts, spliced_metrics  # noqa: E402
from hf_models import tiny_bert, tiny_gpt2, write_texts  # noqa: E402


class Identity:
    """A perfect reconstruction."""

    @staticmethod
    def reconstruct(rows: np.ndarray) -> np.ndarray:
        return rows


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ksae.ActivationStore]:
    root = tmp_path_factory.mktemp("splice")
    texts = write_texts(root, n_docs=16)
    made = {}
    for name, build in (("gpt2", tiny_gpt2), ("bert", tiny_bert)):
        model = build(root / name)
        made[name] = harvest(str(model), texts, root / f"{name}-store", layer=1, context_length=20,
                             batch_size=4, progress=False)
    return made


def test_contexts_are_rebuilt_as_the_harvest_cut_them(stores):
    store = stores["gpt2"]
    pieces = list(held_out_contexts(store, None))
    assert sum(len(p) for p in pieces) == len(store)
    assert all(0 < len(p) <= 20 for p in pieces) and any(len(p) < 20 for p in pieces)
    tokens = np.concatenate([store.tokens_and_positions(i)[0] for i in range(len(store.manifest["shards"]))])
    np.testing.assert_array_equal(np.concatenate(pieces), tokens)


def test_causal_lm_clean_loss_is_the_models_own_and_a_perfect_sae_recovers_all(stores):
    from transformers import AutoModelForCausalLM

    store = stores["gpt2"]
    figures = spliced_metrics(Identity(), store, max_tokens=None, batch_size=5)
    assert figures["ce_sae"] == pytest.approx(figures["ce_clean"], rel=1e-6)
    assert figures["kl_sae"] == pytest.approx(0.0, abs=1e-8)
    assert figures["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert figures["ce_zero"] != pytest.approx(figures["ce_clean"], rel=1e-3) and figures["kl_zero"] > 0
    model = AutoModelForCausalLM.from_pretrained(store.metadata["model"]).eval()
    losses, counts = [], []
    for piece in held_out_contexts(store, None):  # one context per forward: no padding at all
        if len(piece) < 2:
            continue
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([piece]), labels=torch.tensor([piece]))
        losses.append(float(out.loss) * (len(piece) - 1))
        counts.append(len(piece) - 1)
    assert figures["ce_clean"] == pytest.approx(sum(losses) / sum(counts), rel=1e-5)
    assert figures["tokens"] == len(store)


def test_encoder_perfect_sae_gives_cosine_one_and_a_trained_one_lies_between(stores):
    store = stores["bert"]
    perfect = spliced_metrics(Identity(), store, max_tokens=None)
    assert perfect["embedding_cosine_sae"] == pytest.approx(1.0, abs=1e-9)
    assert perfect["token_cosine_sae"] == pytest.approx(1.0, abs=1e-9)
    assert perfect["embedding_recovered"] == pytest.approx(1.0, abs=1e-6)
    rows = np.concatenate(list(store.batches(4096, seed=None)))
    sae = ksae.SparseAutoencoder(n_latents=64, k=8, random_state=0).fit(rows, epochs=20, batch_size=64)
    trained = spliced_metrics(sae, store, max_tokens=None)
    assert trained["embedding_cosine_zero"] < trained["embedding_cosine_sae"] < 1
    assert 0 < trained["embedding_recovered"] < 1


def test_max_tokens_limits_the_evaluation(stores):
    figures = spliced_metrics(Identity(), stores["bert"], max_tokens=30)
    assert 30 <= figures["tokens"] < 30 + 20


def test_a_store_without_a_model_is_refused(tmp_path):
    writer = ksae.ActivationStoreWriter(tmp_path / "s", 4)
    writer.add(np.ones((3, 4), np.float32), np.arange(3), np.zeros(3), np.arange(3))
    with pytest.raises(ValueError, match="was not written by ksae harvest"):
        spliced_metrics(Identity(), writer.close())


def test_ksae_evaluate_spliced_reports_loss_recovered(stores, tmp_path, capsys):
    from ksae.cli import main

    store = stores["gpt2"]
    out = tmp_path / "run"
    assert main(["train", "--dataset", "store", "--path", str(store.path), "--n-latents", "64",
                 "--k", "8", "--epochs", "10", "--batch-size", "32", "--test-fraction", "0.25",
                 "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--spliced", "--spliced-tokens", "60",
                 "--out", str(tmp_path / "e.json")]) == 0
    import json

    figures = json.loads((tmp_path / "e.json").read_text())
    test = store.split_documents(0.25)[1]
    expected = spliced_metrics(ksae.load(out / "model"), test, max_tokens=60)
    assert figures["spliced_loss_recovered"] == pytest.approx(expected["loss_recovered"], rel=1e-9)
    assert figures["spliced_ce_zero"] > figures["spliced_ce_clean"]
    assert {"test_fvu", "test_l0", "test_dead_fraction", "spliced_kl_sae"} <= set(figures)
