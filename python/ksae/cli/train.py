"""``ksae train``: train a model and write a run directory (model, metrics, config,
checkpoint, plots, report), with a progress bar, Ctrl-C checkpoints and ``--resume``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig, TrainConfig
from ..training import evaluate
from .data import ExperimentData, load_data
from .errors import UsageError, output_directory, run_errors, usage_errors
from .options import (FLAGS, Config, Tables, add_config_options, configure, experiment_defaults,
                      flag_name, flag_values, merge, read_config_file)

CHECKPOINT = "checkpoint.safetensors"
INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as a shell reports it."""


class Interrupted(Exception):
    """Ctrl-C stopped a command; ``message`` says what was saved and how to go on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--seed``, ``--quiet`` and ``--probe``, shared by train and sweep."""
    parser.add_argument("--config", type=Path,
                        help="TOML (.toml) or YAML (.yaml, .yml) file with model, train and data tables")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for the data and, unless --random-state is given, the model (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    parser.add_argument("--probe", action=argparse.BooleanOptionalAction, default=None,
                        help="fit a linear probe (softmax regression on the codes of the training "
                             "data) and report its test accuracy (default: on for labelled data, "
                             "mnist and fashion-mnist)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``ksae train``."""
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: runs/<date>-<time>; with --resume: RUN_DIR)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", default=None,
                        help="continue the run in RUN_DIR from its checkpoint, with its config.json "
                             "(only --epochs may change, to extend it)")
    add_common_arguments(parser)
    add_config_options(parser, ("model", "train", "data"))


def resolve(args: argparse.Namespace) -> tuple[Config, int]:
    """The validated config (defaults for the dataset < config file < flags) and the seed."""
    seed = 0 if args.seed is None else args.seed
    given: list[tuple[str | None, Tables]] = []
    if args.config is not None:
        given.append((str(args.config), read_config_file(args.config)))
    given.append((FLAGS, flag_values(args)))
    dataset = merge(*(tables for _, tables in given))["data"].get("dataset", "synthetic")
    return configure([(None, experiment_defaults(dataset)), *given], seed), seed


def total_steps(n_train: int, train_cfg: TrainConfig) -> int:
    """Optimizer steps of a run on ``n_train`` rows (less a validation split)."""
    n_fit = n_train - (int(round(n_train * train_cfg.validation_split)) if train_cfg.validation_split else 0)
    return train_cfg.epochs * math.ceil(n_fit / train_cfg.batch_size)


class Progress:
    """The fit callback behind the progress bar: a tqdm bar over the steps (on stderr) with
    the latest loss, L0 and dead fraction, and one line per epoch. Silent when ``quiet``.

    The dead fraction is the model's own (latents silent for ``dead_after_samples`` samples)
    when ``model`` is set, else the last epoch's (latents that fired on no sample of it): a
    step record's span of steps is too short to call a latent dead."""

    def __init__(self, total: int, train_cfg: TrainConfig, quiet: bool, description: str = "train") -> None:
        from tqdm import tqdm

        self.train_cfg = train_cfg
        self.model: Any = None
        self.dead: float | None = None
        self.quiet = quiet
        self.bar = tqdm(total=total, disable=quiet, file=sys.stderr, unit="step",
                        desc=description, dynamic_ncols=True, leave=False)

    def __call__(self, record: dict[str, Any]) -> None:
        event = record["event"]
        if self.quiet or event not in ("step", "epoch"):
            return
        if self.bar.n == 0 and record["step"] > 0:
            self.bar.reset(self.bar.total)  # a resumed run: count on from its step, time from now
        self.bar.update(max(0, record["step"] - self.bar.n))
        if self.model is not None:
            self.dead = float(np.mean(self.model.samples_since_fired_ >= self.train_cfg.dead_after_samples))
        elif event == "epoch":
            self.dead = record["dead_fraction"]
        postfix = {"loss": f"{record['loss']:.4g}", "L0": f"{record['l0']:.1f}"}
        if self.dead is not None:
            postfix["dead"] = f"{100 * self.dead:.1f}%"
        self.bar.set_postfix(postfix, refresh=False)
        if event == "epoch":
            test = f"  test fve {record['val_fve']:.4f}" if "val_fve" in record else ""
            self.bar.write(f"epoch {record['epoch']:>3}/{self.train_cfg.epochs}  loss {record['loss']:.5g}"
                           f"{test}  L0 {record['l0']:.1f}  dead {100 * record['dead_fraction']:.1f}%"
                           f"  {record['time']:.2f}s", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def bar_log_every(steps: int) -> int:
    """Steps between progress-bar updates: about 1% of the run."""
    return max(1, steps // 100)


def write_json(path: Path, data: Any) -> None:
    from ..serialization import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def resolved_config(config: Config, seed: int, probe: bool | None) -> dict[str, Any]:
    """What ``config.json`` holds: everything ``--resume`` needs to rebuild the run."""
    return {section: asdict(cfg) for section, cfg in config.items()} | {"seed": seed, "probe": probe}


def train_run(config: Config, data: ExperimentData, out: Path, *, seed: int, probe: bool | None,
              quiet: bool, resume_epochs: int | None = None, resume: bool = False) -> tuple[Any, dict[str, Any]]:
    """Train (or, with ``resume``, continue from ``out/checkpoint.safetensors``), then write
    the run directory; returns the model and its metrics. Raises ``Interrupted`` on Ctrl-C."""
    import ksae

    model_cfg: ModelConfig = config["model"]
    train_cfg: TrainConfig = config["train"]
    output_directory(out, "--out")
    checkpoint = out / CHECKPOINT
    write_json(out / "config.json", resolved_config(config, seed, probe))
    steps = total_steps(data.n_train, train_cfg)
    progress = Progress(steps, train_cfg, quiet)
    validation = None if train_cfg.validation_split else data.test
    try:
        with run_errors(X="--path"):  # X: the training rows, which only a file's can be wrong
            if resume:
                sae = ksae.resume(checkpoint, data.train, validation_data=validation, callback=progress,
                                  epochs=resume_epochs)
            else:
                # The bar needs step records; a user's own log_every is kept as given.
                fit_cfg = train_cfg if train_cfg.log_every or quiet else replace(train_cfg, log_every=bar_log_every(steps))
                sae = progress.model = ksae.SparseAutoencoder(**asdict(model_cfg))
                sae.fit(data.train, validation_data=validation, callback=progress, checkpoint=checkpoint,
                        **asdict(fit_cfg))
    except ksae.TrainingInterrupted as exc:
        raise Interrupted(f"interrupted after step {exc.step}; checkpoint saved to {exc.checkpoint}; "
                          f"resume with: ksae train --resume {out}") from None
    except KeyboardInterrupt:
        # Ctrl-C outside the steps (before the first one, say): the last checkpoint still resumes.
        if checkpoint.is_file():
            raise Interrupted(f"interrupted; the last checkpoint is {checkpoint}; resume with: "
                              f"ksae train --resume {out}") from None
        raise Interrupted("interrupted before training started; nothing to resume") from None
    finally:
        progress.close()
    return sae, write_outputs(sae, config, data, out, seed=seed, probe=probe)


def probe_accuracy(sae: Any, data: ExperimentData, seed: int) -> float:
    """Test accuracy of a softmax regression fitted on the training data's codes."""
    from ..probe import LinearProbe

    assert data.train_labels is not None and data.test_labels is not None
    probe = LinearProbe(random_state=seed, dtype=sae.config.dtype)
    probe.fit(sae.transform(data.train), data.train_labels)
    return probe.score(sae.transform(data.test), data.test_labels)


def wants_probe(probe: bool | None, data: ExperimentData, flag: str = "--probe") -> bool:
    """Whether to fit a probe: as asked, else for labelled data. Raises when asked without labels."""
    if probe and not data.labelled:
        raise ValueError(f"{flag}: a probe needs labelled data (mnist or fashion-mnist); "
                         f"{data.description.split(':')[0]} has no labels")
    return data.labelled if probe is None else probe


def write_outputs(sae: Any, config: Config, data: ExperimentData, out: Path, *, seed: int,
                  probe: bool | None) -> dict[str, Any]:
    """model/, metrics.json, plots and report.md/report.html of a trained model."""
    import ksae

    from ..plots import write_run_plots

    metrics: dict[str, Any] = {f"test_{name}": value for name, value in evaluate(sae, data.test).items()}
    if wants_probe(probe, data):
        metrics["probe_accuracy"] = probe_accuracy(sae, data, seed)
    history = sae.history_
    seconds = float(sum(history["time"]))  # training only, summed over resumed sessions
    epochs_done = len(history["loss"])
    metrics.update({
        "train_loss": history["loss"][-1],
        "train_seconds": seconds,
        "train_samples_per_second": data.n_train * epochs_done / seconds if seconds > 0 else None,
        "epochs": epochs_done,
        "steps": sae.n_iter_,
        "n_train": data.n_train,
        "n_test": int(len(data.test)),
    })
    if data.directions is not None:
        metrics["dictionary_recovery"] = ksae.dictionary_recovery(data.directions, sae.W_dec_)
    sae.save(out / "model")
    write_json(out / "metrics.json", metrics | {"history": history, "ksae_version": ksae.__version__,
                                               "build": ksae.build_info()})
    images = write_run_plots(sae, out, data.test, image_shape=data.image_shape, directions=data.directions)
    model_cfg = config["model"]
    ksae.write_report(out, f"ksae run: {config['data'].dataset}, n_latents={model_cfg.n_latents}, "
                      f"k={model_cfg.k}", metrics, images,
                      notes=f"Data: {data.description}.\n\nConfiguration: {out / 'config.json'}.")
    return metrics


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline figures printed at the end of a run."""
    keys = ("test_mse", "test_fve", "test_l0", "test_dead_fraction", "probe_accuracy",
            "dictionary_recovery", "train_seconds")
    return {key: metrics[key] for key in keys if key in metrics}


def config_from_run(run_dir: Path) -> tuple[Config, int, bool | None]:
    """The config, seed and probe setting a run directory's ``config.json`` records."""
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: is {str(run_dir)!r} a run directory of ksae train?") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(saved, dict):
        raise TypeError(f"{path} must hold an object with model, train and data tables, got "
                         f"{type(saved).__name__}")
    seed = saved.get("seed", 0)
    tables = {section: saved.get(section, {}) for section in ("model", "train", "data")}
    return configure([(str(path), tables)], seed), seed, saved.get("probe")


def train_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``ksae train`` (or ``ksae-train``) with parsed arguments."""
    if args.resume is not None:
        return _resume_command(args)
    with usage_errors():
        config, seed = resolve(args)
        data = load_data(config["data"], seed, config["model"].dtype)
        wants_probe(args.probe, data)
    out = args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    _, metrics = train_run(config, data, out, seed=seed, probe=args.probe, quiet=args.quiet)
    _print_done(out, metrics)
    return 0


def _resume_command(args: argparse.Namespace) -> int:
    """``ksae train --resume RUN_DIR``: continue the run, or say that it is already complete."""
    import ksae

    run_dir: Path = args.resume
    extra = [flag_name(name) for section, table in flag_values(args).items() for name in table
             if (section, name) != ("train", "epochs")]
    extra += [flag for flag, value in (("--config", args.config), ("--seed", args.seed),
                                      ("--probe", args.probe)) if value is not None]
    if extra:
        raise UsageError(f"--resume: the run's configuration comes from {run_dir / 'config.json'}; "
                         f"only --epochs (and --out, --quiet) may be given, not {', '.join(extra)}")
    epochs = flag_values(args).get("train", {}).get("epochs")
    with usage_errors(checkpoint="--resume"):
        if not (run_dir / CHECKPOINT).is_file():
            raise FileNotFoundError(f"--resume: {run_dir / CHECKPOINT} not found: is {str(run_dir)!r} "
                                    "a run directory of ksae train?")
        saved = ksae.load_checkpoint(run_dir / CHECKPOINT)
        config, seed, probe = config_from_run(run_dir)
        complete = already_complete(run_dir, saved, epochs)
        if complete is not None:
            print(complete)
            return 0
        if epochs is not None:
            config["train"] = TrainConfig(**{**asdict(config["train"]), "epochs": epochs})
        data = load_data(config["data"], seed, config["model"].dtype)
    out = args.out or run_dir
    if out.resolve() != run_dir.resolve():
        import shutil

        output_directory(out, "--out")
        shutil.copyfile(run_dir / CHECKPOINT, out / CHECKPOINT)
    _, metrics = train_run(config, data, out, seed=seed, probe=probe, quiet=args.quiet,
                           resume_epochs=epochs, resume=True)
    _print_done(out, metrics)
    return 0


def already_complete(run_dir: Path, saved: Any, epochs: int | None) -> str | None:
    """What to say when the run of ``run_dir`` (its checkpoint ``saved``) has nothing left to
    train for ``--epochs`` (None: the run's own count) and its outputs are written; else None.
    Raises ValueError for an ``--epochs`` below the epochs already trained."""
    position = saved.position
    done = position.epoch - 1  # epochs completed (the one in progress is position.epoch)
    if epochs is not None and epochs < done:
        raise ValueError(f"--epochs: the run in {run_dir} has already trained {done} epochs; give "
                         f"more than {done} to extend it")
    target = saved.train_config.epochs if epochs is None else epochs
    finished = position.stopped or (done >= target and position.batches_done == 0)
    if not finished or not (run_dir / "model").is_dir() or not (run_dir / "metrics.json").is_file():
        return None  # still to train, or trained with its outputs still to write
    how = (f"early stopping ended it after {done} epochs" if position.stopped else
           f"{done} of {target} epochs trained; to train longer: ksae train --resume {run_dir} "
           f"--epochs N with N > {done}")
    return f"{run_dir} is already complete ({how}); nothing was written"


def _print_done(out: Path, metrics: dict[str, Any]) -> None:
    print(f"wrote {out}: model/, metrics.json, config.json, {CHECKPOINT}, report.html")
    print(json.dumps(summary(metrics), indent=2))
