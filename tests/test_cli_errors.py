"""What the ``ksae`` command says when a user gets something wrong: one line on stderr,
``ksae COMMAND: error: ...`` naming the flag, file or row (and at most a hint to --help),
no traceback unless --debug, exit 2 when refused before any work and 1 when the work failed.

Every case runs the real command in a subprocess, as a user would."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ksae
from ksae.cli import build_parser
from ksae.cli.train import resolve
from ksae.config import ModelConfig

PYTHON_DIR = Path(ksae.__file__).resolve().parents[1]
TINY = ["--n-samples", "400", "--d-in", "16", "--n-components", "24", "--n-active", "2",
        "--n-latents", "32", "--k", "2", "--epochs", "1", "--batch-size", "64", "--n-threads", "1"]
"""A synthetic run that trains in well under a second (16 features per row)."""
ARRAY_RUN = ["--n-latents", "32", "--k", "2", "--epochs", "1", "--n-threads", "1", "--quiet"]


def ksae_command(*args: str, cwd: Path, env: dict[str, str] | None = None,
                 entry: str = "ksae") -> subprocess.CompletedProcess:
    """``ksae ARGS`` (or ``ksae-train ARGS``) run in a subprocess against the package under test."""
    environment = {**os.environ, **(env or {}),
                   "PYTHONPATH": os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")])}
    launcher = (["-m", "ksae.cli"] if entry == "ksae" else
                ["-c", "import sys; from ksae.cli import train_main; sys.exit(train_main())"])
    return subprocess.run([sys.executable, *launcher, *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300, check=False)


def one_error_line(result: subprocess.CompletedProcess, prog: str, status: int) -> str:
    """The error line of a failed command, checked: the exit status, ``prog: error: ``, no
    traceback, one line (or two, the second a hint to --help)."""
    err = result.stderr
    assert result.returncode == status, (result.returncode, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert lines and lines[0].startswith(f"{prog}: error: "), err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1] == f"run '{prog} --help' for the options"), err
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Good and bad input files, and a trained run (``run``, 16 features) to resume and evaluate."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    good = rng.standard_normal((300, 16)).astype(np.float32)
    np.save(d / "w16.npy", good)
    np.save(d / "w8.npy", good[:, :8])
    for name, row, value in (("nan_first", 0, np.nan), ("nan_middle", 123, np.nan),
                             ("inf_test_rows", 290, np.inf)):
        bad = good.copy()
        bad[row, 3] = value
        np.save(d / f"{name}.npy", bad)
    (d / "text.npy").write_text("1 2 3\n4 5 6\n")
    (d / "empty.npy").write_bytes(b"")
    with open(d / "objects.npy", "wb") as f:
        np.save(f, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (d / "pickled.npy").write_bytes(pickle.dumps([[1.0, 2.0]]))
    result = ksae_command("train", "--out", str(d / "run"), "--quiet", *TINY, cwd=d)
    assert result.returncode == 0, result.stderr
    return d


# --- bad data files -------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("nan_first.npy", "row 0 contains NaN or infinity"),
    ("nan_middle.npy", "row 123 contains NaN or infinity"),
    ("inf_test_rows.npy", "row 290 contains NaN or infinity"),  # in the held-out rows: the file's row
])
def test_a_file_with_non_finite_rows_names_the_flag_file_and_row(files, name, expected):
    line = one_error_line(ksae_command("train", "--dataset", "array", "--path", name, *ARRAY_RUN,
                                       "--out", "out", cwd=files), "ksae train", 2)
    assert f"--path {name}: {expected}" in line


@pytest.mark.parametrize("name", ["text.npy", "empty.npy", "objects.npy", "pickled.npy"])
@pytest.mark.parametrize("flag", ["--path", "--test-path"])
def test_a_file_that_is_no_npy_matrix_is_refused_without_numpys_pickle_advice(files, name, flag):
    paths = ["--path", "w16.npy", "--test-path", name] if flag == "--test-path" else ["--path", name]
    line = one_error_line(ksae_command("train", "--dataset", "array", *paths, *ARRAY_RUN, cwd=files),
                          "ksae train", 2)
    assert line.startswith(f"ksae train: error: {flag}: ") and name in line
    assert "allow_pickle" not in line and "pickle.load" not in line


def test_a_streamed_file_with_nan_rows_names_the_flag_and_row(files):
    line = one_error_line(ksae_command("train", "--dataset", "array", "--path", "nan_middle.npy",
                                       "--stream", *ARRAY_RUN, "--out", "out", cwd=files), "ksae train", 1)
    assert "--path" in line and "row 123" in line and "nan_middle.npy" in line


def test_a_missing_file_names_its_flag(files):
    for flag in ("--path", "--test-path"):
        paths = ["--path", "w16.npy", flag, "none.npy"] if flag == "--test-path" else [flag, "none.npy"]
        line = one_error_line(ksae_command("train", "--dataset", "array", *paths, *ARRAY_RUN, cwd=files),
                              "ksae train", 2)
        assert f"{flag}: 'none.npy'" in line


# --- checkpoints and finished runs ------------------------------------------------------------

def _damage(path: Path, how: str) -> None:
    blob = bytearray(path.read_bytes())
    if how == "bit flip":
        blob[len(blob) // 2] ^= 0x10
    elif how == "truncated":
        blob = blob[:len(blob) // 2]
    elif how == "header cut":
        blob = blob[:6]
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("how", ["bit flip", "truncated", "header cut", "empty"])
def test_resuming_a_damaged_checkpoint_is_one_line_naming_the_file(files, tmp_path, how):
    run = tmp_path / "run"
    result = ksae_command("train", "--out", str(run), "--quiet", *TINY, "--epochs", "2",
                          "--checkpoint-every", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _damage(run / "checkpoint.safetensors", how)
    line = one_error_line(ksae_command("train", "--resume", str(run), "--epochs", "3", cwd=tmp_path),
                          "ksae train", 2)
    assert line.startswith("ksae train: error: --resume: ") and str(run / "checkpoint.safetensors") in line


def test_resuming_a_finished_run_says_so_and_writes_nothing(files, tmp_path):
    run = tmp_path / "run"
    assert ksae_command("train", "--out", str(run), "--quiet", *TINY, cwd=tmp_path).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    result = ksae_command("train", "--resume", str(run), cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines() == [
        (f"{run} is already complete (1 of 1 epochs trained; to train longer: ksae train --resume "
         f"{run} --epochs N with N > 1); nothing was written")]
    assert ksae_command("train", "--resume", str(run), "--epochs", "1", cwd=tmp_path).returncode == 0
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    line = one_error_line(ksae_command("train", "--resume", str(run), "--epochs", "0", cwd=tmp_path),
                          "ksae train", 2)
    assert "--epochs" in line
    assert ksae_command("train", "--resume", str(run), "--epochs", "2", "--quiet", cwd=tmp_path).returncode == 0
    assert ksae.load(run / "model").history_["loss"].__len__() == 2


# --- downloads --------------------------------------------------------------------------------

OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}
"""Every download goes to a closed local port: no network, and fast."""


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_image_data_errors_name_the_flags_not_the_python_arguments(tmp_path, dataset):
    if Path(f"/usr/share/datasets/{dataset}").is_dir():
        pytest.skip(f"a system copy of {dataset} is installed")
    env = {**OFFLINE, "KSAE_DATA": str(tmp_path / "cache")}
    line = one_error_line(ksae_command("train", "--dataset", dataset, "--quiet", cwd=tmp_path, env=env),
                          "ksae train", 1)
    assert "could not download" in line and "--path" in line and "data_dir" not in line
    line = one_error_line(ksae_command("train", "--dataset", dataset, "--no-download", cwd=tmp_path, env=env),
                          "ksae train", 2)
    assert "--download" in line and "--path" in line and "data_dir" not in line and "=True" not in line
    (tmp_path / "empty").mkdir()
    line = one_error_line(ksae_command("train", "--dataset", dataset, "--path", "empty", cwd=tmp_path, env=env),
                          "ksae train", 2)
    assert line.startswith("ksae train: error: --path: 'empty' lacks")


# --- the data against the model ---------------------------------------------------------------

@pytest.mark.parametrize("command", ["evaluate", "encode"])
@pytest.mark.parametrize("data, flag", [(["--dataset", "array", "--path", "w8.npy"], "--path w8.npy"),
                                        (["--d-in", "8"], "--d-in")])
def test_data_of_the_wrong_width_reads_as_a_sentence(files, command, data, flag):
    out = ["--out", "codes.npz"] if command == "encode" else []
    line = one_error_line(ksae_command(command, "run", *data, *out, cwd=files), f"ksae {command}", 2)
    assert line == (f"ksae {command}: error: {flag}: the data has 8 features per row; the model "
                    f"run/model expects 16")


# --- where the output goes --------------------------------------------------------------------

@pytest.mark.parametrize("kind, reason", [("loop", "loop of symbolic links"), ("loop inside", "loop of symbolic links"),
                                          ("dangling", "symbolic link to nothing"), ("file", "is not a directory")])
@pytest.mark.parametrize("command", ["train", "evaluate", "encode", "sweep"])
def test_an_output_path_that_cannot_be_a_directory_names_the_flag(files, tmp_path, kind, reason, command):
    if kind.startswith("loop"):
        os.symlink(tmp_path / "b", tmp_path / "a")
        os.symlink(tmp_path / "a", tmp_path / "b")
    elif kind == "dangling":
        os.symlink(tmp_path / "nowhere", tmp_path / "a")
    else:
        (tmp_path / "a").write_text("")
    base = tmp_path / "a" / "x" if kind == "loop inside" else tmp_path / "a"
    args = {"train": ["train", "--out", str(base), *TINY],
            "sweep": ["sweep", "--k", "2,3", "--out", str(base), *TINY[:10], "--epochs", "1"],
            "evaluate": ["evaluate", str(files / "run"), "--out", str(base / "e.json")],
            "encode": ["encode", str(files / "run"), "--out", str(base / "c.npz")]}[command]
    line = one_error_line(ksae_command(*args, cwd=tmp_path), f"ksae {command}", 2)
    assert line.startswith(f"ksae {command}: error: --out: ") and reason in line and "File exists" not in line


# --- flags ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, wrong, right", [
    (["train", "--n-latnets", "64"], "--n-latnets", "--n-latents"),
    (["train", "--epoch", "3"], "--epoch", "--epochs"),  # a prefix is no abbreviation
    (["train", "--n-latent", "64"], "--n-latent", "--n-latents"),
    (["train", "--batchsize=64"], "--batchsize=64", "--batch-size"),
    (["sweep", "--k", "2,3", "--lr-gama", "0.5"], "--lr-gama", "--lr-gamma"),
    (["evaluate", "run", "--test-fractoin", "0.3"], "--test-fractoin", "--test-fraction"),
    (["encode", "run", "--out", "c.npz", "--chunk-row", "9"], "--chunk-row", "--chunk-rows"),
    (["features", "run", "--out", "f.html", "--lates", "1"], "--lates", "--latents"),
])
def test_a_misspelled_or_shortened_flag_gets_did_you_mean(files, args, wrong, right):
    line = one_error_line(ksae_command(*args, cwd=files), f"ksae {args[0]}", 2)
    assert wrong in line and line.endswith(f"did you mean {right}?")


def test_ksae_train_entry_point_has_the_same_errors_and_debug(files):
    line = one_error_line(ksae_command("--epoch", "2", cwd=files, entry="ksae-train"), "ksae-train", 2)
    assert line.endswith("did you mean --epochs?")
    args = ["--dataset", "array", "--path", "nan_first.npy", *ARRAY_RUN]
    one_error_line(ksae_command(*args, cwd=files, entry="ksae-train"), "ksae-train", 2)
    shown = ksae_command(*args, "--debug", cwd=files, entry="ksae-train")
    assert "Traceback" in shown.stderr and "row 0 contains NaN" in shown.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(files, where):
    args = ["train", "--dataset", "array", "--path", "nan_middle.npy", *ARRAY_RUN]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    result = ksae_command(*args, cwd=files)
    assert result.returncode != 0 and "Traceback" in result.stderr and "row 123" in result.stderr


@pytest.mark.parametrize("args, status, expected", [
    (["train", "--k", "0"], 2, "--k: expected an integer >= 1, got 0"),
    (["train", "--n-latents", "8", "--k", "9"], 2, "--k: expected 1 <= k <= n_latents = 8, got 9"),
    (["train", "--lr", "1e30", *TINY, "--quiet", "--out", "diverged"], 1, "training diverged"),
    (["train", "--resume", "nowhere"], 2, "--resume: nowhere/checkpoint.safetensors not found"),
    (["train", "--dataset", "imagenet"], 2, "argument --dataset: invalid choice: 'imagenet'"),
    (["sweep", "--k", "2,40", *TINY[:10], "--n-latents", "32"], 2, "--k: expected 1 <= k <= n_latents = 32, got 40"),
    (["export", "--format", "saelens", "nowhere", "o"], 2, "MODEL_DIR: 'nowhere' is not a directory"),
    ([], 2, "the following arguments are required: COMMAND"),
])
def test_errors_at_the_command_line_and_at_run_time(files, args, status, expected):
    prog = f"ksae {args[0]}" if args else "ksae"
    assert expected in one_error_line(ksae_command(*args, cwd=files), prog, status)


def test_a_config_files_bad_value_names_the_file_and_key(files, tmp_path):
    (tmp_path / "c.toml").write_text("[model]\nk = 0\n")
    line = one_error_line(ksae_command("train", "--config", "c.toml", cwd=tmp_path), "ksae train", 2)
    assert "c.toml [model] k: expected an integer >= 1, got 0" in line


# --- help and defaults ------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "evaluate", "encode", "sweep", "export", "features", "harvest"])
def test_help_names_each_default_once_in_plain_text(files, command):
    result = ksae_command(command, "--help", cwd=files)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "``" not in text and "(default: None)" not in text
    assert not re.search(r"\(default:[^()]*(\([^()]*\)[^()]*)*\)\s*\(default:", text), text
    for section in ("model", "train", "data"):
        heading = re.search(rf"{section} options: (.*?)(?= --)", text)
        assert heading is None or heading.group(1).rstrip().endswith("."), heading


def test_the_defaults_follow_the_data_and_help_says_so(files, tmp_path):
    def model(*argv: str) -> tuple[int, int]:
        config = resolve(build_parser().parse_args(["train", *argv]))[0]["model"]
        return config.n_latents, config.k

    assert model() == (256, 4)
    api = ModelConfig()
    assert model("--dataset", "array", "--path", "x.npy") == (1024, 32) == (api.n_latents, api.k)
    assert model("--dataset", "store", "--path", "s", "--k", "8") == (1024, 8)
    (tmp_path / "c.toml").write_text('[data]\ndataset = "array"\npath = "x.npy"\n')
    assert model("--config", str(tmp_path / "c.toml")) == (1024, 32)
    text = " ".join(ksae_command("train", "--help", cwd=files).stdout.split())
    assert "(default: 256 with --dataset synthetic, else 1024)" in text
    assert "(default: 4 with --dataset synthetic, else 32)" in text
