"""What a load or a resume reads is sealed: every edit of a sealed field is refused with the
file and the field named; and every saved file gets the permissions the umask gives."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import ksae
from ksae.activation_store import ActivationStoreWriter
from ksae.config import field_names


@pytest.fixture(scope="module")
def X():
    return ksae.make_sparse_dictionary(n_samples=256, d_in=12, n_components=16, n_active=2,
                                       random_state=3).X


@pytest.fixture
def model_dir(X, tmp_path) -> Path:
    sae = ksae.SparseAutoencoder(20, 3, random_state=0, n_threads=1).fit(X, epochs=1, batch_size=64)
    return sae.save(tmp_path / "model")


@pytest.fixture
def checkpoint(X, tmp_path) -> Path:
    """A checkpoint in the middle of a run with validation and early stopping, so that it
    holds every kind of metadata (stats, stopper, validation rows)."""
    path = tmp_path / "c.safetensors"

    def stop(record):
        if record["event"] == "step" and record["step"] == 17:
            raise RuntimeError("stop")  # after the checkpoint of step 15, in epoch 2

    with pytest.raises(RuntimeError, match="stop"):
        ksae.SparseAutoencoder(20, 3, random_state=0, n_threads=1).fit(
            X, epochs=3, batch_size=16, log_every=1, validation_split=0.25,
            early_stopping_patience=2, checkpoint=path, checkpoint_every=15, callback=stop)
    return path


# ------------------------------------------------------------------------------ config.json
def edit_config(path: Path, change) -> None:
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config, indent=2))


def refused(path: Path, *names: str) -> str:
    """The message ksae.load gives for ``path``; it names each of ``names``."""
    with pytest.raises(ValueError) as info:
        ksae.load(path)
    message = str(info.value)
    for name in names:
        assert name in message, (name, message)
    return message


PARAM_EDITS = {
    "n_latents": 30, "k": 4, "sparsity": "batchtopk", "max_k": 5, "jumprelu_init_threshold": 0.5,
    "activation": "gelu", "init": "he", "normalize_decoder": False, "output_activation": "sigmoid",
    "inference_k_scale": 2.0, "b_dec_init": "mean", "random_state": 7, "dtype": "float64",
    "n_threads": 2,
}
"""A valid value other than the saved one for every model parameter."""


def test_every_model_parameter_is_listed():
    assert set(PARAM_EDITS) == set(field_names(ksae.ModelConfig))


@pytest.mark.parametrize("name", sorted(PARAM_EDITS))
def test_editing_a_parameter_is_refused_naming_file_and_field(model_dir, name):
    edit_config(model_dir, lambda c: c["params"].update({name: PARAM_EDITS[name]}))
    refused(model_dir, "config.json", f"params.{name}")


@pytest.mark.parametrize("change,field", [
    (lambda c: c.update(n_iter=c["n_iter"] + 1), "n_iter"),
    (lambda c: c.update(n_iter="many"), "n_iter"),
    (lambda c: c.update(n_iter=-1), "n_iter"),
    (lambda c: c.update(n_iter=2.5), "n_iter"),
    (lambda c: c.pop("n_iter"), "n_iter"),
    (lambda c: c.update(threshold=0.5), "threshold"),
    (lambda c: c.update(threshold="high"), "threshold"),
    (lambda c: c.update(threshold=True), "threshold"),
    (lambda c: c.pop("threshold"), "threshold"),
    (lambda c: c["params"].pop("k"), "params.k"),
    (lambda c: c["params"].update(k=3.0), "params.k"),
    (lambda c: c["params"].update(extra=1), "extra"),
])
def test_editing_the_counters_is_refused_naming_file_and_field(model_dir, change, field):
    edit_config(model_dir, change)
    message = refused(model_dir, "config.json", field)
    assert "invalid literal" not in message


def test_many_gives_one_clear_message(model_dir):
    edit_config(model_dir, lambda c: c.update(n_iter="many"))
    assert re.fullmatch(r".*config\.json: n_iter: expected an integer, got str 'many'",
                        refused(model_dir))


def test_the_other_fields_may_be_edited(model_dir, X):
    before = ksae.load(model_dir)
    edit_config(model_dir, lambda c: c.update(history={"loss": [1.0]}, ksae_version="0.0.1",
                                              metadata={"model_name": "gpt2"}))
    after = ksae.load(model_dir)
    assert after.history_ == {"loss": [1.0]}
    np.testing.assert_array_equal(after.transform(X[:20]), before.transform(X[:20]))


def test_a_model_saved_without_a_seal_is_refused(model_dir):
    weights = model_dir / "model.safetensors"
    with safe_open(weights, "numpy") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "ksae_seal"}
    save_file(load_file(weights), weights, metadata=metadata)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    edit_config(model_dir, lambda c: c.update(weights_sha256=digest))
    assert "no seal" in refused(model_dir, "config.json")


# ------------------------------------------------------------------------------ checkpoints
def read_meta(path: Path) -> tuple[dict, dict]:
    with safe_open(path, "numpy") as f:
        metadata = f.metadata()
    return json.loads(metadata["ksae_checkpoint"]), metadata


def rewrite_meta(path: Path, meta: dict, metadata: dict) -> None:
    """Write ``meta`` back into the checkpoint, keeping its tensors and its seal."""
    save_file(load_file(path), path, metadata={**metadata, "ksae_checkpoint": json.dumps(meta)})


def leaves(document: dict, prefix: str = ""):
    for key, value in document.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def set_leaf(document: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        document = document[key]
    document[last] = value


def other(value):
    """A value of the same kind as ``value`` but different."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, float) and not math.isfinite(value):
        return 0.0
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + [value[-1] if value else 0]
    return 0  # None, {}


def assert_refused(path: Path, *names: str) -> str:
    with pytest.raises(ValueError) as info:
        ksae.load_checkpoint(path)
    message = str(info.value)
    for name in (str(path), *names):
        assert name in message, (name, message)
    return message


def test_the_checkpoint_holds_every_kind_of_metadata(checkpoint):
    meta, _ = read_meta(checkpoint)
    assert meta["stopper"] is not None and set(meta["stats"]) == {"epoch", "step"}
    assert meta["position"]["batches_done"] > 0


def test_editing_any_metadata_field_is_refused_naming_file_and_field(checkpoint, tmp_path):
    original = checkpoint.read_bytes()
    meta, metadata = read_meta(checkpoint)
    fields = dict(leaves(meta))
    assert {"optimizer.n_steps", "position.epoch", "rng_state.state.state", "history.loss",
            "step_history.loss", "stopper.best_loss", "payload_sha256"} <= set(fields)
    for field, value in fields.items():
        if field in ("format", "format_version"):
            continue  # refused as another format version
        edited = json.loads(json.dumps(meta))
        set_leaf(edited, field, other(value))
        rewrite_meta(checkpoint, edited, metadata)
        assert_refused(checkpoint, f"field {field} was changed")
        checkpoint.write_bytes(original)
    ksae.load_checkpoint(checkpoint)  # the original, untouched, still reads


@pytest.mark.parametrize("field,value", [
    ("history", []), ("history", "loss"), ("step_history", None), ("history.loss", {"a": 1}),
    ("position", 3), ("rng_state", "PCG64"), ("optimizer.n_steps", "many"), ("stats", []),
])
def test_wrong_typed_fields_are_refused(checkpoint, field, value):
    meta, metadata = read_meta(checkpoint)
    set_leaf(meta, field, value)
    rewrite_meta(checkpoint, meta, metadata)
    assert_refused(checkpoint, f"field {field}")


def test_added_and_removed_fields_are_refused(checkpoint):
    original = checkpoint.read_bytes()
    meta, metadata = read_meta(checkpoint)
    rewrite_meta(checkpoint, {**meta, "note": "hello"}, metadata)
    assert_refused(checkpoint, "field note was added")
    checkpoint.write_bytes(original)
    del meta["position"]["epoch_seed"]
    rewrite_meta(checkpoint, meta, metadata)
    assert_refused(checkpoint, "field position.epoch_seed was removed")


def test_resume_refuses_an_edited_checkpoint(checkpoint, X):
    meta, metadata = read_meta(checkpoint)
    meta["optimizer"]["n_steps"] += 100
    rewrite_meta(checkpoint, meta, metadata)
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint}: field optimizer.n_steps was changed")):
        ksae.resume(checkpoint, X)


@pytest.mark.parametrize("seal", [None, "{not json", '"a string"'])
def test_an_unsealed_checkpoint_is_refused(checkpoint, seal):
    meta, metadata = read_meta(checkpoint)
    metadata = {k: v for k, v in metadata.items() if k != "ksae_seal"}
    if seal is not None:
        metadata["ksae_seal"] = seal
    rewrite_meta(checkpoint, meta, metadata)
    assert_refused(checkpoint, "checkpoint")


# ------------------------------------------------------------------------------ permissions
@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def assert_modes(files: list[Path], umask: int) -> None:
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
        assert not list(path.parent.glob("*.tmp")), path.parent  # no temporary file left


pytestmark_posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")


@pytestmark_posix
def test_a_saved_model_follows_the_umask(X, tmp_path, umask):
    sae = ksae.SparseAutoencoder(20, 3, random_state=0).fit(X, epochs=1)
    path = sae.save(tmp_path / "m")
    assert_modes([path / "model.safetensors", path / "config.json"], umask)
    sae.save(path)  # an overwrite too
    assert_modes([path / "model.safetensors", path / "config.json"], umask)


@pytestmark_posix
def test_a_checkpoint_follows_the_umask(X, tmp_path, umask):
    path = tmp_path / "c.safetensors"
    ksae.SparseAutoencoder(20, 3, random_state=0).fit(X, epochs=1, checkpoint=path)
    assert_modes([path], umask)


@pytestmark_posix
def test_an_activation_store_follows_the_umask(tmp_path, umask):
    writer = ActivationStoreWriter(tmp_path / "store", 4, shard_rows=3)
    writer.add(np.ones((5, 4), np.float32), np.arange(5), np.zeros(5), np.arange(5))
    writer.close()
    files = sorted((tmp_path / "store").iterdir())
    assert any(p.suffix == ".npy" for p in files) and any(p.name == "manifest.json" for p in files)
    assert_modes(files, umask)
