"""Checkpoints: resuming equals the uninterrupted run, damaged files are refused, Ctrl-C saves,
and real processes killed at random points always leave a checkpoint that loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import ksae
from ksae.datasets import make_sparse_dictionary

PARAMS = ("W_enc_", "b_enc_", "W_dec_", "b_dec_")


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return make_sparse_dictionary(n_samples=600, d_in=24, n_components=48, n_active=3,
                                  random_state=3).X


def assert_same_model(a: ksae.SparseAutoencoder, b: ksae.SparseAutoencoder) -> None:
    for name in PARAMS + (("log_threshold_",) if a.sparsity == "jumprelu" else ()):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.n_iter_ == b.n_iter_
    np.testing.assert_array_equal(a.samples_since_fired_, b.samples_since_fired_)
    assert a.threshold_ == b.threshold_


class StopAt(Exception):
    pass


def crash_at(step: int):
    """A callback that kills training (as a crash would) once ``step`` steps are done."""
    def callback(record):
        if record["event"] == "step" and record["step"] == step:
            raise StopAt(step)
    return callback


RUNS = {
    "plain": ({}, {}),
    "everything": ({"b_dec_init": "mean"},
                   {"validation_split": 0.2, "early_stopping_patience": 10, "input_dropout": 0.1,
                    "auxk_coef": 0.05, "dead_after_samples": 100, "resample_every": 7,
                    "schedule": "cosine", "warmup_steps": 5, "k_start": 12, "clip_grad_norm": 1.0}),
    "sgd_nesterov": ({}, {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "rmsprop_no_shuffle": ({}, {"optimizer": "rmsprop", "lr": 1e-3, "shuffle": False}),
    "batchtopk": ({"sparsity": "batchtopk"}, {"schedule": "step", "lr_step_size": 10}),
    "jumprelu": ({"sparsity": "jumprelu"}, {"l0_coef": 0.01, "jumprelu_bandwidth": 0.05}),
    "kl": ({"sparsity": "kl", "activation": "sigmoid"}, {"kl_coef": 0.01}),
}


@pytest.mark.parametrize("run", sorted(RUNS))
@pytest.mark.parametrize("crash_step", [1, 13, 19, 20, 33])
def test_resume_equals_uninterrupted_run(X, tmp_path, run, crash_step):
    # 600 rows in batches of 32: 19 steps an epoch, so steps 19 and 20 straddle an epoch end
    # (19 is the epoch's last step; its checkpoint is the end-of-epoch one).
    model_opts, train_opts = RUNS[run]
    options = dict(epochs=3, batch_size=32, log_every=1, checkpoint_every=1, **train_opts)
    model_args = dict(n_latents=48, k=4, random_state=11, n_threads=1, **model_opts)
    whole = ksae.SparseAutoencoder(**model_args).fit(X, **options)
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(StopAt):
        ksae.SparseAutoencoder(**model_args).fit(X, checkpoint=path, callback=crash_at(crash_step),
                                                 **options)
    saved = ksae.load_checkpoint(path)
    assert saved.step == crash_step - 1  # the crash came before that step's save
    resumed = ksae.resume(path, X)
    assert_same_model(whole, resumed)
    assert whole.history_["loss"] == resumed.history_["loss"]
    assert whole.history_["sparsity_loss"] == resumed.history_["sparsity_loss"]
    if "val_loss" in whole.history_:
        assert whole.history_["val_loss"] == resumed.history_["val_loss"]
    assert whole.step_history_["loss"] == resumed.step_history_["loss"]
    # The finished run's last checkpoint is the final model; resuming it again does nothing.
    again = ksae.resume(path, X)
    assert_same_model(whole, again)


def test_checkpoint_holds_the_step_it_was_taken_at(X, tmp_path):
    path = tmp_path / "c.safetensors"
    events = []
    with pytest.raises(StopAt):
        ksae.SparseAutoencoder(48, 4, random_state=0).fit(
            X, epochs=2, batch_size=32, checkpoint=path, checkpoint_every=5, log_every=1,
            callback=lambda r: (events.append(r), crash_at(12)(r)))
    saved_steps = [r["step"] for r in events if r["event"] == "checkpoint"]
    assert saved_steps == [0, 5, 10]
    ckpt = ksae.load_checkpoint(path)
    assert ckpt.step == 10 and ckpt.position.epoch == 1 and ckpt.position.batches_done == 10
    assert ckpt.train_config.checkpoint_every == 5
    assert ckpt.model.encode(X[:3]).indices.shape == (3, 4)  # a usable model


def test_resume_can_extend_the_run(X, tmp_path):
    path = tmp_path / "c.safetensors"
    ksae.SparseAutoencoder(48, 4, random_state=0).fit(X, epochs=1, batch_size=64, checkpoint=path)
    longer = ksae.resume(path, X, epochs=3)
    assert longer.history_["epoch"] == [1, 2, 3]
    assert ksae.load_checkpoint(path).position.epoch == 4


def test_resume_refuses_other_data_and_conflicting_validation(X, tmp_path):
    path = tmp_path / "c.safetensors"
    ksae.SparseAutoencoder(48, 4, random_state=0).fit(X, epochs=1, batch_size=64,
                                                      validation_split=0.25, checkpoint=path)
    with pytest.raises(ValueError, match="X: not the data"):
        ksae.resume(path, X[::-1].copy())
    with pytest.raises(ValueError, match="X: not the data"):
        ksae.resume(path, X[:-1])
    with pytest.raises(ValueError, match="validation_data: this run holds out"):
        ksae.resume(path, X, validation_data=X[:10])
    stopped = tmp_path / "early.safetensors"
    ksae.SparseAutoencoder(48, 4, random_state=0).fit(
        X, epochs=1, batch_size=64, validation_data=X[:50], early_stopping_patience=2,
        checkpoint=stopped)
    with pytest.raises(ValueError, match="validation_data: this run uses early stopping"):
        ksae.resume(stopped, X)


@pytest.fixture()
def good_checkpoint(X, tmp_path) -> Path:
    path = tmp_path / "c.safetensors"
    ksae.SparseAutoencoder(48, 4, random_state=0).fit(X, epochs=1, batch_size=64, checkpoint=path)
    return path


@pytest.mark.parametrize("damage", ["truncate_half", "truncate_header", "empty", "flip_tensor_byte",
                                    "garbage", "wrong_version", "not_a_checkpoint"])
def test_damaged_checkpoints_raise_value_error(good_checkpoint, damage, tmp_path):
    blob = bytearray(good_checkpoint.read_bytes())
    if damage == "truncate_half":
        blob = blob[: len(blob) // 2]
    elif damage == "truncate_header":
        blob = blob[:20]
    elif damage == "empty":
        blob = bytearray()
    elif damage == "flip_tensor_byte":
        blob[-5] ^= 0xFF
    elif damage == "garbage":
        blob = bytearray(os.urandom(4096))
    elif damage == "wrong_version":
        blob = bytearray(bytes(blob).replace(b'\\"format_version\\": 1', b'\\"format_version\\": 99'))
        assert b"99" in blob
    elif damage == "not_a_checkpoint":
        ksae.SparseAutoencoder(8, 2, random_state=0).fit(np.eye(8, dtype=np.float32), epochs=1).save(tmp_path / "m")
        blob = bytearray((tmp_path / "m" / "model.safetensors").read_bytes())
    good_checkpoint.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checkpoint"):
        ksae.load_checkpoint(good_checkpoint)


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        ksae.load_checkpoint(tmp_path / "nothing.safetensors")


def test_divergence_never_overwrites_the_last_good_checkpoint(X, tmp_path):
    path = tmp_path / "c.safetensors"
    with pytest.raises(FloatingPointError, match="diverged"):
        ksae.SparseAutoencoder(48, 4, random_state=0, init="he", normalize_decoder=False).fit(
            X * 1e3, epochs=5, batch_size=32, lr=50.0, optimizer="sgd", checkpoint=path,
            checkpoint_every=1)
    ckpt = ksae.load_checkpoint(path)  # the last finite step, whole
    for name in PARAMS:
        assert np.isfinite(getattr(ckpt.model, name)).all()


def test_sigint_finishes_the_step_saves_and_resumes_exactly(X, tmp_path):
    path = tmp_path / "c.safetensors"
    options = dict(epochs=2, batch_size=32, log_every=1)
    whole = ksae.SparseAutoencoder(48, 4, random_state=5, n_threads=1).fit(X, **options)

    def ctrl_c(record):
        if record["event"] == "step" and record["step"] == 23:
            os.kill(os.getpid(), signal.SIGINT)

    # As in an interactive session (a background job, CI's say, inherits SIGINT ignored,
    # and training then leaves it ignored).
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(ksae.TrainingInterrupted) as info:
            ksae.SparseAutoencoder(48, 4, random_state=5, n_threads=1).fit(
                X, checkpoint=path, callback=ctrl_c, **options)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    finally:
        signal.signal(signal.SIGINT, outer)
    assert info.value.step == 23 and info.value.checkpoint == path
    assert isinstance(info.value, KeyboardInterrupt)
    assert ksae.load_checkpoint(path).step == 23
    assert_same_model(whole, ksae.resume(path, X))


CHILD = textwrap.dedent("""
    import sys, numpy as np, ksae
    from ksae.datasets import make_sparse_dictionary
    X = make_sparse_dictionary(n_samples=3000, d_in=32, n_components=64, n_active=3,
                               random_state=3).X
    path = sys.argv[1]
    def report(record):
        if record["event"] == "checkpoint":
            print("saved", record["step"], flush=True)
    sae = ksae.SparseAutoencoder(64, 4, random_state=1, n_threads=1)
    if sys.argv[2] == "resume":
        sae = ksae.resume(path, X, callback=report)
    else:
        print("ready", flush=True)
        try:
            sae.fit(X, epochs=3, batch_size=16, checkpoint=path, checkpoint_every=1,
                    callback=report)
        except ksae.TrainingInterrupted as exc:
            print("interrupted", exc.step, flush=True)
            sys.exit(130)
    np.save(sys.argv[3], sae.W_dec_)
    print("done", sae.n_iter_, flush=True)
""")


def _restore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the child may inherit SIGINT ignored


def _spawn(tmp_path: Path, *args: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_restore_sigint)


def _wait_ready(child: subprocess.Popen) -> None:
    line = child.stdout.readline()
    assert line.strip() == "ready", (line, child.stderr.read() if child.poll() is not None else "")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> np.ndarray:
    tmp = tmp_path_factory.mktemp("whole")
    child = _spawn(tmp, str(tmp / "c.safetensors"), "fit", str(tmp / "final.npy"))
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    return np.load(tmp / "final.npy")


KILL_TRIALS = 12


@pytest.mark.parametrize("trial", range(KILL_TRIALS))
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_killed_process_leaves_a_loadable_checkpoint(tmp_path, uninterrupted, trial, sig):
    """A child trains with a checkpoint after every step; it is sent SIGKILL (no chance to
    clean up, possibly mid-write) or SIGINT (Ctrl-C) at a random point of the run: once it
    has reported a random number of saved steps, plus a random fraction of a step. The
    checkpoint then loads, holds at least every step the child reported saved, and resuming
    it ends on the uninterrupted run's weights."""
    rng = np.random.default_rng([trial, len(sig)])
    path = tmp_path / "c.safetensors"
    child = _spawn(tmp_path, str(path), "fit", str(tmp_path / "final.npy"))
    _wait_ready(child)
    target = int(rng.integers(1, 500))  # the run has 564 steps
    seen = []
    while True:
        line = child.stdout.readline()
        assert line, f"the child ended before step {target}: {child.stderr.read()[-500:]}"
        seen.append(line)
        if line.startswith("saved") and int(line.split()[1]) >= target:
            break
    time.sleep(rng.uniform(0, 0.003))  # land anywhere in a step or a save
    child.send_signal(getattr(signal, sig))
    rest, err = child.communicate(timeout=60)
    out = "".join(seen) + rest
    # Whole lines only: SIGKILL can cut the child's last line short.
    saved = [int(line.split()[1]) for line in out.split("\n")[:-1] if line.startswith("saved")]
    # A child that finished means the signal was lost (ignored SIGINT, say): the trial
    # proved nothing.
    assert child.returncode != 0, f"the child finished despite {sig}: {out[-300:]}"
    if sig == "SIGINT":
        assert child.returncode == 130, err
        interrupted_at = int(out.split("interrupted")[1].split()[0])
        assert ksae.load_checkpoint(path).step == interrupted_at
    else:
        assert child.returncode == -signal.SIGKILL
    if not saved and not path.exists():
        return  # killed before the first checkpoint was written
    ckpt = ksae.load_checkpoint(path)
    assert ckpt.step >= (saved[-1] if saved else 0), (ckpt.step, saved[-3:])
    assert not list(tmp_path.glob(".c.safetensors.*.tmp")) or sig == "SIGKILL"
    resumed = _spawn(tmp_path, str(path), "resume", str(tmp_path / "resumed.npy"))
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "resumed.npy"), uninterrupted)
