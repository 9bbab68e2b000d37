"""The ``ksae`` command line: train, evaluate, encode and sweep, end to end on tiny data."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ksae
from ksae.cli import build_parser, main, train_main
from ksae.cli.data import load_data
from ksae.cli.sweep import pca_test_mse
from ksae.cli.train import resolve
from ksae.config import DataConfig
from ksae.training import evaluate
from test_datasets import write_idx

PYTHON_DIR = Path(ksae.__file__).resolve().parents[1]

TINY = ["--n-samples", "600", "--d-in", "16", "--n-components", "24", "--n-active", "2",
        "--n-latents", "32", "--k", "2", "--epochs", "2", "--batch-size", "64", "--n-threads", "1"]
"""A synthetic run that trains in well under a second."""
TINY_NO_K = TINY[:10] + TINY[12:]


def train(out: Path, *args: str) -> dict:
    assert main(["train", "--out", str(out), "--quiet", *TINY, *args]) == 0
    return json.loads((out / "metrics.json").read_text())


def usage_error(capsys, argv: list[str]) -> str:
    """The stderr of a command that must stop with argparse's usage error (status 2)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def same_weights(a: ksae.SparseAutoencoder, b: ksae.SparseAutoencoder) -> bool:
    return all(np.array_equal(getattr(a, name), getattr(b, name)) for name in ("W_enc_", "b_enc_", "W_dec_", "b_dec_"))


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A tiny MNIST in the standard IDX .gz files: 120 training and 40 test images of
    28 x 28 pixels, each class a different bright block, so labels are learnable."""
    rng = np.random.default_rng(5)
    directory = tmp_path / "mnist"
    directory.mkdir()
    for split, n in (("train", 120), ("t10k", 40)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 40, (n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label:2 * label + 6, 4:24] = 250
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)
    return directory


IMAGE_RUN = ["--n-latents", "40", "--k", "5", "--epochs", "2", "--batch-size", "32", "--n-threads", "1"]


# --- the command and its options ------------------------------------------------------------

def test_ksae_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "encode", "sweep"):
        assert f"    {command} " in out


def test_every_config_field_is_a_flag():
    from dataclasses import fields

    from ksae.config import ModelConfig, TrainConfig

    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for cls in (ModelConfig, TrainConfig, DataConfig):
        for f in fields(cls):
            assert "--" + f.name.replace("_", "-") in help_text, f.name


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_flags_override_the_config_file_which_overrides_defaults(tmp_path, suffix):
    text = {".toml": "[model]\nn_latents = 40\nk = 3\n[train]\nepochs = 3\nlr = 3e-4\n[data]\nd_in = 20\n",
            ".yaml": "model:\n  n_latents: 40\n  k: 3\ntrain:\n  epochs: 3\n  lr: 3e-4\ndata:\n  d_in: 20\n"}[suffix]
    config_file = tmp_path / f"c{suffix}"
    config_file.write_text(text)
    parser = build_parser()
    config, seed = resolve(parser.parse_args(["train", "--config", str(config_file), "--k", "2", "--seed", "7"]))
    assert (config["model"].n_latents, config["model"].k) == (40, 2)          # file, flag
    assert (config["train"].epochs, config["train"].lr) == (3, 3e-4)           # file (YAML's 3e-4 too)
    assert config["train"].batch_size == 256 and config["data"].n_samples == 20000   # defaults
    assert config["data"].d_in == 20
    assert seed == 7 and config["model"].random_state == 7
    config, _ = resolve(parser.parse_args(["train"]))
    assert (config["model"].n_latents, config["model"].k, config["train"].epochs) == (256, 4, 10)  # experiment defaults


def test_a_yaml_config_runs_end_to_end(tmp_path):
    config_file = tmp_path / "run.yml"
    config_file.write_text("model:\n  activation: tanh\ntrain:\n  epochs: 1\n  lr: 2e-3\n")
    train(tmp_path / "run", "--config", str(config_file))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["activation"] == "tanh" and saved["train"]["lr"] == 2e-3
    assert saved["train"]["epochs"] == 2  # the flag beats the file


@pytest.mark.parametrize("suffix,text,expected", [
    (".toml", "[model]\nn_latent = 5\n", r"unknown option(s) 'n_latent' (did you mean 'n_latents'?)"),
    (".yaml", "train:\n  epoch: 5\n", r"unknown option(s) 'epoch' (did you mean 'epochs'?)"),
    (".yaml", "modle:\n  k: 5\n", r"unknown option(s) 'modle' (did you mean 'model'?)"),
    (".yaml", "train:\n  epochs: ten\n", "[train]: epochs expects int, got str 'ten'"),
    (".toml", "[train]\nshuffle = 1\n", "[train]: shuffle expects bool, got int 1"),
    (".toml", "[model]\nmax_k = 'x'\n", "[model]: max_k expects int or null, got str 'x'"),
    (".yaml", "- model\n", "must hold a mapping with model, train and data tables"),
    (".toml", "[model\n", "is not valid TOML"),
    (".json", "{}", "expected a file ending in .toml, .yaml, .yml"),
])
def test_config_file_errors_name_the_problem(tmp_path, capsys, suffix, text, expected):
    config_file = tmp_path / f"c{suffix}"
    config_file.write_text(text)
    assert expected in usage_error(capsys, ["train", "--config", str(config_file)])


def test_a_missing_config_file_is_a_usage_error(tmp_path, capsys):
    assert "not found" in usage_error(capsys, ["train", "--config", str(tmp_path / "nope.toml")])


@pytest.mark.parametrize("options,expected", [
    ({"dataset": "array"}, "path: dataset 'array' needs path"),
    ({"dataset": "array", "path": "x.csv"}, "path: expected a file ending in .npy or .npz, got 'x.csv'"),
    ({"dataset": "array", "path": "x.npz", "stream": True}, "stream: streaming reads a .npy file"),
    ({"dataset": "array", "path": "x.npy", "key": "a"}, "key: names an array in a .npz file"),
    ({"dataset": "synthetic", "stream": True}, "stream: only used with dataset 'array'"),
    ({"dataset": "mnist", "test_path": "t.npy"}, "test_path: only used with dataset 'array'"),
    ({"dataset": "synthetic", "path": "x.npy"}, "path: the synthetic dataset is generated"),
    ({"dataset": "fashion_mnist"}, "did you mean 'fashion-mnist'?"),
])
def test_data_config_rejects_bad_combinations(options, expected):
    with pytest.raises(ValueError) as exc:
        DataConfig(**options)
    assert expected in str(exc.value)


def test_data_config_type_errors_name_the_field():
    with pytest.raises(TypeError, match="stream: expected a bool, got 'yes'"):
        DataConfig(stream="yes")
    with pytest.raises(TypeError, match="path: expected a string or None, got int 3"):
        DataConfig(dataset="array", path=3)


# --- ksae train ------------------------------------------------------------------------------

def test_train_writes_a_complete_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    metrics = train(out)
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    for name in ("model/model.safetensors", "model/config.json", "metrics.json", "config.json",
                 "checkpoint.safetensors", "report.md", "report.html", "training_curves.png",
                 "firing_histogram.png", "recovery.png"):
        assert (out / name).is_file(), name
    sae = ksae.load(out / "model")
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["n_latents"] == 32 and config["seed"] == 0
    data = load_data(DataConfig(**config["data"]), config["seed"], "float32")
    expected = evaluate(sae, data.test)
    assert metrics["test_mse"] == expected["mse"] and metrics["test_fve"] == expected["fve"]
    assert metrics["steps"] == sae.n_iter_ == 2 * 8 and metrics["n_train"] == 480
    assert 0 <= metrics["dictionary_recovery"] <= 1 and len(metrics["history"]["loss"]) == 2
    report = (out / "report.md").read_text()
    assert "test_mse" in report and "training_curves.png" in report
    assert ksae.load_checkpoint(out / "checkpoint.safetensors").step == sae.n_iter_


def test_ksae_train_with_no_arguments_runs_the_default_experiment_offline(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)
    assert train_main([]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dictionary_recovery"] > 0.9 and metrics["n_train"] == 16000
    assert "epoch  10/10" in capsys.readouterr().err


def test_the_progress_bar_shows_loss_l0_and_dead_fraction_on_stderr(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), *TINY]) == 0
    captured = capsys.readouterr()
    assert "epoch   1/2" in captured.err and "epoch   2/2" in captured.err
    for field in ("step", "loss=", "L0=", "dead="):
        assert field in captured.err, field
    assert "epoch" not in captured.out
    # The bar's step records leave the user's configuration alone.
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["log_every"] == 0
    assert main(["train", "--out", str(tmp_path / "quiet"), "--quiet", *TINY]) == 0
    assert capsys.readouterr().err == ""


def test_the_same_seed_gives_the_same_model_and_another_seed_another(tmp_path):
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        train(tmp_path / name, "--seed", seed)
    a, b, c = (ksae.load(tmp_path / name / "model") for name in "abc")
    assert same_weights(a, b)
    assert not same_weights(a, c)


def test_resume_continues_a_run_to_more_epochs_exactly(tmp_path, capsys):
    train(tmp_path / "short", "--epochs", "1")
    train(tmp_path / "long", "--epochs", "3")
    assert main(["train", "--resume", str(tmp_path / "short"), "--epochs", "3", "--quiet"]) == 0
    resumed = ksae.load(tmp_path / "short" / "model")
    assert resumed.n_iter_ == 3 * 8
    assert same_weights(resumed, ksae.load(tmp_path / "long" / "model"))
    metrics = json.loads((tmp_path / "short" / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and len(metrics["history"]["loss"]) == 3
    assert json.loads((tmp_path / "short" / "config.json").read_text())["train"]["epochs"] == 3


def test_resume_takes_its_configuration_from_the_run(tmp_path, capsys):
    err = usage_error(capsys, ["train", "--resume", str(tmp_path), "--k", "3"])
    assert "only --epochs" in err and "--k" in err
    err = usage_error(capsys, ["train", "--resume", str(tmp_path / "none")])
    assert "checkpoint.safetensors not found" in err


def _wait_for_a_checkpoint_past_step_0(path: Path, child: subprocess.Popen, seconds: float = 60) -> None:
    """Until the child has saved a checkpoint after some steps (so its Ctrl-C handler is on)."""
    deadline = time.monotonic() + seconds
    while True:
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, f"no checkpoint past step 0 in {path}"
        if path.exists() and ksae.load_checkpoint(path).step > 0:  # written atomically: never half a file
            return
        time.sleep(0.01)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(tmp_path):
    # Enough steps that training is still under way when the signal arrives.
    run = ["--n-samples", "4000", "--d-in", "32", "--n-components", "48", "--n-active", "3",
           "--n-latents", "64", "--k", "3", "--epochs", "40", "--batch-size", "32", "--n-threads", "1",
           "--seed", "1", "--checkpoint-every", "50"]
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")])}
    # A background job (CI's) inherits SIGINT ignored; the child must get Ctrl-C's default.
    child = subprocess.Popen([sys.executable, "-m", "ksae.cli", "train", "--out", str(out), "--quiet", *run],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_a_checkpoint_past_step_0(out / "checkpoint.safetensors", child)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert f"checkpoint saved to {out / 'checkpoint.safetensors'}" in err
    assert f"resume with: ksae train --resume {out}" in err
    step = ksae.load_checkpoint(out / "checkpoint.safetensors").step
    assert 0 < step < 40 * 100
    assert not (out / "model").exists()

    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert main(["train", "--out", str(tmp_path / "whole"), "--quiet", *run]) == 0
    resumed, whole = ksae.load(out / "model"), ksae.load(tmp_path / "whole" / "model")
    assert resumed.n_iter_ == whole.n_iter_ == 40 * 100
    assert same_weights(resumed, whole)


# --- data -------------------------------------------------------------------------------------

def test_array_data_from_npz_with_a_separate_test_file(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "acts.npz", acts=rng.standard_normal((300, 12)), other=np.zeros(3))
    np.save(tmp_path / "test.npy", rng.standard_normal((50, 12)))
    metrics = train(tmp_path / "run", "--dataset", "array", "--path", str(tmp_path / "acts.npz"),
                    "--key", "acts", "--test-path", str(tmp_path / "test.npy"))
    assert (metrics["n_train"], metrics["n_test"]) == (300, 50)
    assert "dictionary_recovery" not in metrics and "probe_accuracy" not in metrics


def test_array_data_holds_out_the_last_rows(tmp_path):
    X = np.random.default_rng(0).standard_normal((100, 6))
    np.save(tmp_path / "x.npy", X)
    for stream in (False, True):
        data = load_data(DataConfig(dataset="array", path=str(tmp_path / "x.npy"), stream=stream,
                                    test_fraction=0.25), 0, "float64")
        np.testing.assert_array_equal(data.test, X[75:])
        if stream:
            assert isinstance(data.train, ksae.NpyRowStream) and data.train.rows == (0, 75)
            np.testing.assert_array_equal(data.train.read(0, 75), X[:75])
        else:
            np.testing.assert_array_equal(data.train, X[:75])


def _fit_takes_streams(tmp_path: Path) -> bool:
    np.save(tmp_path / "probe.npy", np.ones((4, 2), dtype=np.float32))
    try:
        ksae.SparseAutoencoder(n_latents=2, k=1).fit(ksae.NpyRowStream(tmp_path / "probe.npy"), epochs=1)
    except (TypeError, ValueError):
        return False
    return True


def test_train_streams_an_npy_file(tmp_path):
    if not _fit_takes_streams(tmp_path):
        pytest.skip("SparseAutoencoder.fit does not take an NpyRowStream in this tree yet")
    X = np.random.default_rng(0).standard_normal((400, 10)).astype(np.float32)
    np.save(tmp_path / "acts.npy", X)
    metrics = train(tmp_path / "run", "--dataset", "array", "--path", str(tmp_path / "acts.npy"), "--stream")
    assert (metrics["n_train"], metrics["n_test"]) == (320, 80)
    expected = evaluate(ksae.load(tmp_path / "run" / "model"), X[320:])
    assert metrics["test_mse"] == expected["mse"]


def test_mnist_from_a_directory_of_idx_files_with_a_probe(tmp_path, image_dir):
    out = tmp_path / "run"
    metrics = train(out, "--dataset", "mnist", "--path", str(image_dir), "--no-download", *IMAGE_RUN)
    assert (metrics["n_train"], metrics["n_test"]) == (120, 40)
    assert 0 <= metrics["probe_accuracy"] <= 1
    for name in ("decoder_tiles.png", "reconstructions.png"):
        assert (out / name).is_file()
    assert "probe_accuracy" in (out / "report.md").read_text()
    assert "probe_accuracy" not in train(tmp_path / "np", "--dataset", "mnist", "--path", str(image_dir),
                                         "--no-probe", *IMAGE_RUN)


def test_a_probe_needs_labels(tmp_path, capsys):
    assert "a probe needs labelled data" in usage_error(capsys, ["train", "--out", str(tmp_path), "--probe", *TINY])


def test_missing_data_is_a_usage_error(tmp_path, capsys):
    err = usage_error(capsys, ["train", "--dataset", "array", "--path", str(tmp_path / "no.npy")])
    assert "does not exist" in err
    err = usage_error(capsys, ["train", "--dataset", "fashion-mnist", "--path", str(tmp_path)])
    assert "lacks train-images-idx3-ubyte" in err


# --- ksae evaluate and ksae encode ----------------------------------------------------------------

def test_evaluate_reports_the_test_metrics(tmp_path, capsys):
    train(tmp_path / "run")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--out", str(tmp_path / "m.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    sae = ksae.load(tmp_path / "run" / "model")
    data = load_data(DataConfig(n_samples=600, d_in=16, n_components=24, n_active=2), 0, "float32")
    expected = evaluate(sae, data.test)
    assert printed == json.loads((tmp_path / "m.json").read_text())
    assert {name: printed[f"test_{name}"] for name in expected} == expected
    assert printed["n_test"] == 120
    # A model directory with data flags: another test set.
    assert main(["evaluate", str(tmp_path / "run" / "model"), "--n-samples", "600", "--d-in", "16",
                 "--n-components", "24", "--n-active", "2", "--seed", "9", "--test-fraction", "0.5"]) == 0
    other = load_data(DataConfig(n_samples=600, d_in=16, n_components=24, n_active=2, test_fraction=0.5), 9, "float32")
    assert json.loads(capsys.readouterr().out)["test_mse"] == evaluate(sae, other.test)["mse"]
    assert "expects 16" in usage_error(capsys, ["evaluate", str(tmp_path / "run"), "--d-in", "8"])
    assert "a probe needs labelled data" in usage_error(capsys, ["evaluate", str(tmp_path / "run"), "--probe"])


def test_evaluate_with_a_probe_on_labelled_data(tmp_path, image_dir, capsys):
    train(tmp_path / "run", "--dataset", "mnist", "--path", str(image_dir), *IMAGE_RUN)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--probe"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert printed["probe_accuracy"] == saved["probe_accuracy"] and printed["test_mse"] == saved["test_mse"]


@pytest.mark.parametrize("split,rows", [("train", slice(0, 480)), ("test", slice(480, 600)), ("all", slice(0, 600))])
def test_encode_writes_the_codes_of_a_split(tmp_path, split, rows, capsys):
    train(tmp_path / "run")
    out = tmp_path / "codes" / "c.npz"
    assert main(["encode", str(tmp_path / "run"), "--out", str(out), "--split", split, "--chunk-rows", "100"]) == 0
    X = load_data(DataConfig(n_samples=600, d_in=16, n_components=24, n_active=2), 0, "float32")
    X_all = np.concatenate([X.train, X.test])[rows]
    expected = ksae.load(tmp_path / "run" / "model").encode(X_all)
    with np.load(out) as codes:
        assert set(codes.files) == {"values", "indices"}
        assert codes["values"].shape == codes["indices"].shape == (len(X_all), 2)
        np.testing.assert_array_equal(codes["values"], expected.values)
        np.testing.assert_array_equal(codes["indices"], expected.indices)
    assert [p.name for p in out.parent.iterdir()] == ["c.npz"]  # no temporary file left


def test_encode_writes_labels_of_labelled_data_and_checks_its_output(tmp_path, image_dir, capsys):
    train(tmp_path / "run", "--dataset", "mnist", "--path", str(image_dir), *IMAGE_RUN)
    assert main(["encode", str(tmp_path / "run"), "--out", str(tmp_path / "c.npz")]) == 0
    with np.load(tmp_path / "c.npz") as codes:
        assert codes["values"].shape == (160, 5)
        np.testing.assert_array_equal(codes["labels"], np.r_[np.arange(120) % 10, np.arange(40) % 10])
    assert "--out: expected a file ending in .npz" in usage_error(
        capsys, ["encode", str(tmp_path / "run"), "--out", str(tmp_path / "c.npy")])
    assert "is not a directory" in usage_error(capsys, ["encode", str(tmp_path / "no"), "--out", str(tmp_path / "c.npz")])


# --- ksae sweep -------------------------------------------------------------------------------

def test_pca_test_mse_equals_a_direct_projection(tmp_path):
    rng = np.random.default_rng(1)
    X = (rng.standard_normal((300, 8)) @ rng.standard_normal((8, 8)) + 50).astype(np.float64)
    np.save(tmp_path / "x.npy", X)
    train_rows, test_rows = X[:240], X[240:]
    mean = train_rows.mean(axis=0)
    _, _, Vt = np.linalg.svd(train_rows - mean, full_matrices=False)
    for stream in (False, True):
        data = load_data(DataConfig(dataset="array", path=str(tmp_path / "x.npy"), stream=stream), 0, "float64")
        got = pca_test_mse(data, [1, 3, 8, 20], chunk_rows=7)
        for k in (1, 3, 8):
            P = Vt[:k].T @ Vt[:k]
            expected = np.mean(((test_rows - mean) - (test_rows - mean) @ P) ** 2)
            assert got[k] == pytest.approx(expected, rel=1e-8, abs=1e-12)
        assert got[20] == pytest.approx(0.0, abs=1e-12)


def test_sweep_trains_one_run_per_k_and_reports_them(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--k", "2,4", "--out", str(out), "--quiet", *TINY_NO_K]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [row["k"] for row in rows] == [2, 4]
    data = load_data(DataConfig(n_samples=600, d_in=16, n_components=24, n_active=2), 0, "float32")
    pca = pca_test_mse(data, [2, 4])
    for row in rows:
        run = out / f"k={row['k']}"
        metrics = json.loads((run / "metrics.json").read_text())
        assert json.loads((run / "config.json").read_text())["model"]["k"] == row["k"]
        assert row["test_mse"] == metrics["test_mse"] and row["pca_mse"] == pca[row["k"]]
        assert row["mse_ratio"] == pytest.approx(row["test_mse"] / row["pca_mse"])
        assert row["train_seconds"] == metrics["train_seconds"] and row["test_l0"] == row["k"]
        variance = ((data.test - data.test.mean(axis=0)) ** 2).astype(np.float64).mean()
        assert row["test_fvu"] == pytest.approx(1 - metrics["test_fve"])
        assert row["pca_fvu"] == pytest.approx(row["pca_mse"] / variance, rel=1e-4)
    assert (out / "sweep.png").is_file() and (out / "report.html").is_file()
    report = (out / "report.md").read_text()
    assert "| k | test MSE | PCA test MSE | MSE / PCA MSE |" in report and "sweep.png" in report


def test_sweep_on_images_adds_reconstructions_and_probe(tmp_path, image_dir):
    out = tmp_path / "sweep"
    assert main(["sweep", "--k", "3,6", "--out", str(out), "--quiet", "--dataset", "fashion-mnist",
                 "--path", str(image_dir), *IMAGE_RUN[:2], *IMAGE_RUN[4:]]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert all(0 <= row["probe_accuracy"] <= 1 for row in rows)
    assert (out / "reconstructions.png").is_file() and (out / "k=6" / "decoder_tiles.png").is_file()
    assert "reconstructions.png" in (out / "report.md").read_text()


@pytest.mark.parametrize("value,expected", [("5,x", "comma-separated integers"), ("0,3", "integers >= 1"),
                                            ("4,4", "distinct")])
def test_sweep_k_list_is_checked(capsys, value, expected):
    assert expected in usage_error(capsys, ["sweep", "--k", value])


def test_sweep_refuses_a_k_above_n_latents_before_training(tmp_path, capsys):
    err = usage_error(capsys, ["sweep", "--k", "2,40", "--out", str(tmp_path / "s"), *TINY_NO_K])
    assert "k: expected 1 <= k <= n_latents = 32, got 40" in err
    assert not (tmp_path / "s").exists()
