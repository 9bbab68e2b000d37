"""Training straight from a .npy file (ksae.NpyRowStream): the same model as from the array,
resumable, refusing bad rows, and with memory far below the file's size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ksae
from ksae.datasets import make_sparse_dictionary


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    X = make_sparse_dictionary(n_samples=1500, d_in=24, n_components=48, n_active=3,
                               random_state=2).X
    path = tmp_path_factory.mktemp("stream") / "X.npy"
    np.save(path, X)
    return X, path


def test_unshuffled_stream_trains_the_same_model_as_the_array(data):
    X, path = data
    options = dict(epochs=2, batch_size=64, shuffle=False)
    from_array = ksae.SparseAutoencoder(48, 4, random_state=0, b_dec_init="mean").fit(X, **options)
    from_file = ksae.SparseAutoencoder(48, 4, random_state=0, b_dec_init="mean").fit(
        ksae.NpyRowStream(path), **options)
    for name in ("W_enc_", "b_enc_", "W_dec_", "b_dec_"):
        np.testing.assert_array_equal(getattr(from_array, name), getattr(from_file, name))
    np.testing.assert_allclose(from_array.history_["fve"], from_file.history_["fve"], rtol=1e-6)


def test_shuffled_stream_learns(data):
    X, path = data
    sae = ksae.SparseAutoencoder(48, 4, random_state=0).fit(
        ksae.NpyRowStream(path, dtype="float64"), epochs=6, batch_size=32, lr=1e-2,
        validation_data=X[:200])
    assert sae.W_dec_.dtype == np.float32  # the model's dtype, whatever the stream gives
    assert sae.history_["loss"][-1] < 0.5 * sae.history_["loss"][0]
    assert sae.score(X) > 0.8


def test_stream_resumes_exactly(data, tmp_path):
    X, path = data
    ckpt = tmp_path / "c.safetensors"
    options = dict(epochs=2, batch_size=64, log_every=1)
    whole = ksae.SparseAutoencoder(48, 4, random_state=3, n_threads=1).fit(ksae.NpyRowStream(path), **options)

    class Crash(Exception):
        pass

    def crash(record):
        if record["event"] == "step" and record["step"] == 30:
            raise Crash

    with pytest.raises(Crash):
        ksae.SparseAutoencoder(48, 4, random_state=3, n_threads=1).fit(
            ksae.NpyRowStream(path), checkpoint=ckpt, checkpoint_every=4, callback=crash, **options)
    resumed = ksae.resume(ckpt, ksae.NpyRowStream(path))
    np.testing.assert_array_equal(whole.W_dec_, resumed.W_dec_)
    np.testing.assert_array_equal(whole.W_enc_, resumed.W_enc_)


def test_stream_with_a_bad_row_names_it(data, tmp_path):
    X, _ = data
    bad = X.copy()
    bad[777, 5] = np.inf
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match="X: row 777 of .*bad.npy contains NaN or infinity"):
        ksae.SparseAutoencoder(48, 4).fit(ksae.NpyRowStream(tmp_path / "bad.npy"), epochs=1)


def test_stream_cannot_be_split_and_must_match_the_model(data):
    X, path = data
    with pytest.raises(ValueError, match="validation_split: a streamed X cannot be split"):
        ksae.SparseAutoencoder(48, 4).fit(ksae.NpyRowStream(path), epochs=1, validation_split=0.1)
    sae = ksae.SparseAutoencoder(48, 4, random_state=0).fit(X[:, :10], epochs=1)
    with pytest.raises(ValueError, match="X: not the data|expected 10 features"):
        ksae.resume  # noqa: B018 - resume needs a checkpoint; width checks share training_rows
        from ksae.batches import training_rows
        training_rows(ksae.NpyRowStream(path), "float32", sae.n_features_in_)


def test_streaming_memory_stays_far_below_the_file_size(tmp_path):
    """A child process trains one epoch from a ~190 MiB .npy; its peak memory grows by far
    less than the file (an in-memory copy would add the whole file)."""
    rows, width = 200_000, 256
    path = tmp_path / "big.npy"
    X = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, width))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 50_000):
        X[start:start + 50_000] = rng.random((50_000, width), dtype=np.float32)
    X.flush()
    del X
    file_mib = path.stat().st_size / 2**20
    child = textwrap.dedent(f"""
        import json, resource, sys, numpy as np, ksae
        def peak_mib():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        sae = ksae.SparseAutoencoder(64, 4, random_state=0)
        sae.fit(np.zeros((10, {width}), np.float32) + 0.5, epochs=1)  # warm up: code paths, buffers
        before = peak_mib()
        sae.fit(ksae.NpyRowStream({str(path)!r}), epochs=1, batch_size=4096)
        print(json.dumps({{"before": before, "after": peak_mib(), "steps": sae.n_iter_}}))
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["steps"] == -(-rows // 4096)
    growth = result["after"] - result["before"]
    assert growth < 0.3 * file_mib, (growth, file_mib)
