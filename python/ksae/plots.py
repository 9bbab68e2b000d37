"""Figures for a trained model, written as PNG files.

Every ``plot_*`` function checks its inputs (raising ``TypeError``/``ValueError`` that name
the argument, what it got and what was expected), draws one figure and writes it to ``path``
(a ``.png`` file; missing parent directories are created), and returns that path.

Figures are plain ``matplotlib.figure.Figure`` objects saved with the Agg renderer: nothing
here touches ``pyplot``, so a user's interactive session, backend and open figures are left
alone, and no display is needed. ``import ksae`` does not import this module (matplotlib is
slow to import); ``import ksae.plots`` or ``ksae.plots`` on first use does.

``write_run_plots`` makes every applicable figure for a fitted model and returns the
``(caption, filename)`` list that ``ksae.report.write_report`` takes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

from .image_plots import plot_decoder_tiles, plot_reconstructions
from .metrics import best_cosine_similarities
from .plot_inputs import (DEFAULT_DPI, all_positive, history_records, history_series,
                          output_path, plot_line, positive_int, real_array, save_figure)
from .state import inference_k

if TYPE_CHECKING:
    from .estimator import SparseAutoencoder

__all__ = [
    "plot_training_curves", "firing_frequencies", "plot_firing_histogram", "plot_decoder_tiles",
    "plot_reconstructions", "plot_recovery", "plot_sweep", "plot_frontier", "write_run_plots",
]



# --------------------------------------------------------------------------- training curves
_PANEL_TITLES = {  # history key: (panel title, y label), drawn in this order after the loss
    "fve": ("Fraction of variance explained", "FVE"),
    "l0": ("L0: active latents per sample", "L0"),
    "dead_fraction": ("Dead latents", "fraction of latents"),
    "lr": ("Learning rate", "learning rate"),
}


def _epoch_panel(ax: Any, history: Mapping, key: str, epochs: np.ndarray, n: int) -> None:
    """``history[key]`` and, when recorded, ``history['val_' + key]`` against the epoch."""
    title, ylabel = ("Loss", "loss") if key == "loss" else _PANEL_TITLES[key]
    train = history_series(history, key, "history", n)
    plot_line(ax, epochs, train, label="train")
    shown = [train]
    if f"val_{key}" in history:
        shown.append(history_series(history, f"val_{key}", "history", n))
        plot_line(ax, epochs, shown[-1], label="validation")
        ax.legend(fontsize="small")
    if key == "loss" and all_positive(*shown):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)


def _step_panel(ax: Any, step_history: Mapping, steps: np.ndarray, n_steps: int, history: Mapping,
                n: int) -> None:
    """The loss per logged span of steps, with the epoch means at the step each epoch ended
    (when ``history`` records steps) to show the two on one scale."""
    loss = history_series(step_history, "loss", "step_history", n_steps)
    plot_line(ax, steps, loss, label="per logged span of steps", linewidth=1)
    shown = [loss]
    if "step" in history:
        shown.append(history_series(history, "loss", "history", n))
        ax.plot(history_series(history, "step", "history", n), shown[-1], "o", markersize=4, label="epoch mean")
        ax.legend(fontsize="small")
    if all_positive(*shown):
        ax.set_yscale("log")
    ax.set(title="Training loss per step", xlabel="optimizer step", ylabel="loss")


def _training_curves_figure(history: Mapping, step_history: Mapping | None) -> Figure:
    n, epochs = history_records(history, "history", "epoch")
    if step_history is not None and not isinstance(step_history, Mapping):
        raise TypeError(f"step_history: expected None or a dict of lists such as a fitted "
                        f"model's step_history_, got {type(step_history).__name__}")
    has_steps = bool(step_history)  # fit leaves it empty when log_every is 0
    if has_steps:
        n_steps, steps = history_records(step_history, "step_history", "step")
    panels = ["loss"] + (["step_loss"] if has_steps else []) + [key for key in _PANEL_TITLES if key in history]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    for i, panel in enumerate(panels, start=1):
        ax = fig.add_subplot(rows, cols, i)
        ax.grid(True, alpha=0.3)
        if panel == "step_loss":
            _step_panel(ax, step_history, steps, n_steps, history, n)
        else:
            _epoch_panel(ax, history, panel, epochs, n)
    return fig


def plot_training_curves(history: Mapping[str, Sequence[float]], path: str | os.PathLike,
                         step_history: Mapping[str, Sequence[float]] | None = None, *,
                         dpi: float = DEFAULT_DPI) -> Path:
    """Training curves from a model's ``history_`` (and optionally ``step_history_``).

    Panels: the training and validation loss per epoch (log scale when every value is
    positive); the loss per logged span of steps when ``step_history`` has records; and,
    for each of ``fve``, ``l0``, ``dead_fraction`` and ``lr`` present in ``history``, its
    curve per epoch (with the ``val_`` curve when present).

    ``history`` needs at least one ``loss`` value; every list used must have as many values
    as ``loss``. ``epoch`` (``step`` in ``step_history``) gives the x values when present.
    (``fit`` records the validation loss as the MSE; with ``loss="bce"`` the training loss
    is the binary cross-entropy, so the two curves then measure different things.)
    Returns ``path``.
    """
    out = output_path(path, dpi)
    return save_figure(_training_curves_figure(history, step_history), out, dpi)


# --------------------------------------------------------------------------- firing
def firing_frequencies(model: "SparseAutoencoder", X: Any, *, chunk: int = 4096) -> np.ndarray:
    """The fraction of the samples of ``X`` on which each latent fires (a non-zero value in
    the model's ``encode`` output), shape (n_latents,), float64; 0 marks a dead latent.

    ``X`` is encoded ``chunk`` rows at a time, so memory stays bounded for large data.
    """
    chunk = positive_int(chunk, "chunk")
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X: expected a 2-D array (n_samples, n_features) with at least one "
                         f"sample, got shape {X.shape}")
    n_latents = model.config.n_latents
    counts = np.zeros(n_latents, dtype=np.int64)
    for start in range(0, X.shape[0], chunk):
        values, indices = model.encode(X[start:start + chunk])
        # A latent appears at most once per row, so this counts samples, not activations.
        counts += np.bincount(indices[values != 0], minlength=n_latents)
    return counts / X.shape[0]


def _firing_histogram_figure(frequencies: Any, n_bins: int) -> Figure:
    freq = real_array(frequencies, "frequencies", ndim=1)
    n_bins = positive_int(n_bins, "n_bins")
    if freq.min() < 0 or freq.max() > 1:
        raise ValueError(f"frequencies: expected fractions in [0, 1], got values in "
                         f"[{freq.min():.4g}, {freq.max():.4g}]")
    live = freq[freq > 0]
    dead = freq.size - live.size
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xscale("log")
    if live.size:
        lo, hi = float(live.min()), float(live.max())
        if lo == hi:  # one value: give its bar some width on the log axis
            lo, hi = lo / 2, hi * 2
        # geomspace keeps both end points exact, so the smallest and largest frequencies
        # fall inside the first and last bins.
        ax.hist(live, bins=np.geomspace(lo, hi, n_bins + 1), color="tab:blue",
                label=f"{live.size} live latents")
        # Whole decades, so at least two labelled major ticks; unlabelled minor ticks, whose
        # labels would otherwise crowd into each other on a short axis.
        ax.set_xlim(10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xlim(1e-4, 1)
        ax.text(0.5, 0.5, "no latent fires", transform=ax.transAxes, ha="center", va="center")
    # Frequency 0 has no place on a log axis: an empty proxy entry states the count instead.
    ax.plot([], [], " ", label=f"{dead} dead latents (frequency 0, not shown)")
    ax.legend(fontsize="small")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=f"Latent firing frequency: {dead} of {freq.size} latents dead "
                 f"({100 * dead / freq.size:.1f}%)",
           xlabel="fraction of samples on which the latent fires (log scale)", ylabel="latents")
    return fig


def plot_firing_histogram(frequencies: Any, path: str | os.PathLike, *, n_bins: int = 50,
                          dpi: float = DEFAULT_DPI) -> Path:
    """Histogram of latent firing frequencies (as from ``firing_frequencies``) on a log x
    axis with ``n_bins`` log-spaced bins. Dead latents (frequency 0) cannot be shown on a log
    axis; their count is stated in the title and legend. Returns ``path``."""
    out = output_path(path, dpi)
    return save_figure(_firing_histogram_figure(frequencies, n_bins), out, dpi)


# --------------------------------------------------------------------------- recovery
def _recovery_figure(directions: Any, W_dec: Any, n_bins: int, threshold: float) -> Figure:
    T = real_array(directions, "directions", ndim=2)
    D = real_array(W_dec, "W_dec", ndim=2)
    if T.shape[1] != D.shape[1]:
        raise ValueError(f"directions, W_dec: expected the same width (d_in), got shapes {T.shape} and {D.shape}")
    n_bins = positive_int(n_bins, "n_bins")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
        raise ValueError(f"threshold: expected a cosine similarity in [-1, 1], got {threshold!r}")
    best = best_cosine_similarities(T, D)
    mean = float(best.mean())  # = ksae.dictionary_recovery(directions, W_dec)
    found = int((best >= threshold).sum())
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    # Bins up to at least 1, and past it when rounding puts an exact match at 1 + epsilon.
    ax.hist(best, bins=np.linspace(min(0.0, float(best.min())), max(1.0, float(best.max())), n_bins + 1),
            color="tab:blue", label=f"{best.size} true directions")
    ax.axvline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.4f} (dictionary recovery)")
    ax.axvline(threshold, color="grey", linestyle=":", label=f"{found} of {best.size} at or above {threshold:g}")
    ax.legend(fontsize="small", loc="upper left")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=f"Dictionary recovery: mean best cosine {mean:.4f}",
           xlabel="best cosine similarity of a true direction with any decoder row",
           ylabel="true directions")
    return fig


def plot_recovery(directions: Any, W_dec: Any, path: str | os.PathLike, *, n_bins: int = 40,
                  threshold: float = 0.9, dpi: float = DEFAULT_DPI) -> Path:
    """Ground-truth recovery on synthetic data: a histogram over the true ``directions``
    (n_directions, d_in) of each one's best cosine similarity with any row of ``W_dec``
    (n_latents, d_in), with their mean marked (it equals
    ``ksae.dictionary_recovery(directions, W_dec)``) and the count at or above
    ``threshold``. Returns ``path``."""
    out = output_path(path, dpi)
    return save_figure(_recovery_figure(directions, W_dec, n_bins, threshold), out, dpi)


# --------------------------------------------------------------------------- sweep
def _number(value: Any, name: str) -> float:
    if value is None:
        return math.nan  # a missing figure is a gap in its line
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number or None, got {type(value).__name__} {value!r}")
    return float(value)


def _columns(rows: Any, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The numeric columns ``keys`` of ``rows`` (dicts, one per sweep point), checked, sorted
    by the first key (which must be finite in every row; a None elsewhere is a gap)."""
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise TypeError(f"rows: expected a list of dicts (one per sweep point), got {type(rows).__name__}")
    if not rows:
        raise ValueError("rows: expected at least one row, got an empty list")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"rows[{i}]: expected a dict, got {type(row).__name__}")
        missing = [key for key in keys if key not in row]
        if missing:
            raise ValueError(f"rows[{i}]: expected keys {list(keys)}, missing {missing} (it has {list(row)})")
    x = keys[0]
    xs = np.array([_number(row[x], f"rows[{i}][{x!r}]") for i, row in enumerate(rows)])
    if not np.isfinite(xs).all():
        raise ValueError(f"rows: expected a finite {x!r} in every row, got {xs.tolist()}")
    order = np.argsort(xs, kind="stable")
    return {key: np.array([_number(rows[i][key], f"rows[{i}][{key!r}]") for i in order]) for key in keys}


def _scale_axes(ax: Any, xs: np.ndarray, ys: Sequence[np.ndarray]) -> None:
    """Log2 x where it spans 8x or more (sweeps double k); log y where every value is
    positive and spans 3x, with plain-number ticks at every digit of a decade (span under
    10x), at 1, 2 and 5 (under 1000x), or at the decades, so at least three show."""
    if (xs > 0).all() and xs.max() / xs.min() >= 8:
        ax.set_xscale("log", base=2)
    distinct = np.unique(xs[np.isfinite(xs)])
    if distinct.size <= 16:
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(distinct, [f"{v:g}" for v in distinct])
    values = np.concatenate([y[np.isfinite(y)] for y in ys])
    if all_positive(*ys) and values.max() / values.min() >= 3:
        ax.set_yscale("log")
        span = values.max() / values.min()
        subs = np.arange(1.0, 10.0) if span < 10 else (1.0, 2.0, 5.0) if span < 1000 else (1.0,)
        ax.yaxis.set_major_locator(LogLocator(subs=subs))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, alpha=0.3)


def _sweep_figure(rows: Any, x: str, series: str | Sequence[str], title: str | None,
                  labels: Mapping[str, str] | None = None, ylabel: str | None = None) -> Figure:
    names = (series,) if isinstance(series, str) else tuple(series)
    if not names or not all(isinstance(s, str) for s in names):
        raise ValueError(f"series: expected a metric name or a non-empty sequence of them, got {series!r}")
    if not isinstance(x, str):
        raise TypeError(f"x: expected the name of a column, got {type(x).__name__} {x!r}")
    columns = _columns(rows, (x, *names))
    labels = labels or {}
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for name in names:
        ax.plot(columns[x], columns[name], marker="o", label=labels.get(name, name))
    _scale_axes(ax, columns[x], [columns[n] for n in names])
    ax.legend(fontsize="small")
    shown = [labels.get(n, n) for n in names]
    ax.set(title=title or f"{', '.join(shown)} against {labels.get(x, x)}", xlabel=labels.get(x, x),
           ylabel=ylabel or (shown[0] if len(names) == 1 else ", ".join(shown)))
    return fig


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, x: str = "k",
               series: str | Sequence[str] = ("test_mse", "pca_mse"), *, title: str | None = None,
               labels: Mapping[str, str] | None = None, ylabel: str | None = None,
               dpi: float = DEFAULT_DPI) -> Path:
    """Metrics against a swept parameter: one line per name in ``series``, over the rows
    (dicts, one per sweep point, e.g. the per-k table of a k sweep) sorted by ``x``. Every
    row needs ``x`` and each series (``None`` leaves a gap). ``labels`` maps column names
    to the text shown (legend, axis); ``ylabel`` names the y axis. The y axis is
    logarithmic (ticks as plain numbers, at least three) when every value is positive and
    they span a factor of 3; the x axis is log2 when it spans a factor of 8 or more. Returns
    ``path``."""
    out = output_path(path, dpi)
    return save_figure(_sweep_figure(rows, x, series, title, labels, ylabel), out, dpi)


def _frontier_figure(rows: Any, title: str | None) -> Figure:
    sae = _columns(rows, ("test_l0", "test_fvu", "k"))
    pca = _columns(rows, ("k", "pca_fvu"))
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(sae["test_l0"], sae["test_fvu"], marker="o", label="k-sparse autoencoder")
    for l0, fvu, k in zip(sae["test_l0"], sae["test_fvu"], sae["k"]):
        ax.annotate(f"k={k:g}", (l0, fvu), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    ax.plot(pca["k"], pca["pca_fvu"], marker="s", linestyle="--", label="PCA, k components")
    _scale_axes(ax, np.concatenate([sae["test_l0"], pca["k"]]), [sae["test_fvu"], pca["pca_fvu"]])
    ax.margins(x=0.08)  # room for the last point's k label
    ax.legend(fontsize="small")
    ax.set(title=title or "Sparsity against reconstruction on the test split",
           xlabel="L0: active latents per test sample (PCA: components kept)",
           ylabel="FVU: fraction of test variance unexplained")
    return fig


def plot_frontier(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                  title: str | None = None, dpi: float = DEFAULT_DPI) -> Path:
    """The sparsity-accuracy frontier of a k sweep: test FVU against L0, the autoencoder's
    points labelled with their k, next to PCA with k components (FVU against k). Each row
    needs ``k``, ``test_l0``, ``test_fvu`` and ``pca_fvu`` (``ksae sweep``'s rows). Returns
    ``path``."""
    out = output_path(path, dpi)
    return save_figure(_frontier_figure(rows, title), out, dpi)


# --------------------------------------------------------------------------- a whole run
def write_run_plots(model: "SparseAutoencoder", run_dir: str | os.PathLike, X_test: Any, *,
                    image_shape: tuple[int, int] | None = None, directions: Any = None,
                    dpi: float = DEFAULT_DPI) -> list[tuple[str, str]]:
    """Write every applicable figure for a fitted ``model`` into ``run_dir`` (created if
    needed) and return their ``(caption, filename)`` pairs, ready for
    ``ksae.write_report(run_dir, ..., images=...)``.

    - ``training_curves.png``: from ``model.history_`` (and ``step_history_``), when the
      model has a per-epoch history (always after ``fit``; not after ``partial_fit`` only);
    - ``firing_histogram.png``: latent firing frequencies on ``X_test``;
    - ``decoder_tiles.png`` and ``reconstructions.png`` when ``image_shape`` (height, width)
      is given: the 64 most frequently firing decoder rows, and the first 10 test samples
      with their reconstructions;
    - ``recovery.png`` when the true ``directions`` of synthetic data are given.
    """
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"run_dir: expected a str or os.PathLike, got {type(run_dir).__name__}")
    run_dir = Path(run_dir)
    written: list[tuple[str, str]] = []
    history = getattr(model, "history_", None) or {}
    if len(history.get("loss", ())) > 0:
        plot_training_curves(history, run_dir / "training_curves.png",
                             getattr(model, "step_history_", None), dpi=dpi)
        written.append(("Training curves", "training_curves.png"))
    frequencies = firing_frequencies(model, X_test)
    plot_firing_histogram(frequencies, run_dir / "firing_histogram.png", dpi=dpi)
    written.append(("Latent firing frequencies on the test data", "firing_histogram.png"))
    if image_shape is not None:
        most_frequent_first = np.argsort(-frequencies, kind="stable")
        n_latents = frequencies.size
        plot_decoder_tiles(model.W_dec_, image_shape, run_dir / "decoder_tiles.png",
                           order=most_frequent_first, dpi=dpi,
                           title=f"Decoder rows: {min(64, n_latents)} of {n_latents}, most often firing first")
        written.append(("Decoder rows as images, most frequently firing first", "decoder_tiles.png"))
        originals = np.asarray(X_test)[:10]
        cfg = model.config
        label = f"k={cfg.k} (batchtopk)" if cfg.sparsity == "batchtopk" else f"k={inference_k(cfg)}"
        plot_reconstructions(originals, {label: model.reconstruct(originals)}, image_shape,
                             run_dir / "reconstructions.png", dpi=dpi)
        written.append(("Test samples (top) and their reconstructions", "reconstructions.png"))
    if directions is not None:
        plot_recovery(directions, model.W_dec_, run_dir / "recovery.png", dpi=dpi)
        written.append(("Recovery of the true dictionary directions", "recovery.png"))
    return written
