"""Saving and loading: safetensors + JSON, exact round trips, and damaged files refused."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ksae

from conftest import ACTIVATIONS


@pytest.fixture(scope="module")
def X():
    return ksae.make_sparse_dictionary(n_samples=300, d_in=12, n_components=16, n_active=2,
                                       random_state=3).X


def train(X, **params):
    params = {"n_latents": 20, "k": 3, "random_state": 0, "n_threads": 1, **params}
    return ksae.SparseAutoencoder(**params).fit(X, epochs=2, batch_size=64, lr=1e-2,
                                                validation_data=X[:50])


@pytest.fixture
def saved(X, tmp_path):
    sae = train(X)
    path = sae.save(tmp_path / "model")
    return sae, path


def assert_same_model(a, b):
    assert a.get_params() == b.get_params()
    for name in ("W_enc_", "b_enc_", "W_dec_", "b_dec_"):
        wa, wb = getattr(a, name), getattr(b, name)
        assert wa.dtype == wb.dtype and wa.shape == wb.shape, name
        np.testing.assert_array_equal(wa, wb, err_msg=name)
    assert a.n_iter_ == b.n_iter_
    assert a.history_ == b.history_


def rewrite_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if key == "params":
            config["params"].update(value)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def rehash(path):
    """Make config.json's checksum match the (replaced) weights file again."""
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    rewrite_config(path, weights_sha256=digest)


# --------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_round_trip_is_exact(X, tmp_path, dtype, activation):
    sae = train(X, dtype=dtype, activation=activation, init="he", normalize_decoder=False)
    returned = sae.save(tmp_path / "m")
    assert returned == tmp_path / "m"
    loaded = ksae.load(tmp_path / "m")
    assert isinstance(loaded, ksae.SparseAutoencoder)
    assert_same_model(sae, loaded)
    assert loaded.n_features_in_ == 12
    a, b = sae.encode(X), loaded.encode(X)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(sae.reconstruct(X), loaded.reconstruct(X))
    assert sae.score(X) == loaded.score(X)


def test_round_trip_accepts_str_paths_and_keeps_history(X, tmp_path):
    sae = train(X)
    assert set(sae.history_) >= {"loss", "val_loss", "val_fve"}
    sae.save(str(tmp_path / "m"))
    loaded = ksae.load(str(tmp_path / "m"))
    assert_same_model(sae, loaded)


def test_loaded_model_keeps_training(saved, X):
    sae, path = saved
    loaded = ksae.load(path)
    loaded.partial_fit(X[:64], lr=1e-2)
    assert loaded.n_iter_ == sae.n_iter_ + 1
    assert not np.array_equal(loaded.W_dec_, sae.W_dec_)
    # The loaded arrays are the model's own: training it leaves the saved files alone.
    assert_same_model(sae, ksae.load(path))


def test_save_creates_directories_and_writes_public_layout(X, tmp_path):
    sae = train(X)
    path = tmp_path / "a" / "b" / "model"
    sae.save(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    tensors = load_file(path / "model.safetensors")
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert tensors["W_enc"].shape == (12, 20)  # (d_in, n_latents), as users see it
    np.testing.assert_array_equal(tensors["W_enc"], sae.W_enc_)
    np.testing.assert_array_equal(tensors["W_dec"], sae.W_dec_)
    config = json.loads((path / "config.json").read_text())
    assert config["format"] == "ksae" and config["format_version"] == 1
    assert config["params"]["n_latents"] == 20 and config["params"]["dtype"] == "float32"
    assert config["n_iter"] == sae.n_iter_
    assert config["weights_sha256"] == hashlib.sha256(
        (path / "model.safetensors").read_bytes()).hexdigest()


def test_saved_directory_holds_no_pickle_and_no_leftovers(X, tmp_path):
    sae = train(X)
    path = tmp_path / "m"
    for _ in range(2):  # saving over an existing model replaces it cleanly
        sae.save(path)
        assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    for p in path.iterdir():
        assert p.read_bytes()[:1] != b"\x80"  # no pickle (protocol 2+ starts with PROTO)
    json.loads((path / "config.json").read_text())
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_saving_over_a_model_replaces_it(X, tmp_path):
    first, second = train(X), train(X, random_state=1)
    first.save(tmp_path / "m")
    second.save(tmp_path / "m")
    assert_same_model(second, ksae.load(tmp_path / "m"))


def test_save_to_an_existing_file_raises(saved, tmp_path):
    sae, _ = saved
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(ValueError, match="path: .*not a directory"):
        sae.save(target)
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("change", [{"n_latents": 40}, {"dtype": "float64"}], ids=str)
def test_save_after_changing_the_architecture_is_loadable_or_refused(X, tmp_path, change):
    # set_params on a fitted model takes effect at the next fit; until then the weights keep
    # their old shape and dtype. A save in between must not write a config.json that
    # contradicts its weights file (encode and partial_fit refuse such a model).
    sae = train(X)
    sae.set_params(**change)
    try:
        sae.save(tmp_path / "m")
    except ValueError:
        return  # refusing is fine
    ksae.load(tmp_path / "m")  # but what was written must load


# --------------------------------------------------------------------------------- damage
def test_load_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ksae.load(tmp_path / "nowhere")


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_load_missing_file_raises(saved, missing):
    _, path = saved
    (path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        ksae.load(path)


def test_truncated_weights_raise(saved):
    _, path = saved
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="checksum"):
        ksae.load(path)


def test_flipped_byte_in_weights_raises(saved):
    _, path = saved
    blob = bytearray((path / "model.safetensors").read_bytes())
    blob[-5] ^= 0x40
    (path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum"):
        ksae.load(path)


def test_unreadable_weights_with_matching_checksum_raise(saved):
    _, path = saved
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    rehash(path)
    with pytest.raises(ValueError, match="safetensors"):
        ksae.load(path)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", '"ksae"', '{"format": "other"}'])
def test_bad_config_json_raises(saved, text):
    _, path = saved
    (path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="config.json"):
        ksae.load(path)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_format_version_raises(saved, version):
    _, path = saved
    rewrite_config(path, format_version=version)
    with pytest.raises(ValueError, match="format_version"):
        ksae.load(path)


@pytest.mark.parametrize("params,match", [
    ({"k": 0}, "k"),
    ({"k": 21}, "k"),
    ({"activation": "swiglu"}, "activation"),
    ({"dtype": "int8"}, "dtype"),
    ({"k": "three"}, "k"),
    ({"unknown_param": 1}, "unknown_param"),
])
def test_tampered_params_raise(saved, params, match):
    _, path = saved
    rewrite_config(path, params=params)
    with pytest.raises(ValueError, match=match):
        ksae.load(path)


def test_missing_params_raise(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    del config["params"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="params"):
        ksae.load(path)


def test_weights_from_another_save_raise(X, saved, tmp_path):
    _, path = saved
    other = train(X, n_latents=30).save(tmp_path / "other")
    shutil.copy(other / "model.safetensors", path / "model.safetensors")
    with pytest.raises(ValueError, match="checksum"):
        ksae.load(path)
    # Even with the checksum made to match, the shapes contradict the config.
    rehash(path)
    with pytest.raises(ValueError, match=r"tensor W_enc has shape \(12, 30\).*expected \(12, 20\)"):
        ksae.load(path)


@pytest.mark.parametrize("tamper,match", [
    (lambda t: t.update(W_dec=t["W_dec"].astype(np.float64)), "W_dec .*float64.*expected .*float32"),
    (lambda t: t.update(b_enc=t["b_enc"][:-1]), r"b_enc has shape \(19,\)"),
    (lambda t: t.update(W_enc=t["W_enc"].T.copy()), r"W_enc has shape \(20, 12\)"),
    (lambda t: t.pop("b_dec"), "expected tensors"),
    (lambda t: t.update(extra=np.zeros(3, dtype=np.float32)), "expected tensors"),
    (lambda t: t["W_dec"].__setitem__((0, 0), np.nan), "W_dec holds NaN"),
    (lambda t: t["b_enc"].__setitem__(3, np.inf), "b_enc holds NaN or infinity"),
])
def test_inconsistent_weights_raise(saved, tamper, match):
    _, path = saved
    tensors = {k: v.copy() for k, v in load_file(path / "model.safetensors").items()}
    tamper(tensors)
    save_file(tensors, path / "model.safetensors")
    rehash(path)
    with pytest.raises(ValueError, match=match):
        ksae.load(path)
