"""Figures (ksae.plots) and the report page (ksae.report).

Each plot function must write a real PNG of the figure's size and refuse bad input with an
error naming the argument; what a figure says (dead-latent counts, the recovery mean, the
tile order) is checked on the Figure its private builder returns, before it is rasterised.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import ksae
from ksae import image_plots, plots
from ksae.report import format_value, write_report

DPI = 40  # small files, fast tests; the layout does not depend on it

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, figure) -> None:
    """``path`` is a PNG of ``figure``'s size at DPI pixels per inch."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    width, height = figure.get_size_inches() * DPI
    assert image.shape[:2] == (round(height), round(width))
    assert image.shape[0] > 0 and image.shape[1] > 0
    # Not a blank canvas: something was drawn.
    assert np.ptp(image[..., :3]) > 0


def history(n_epochs: int = 4, validation: bool = True) -> dict[str, list]:
    h = {"epoch": list(range(1, n_epochs + 1)), "step": [10 * e for e in range(1, n_epochs + 1)],
         "loss": [0.5 / e for e in range(1, n_epochs + 1)], "fve": [0.2 * e for e in range(1, n_epochs + 1)],
         "l0": [4.0] * n_epochs, "dead_fraction": [0.1] * n_epochs, "lr": [1e-3] * n_epochs,
         "time": [0.1] * n_epochs}
    if validation:
        h.update({"val_loss": [0.6 / e for e in range(1, n_epochs + 1)], "val_fve": h["fve"],
                  "val_l0": h["l0"], "val_dead_fraction": [0.2] * n_epochs})
    return h


@pytest.fixture(scope="module")
def trained():
    """A tiny model on 8x8 "images": (model, X_test, true directions)."""
    data = ksae.make_sparse_dictionary(n_samples=320, d_in=64, n_components=48, n_active=3, random_state=0)
    X, X_val = data.X[:256], data.X[256:]
    model = ksae.SparseAutoencoder(n_latents=32, k=4, random_state=0).fit(
        X, epochs=2, batch_size=32, validation_data=X_val)
    return model, X_val, data.directions


# --------------------------------------------------------------------------- packaging
def test_import_ksae_leaves_matplotlib_unloaded_until_plots_is_used(tmp_path):
    # Plotting must not go through pyplot either: it would claim a backend and hold global
    # figure state in the user's session.
    code = ("import sys, ksae; assert 'matplotlib' not in sys.modules, 'import ksae loaded matplotlib'; "
            "ksae.write_report; "
            f"ksae.plots.plot_firing_histogram([0.0, 0.5], {str(tmp_path / 'h.png')!r}, dpi=20); "
            "assert 'matplotlib' in sys.modules; "
            "assert 'matplotlib.pyplot' not in sys.modules, 'plotting imported pyplot'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "h.png").is_file()


def test_unknown_attribute_of_ksae_still_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        ksae.no_such_thing  # noqa: B018


@pytest.mark.parametrize("path, error", [("figure.jpg", ValueError), (42, TypeError)])
def test_plot_path_must_name_a_png(tmp_path, path, error):
    target = tmp_path / path if isinstance(path, str) else path
    with pytest.raises(error, match="path"):
        plots.plot_sweep([{"k": 1, "mse": 1.0}], target, series="mse", dpi=DPI)


@pytest.mark.parametrize("dpi", [0, -5, float("nan"), "100", True])
def test_plot_dpi_must_be_positive(tmp_path, dpi):
    with pytest.raises(ValueError, match="dpi"):
        plots.plot_sweep([{"k": 1, "mse": 1.0}], tmp_path / "s.png", series="mse", dpi=dpi)


def test_missing_parent_directories_are_created(tmp_path):
    out = plots.plot_firing_histogram([0.0, 0.5], tmp_path / "a" / "b" / "h.png", dpi=DPI)
    assert out == tmp_path / "a" / "b" / "h.png" and out.is_file()


# --------------------------------------------------------------------------- training curves
def test_training_curves_png_with_validation_and_steps(tmp_path):
    steps = {"step": [5, 10, 15, 20], "loss": [0.6, 0.5, 0.4, 0.35], "epoch": [1, 1, 2, 2]}
    out = plots.plot_training_curves(history(), tmp_path / "curves.png", steps, dpi=DPI)
    assert out == tmp_path / "curves.png"
    fig = plots._training_curves_figure(history(), steps)
    assert_png(out, fig)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Loss", "Training loss per step", "Fraction of variance explained",
                      "L0: active latents per sample", "Dead latents", "Learning rate"]
    loss_ax, step_ax = fig.axes[0], fig.axes[1]
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train", "validation"]
    np.testing.assert_allclose(loss_ax.get_lines()[1].get_ydata(), history()["val_loss"])
    assert loss_ax.get_yscale() == "log" and step_ax.get_yscale() == "log"
    np.testing.assert_allclose(step_ax.get_lines()[0].get_xdata(), steps["step"])


def test_training_curves_without_validation_or_steps():
    fig = plots._training_curves_figure(history(validation=False), {})
    assert "Training loss per step" not in [ax.get_title() for ax in fig.axes]
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["train"]


def test_training_curves_linear_scale_when_a_loss_is_not_positive():
    h = history()
    h["loss"][-1] = 0.0
    assert plots._training_curves_figure(h, None).axes[0].get_yscale() == "linear"


def test_training_curves_only_loss():
    fig = plots._training_curves_figure({"loss": [1.0]}, None)
    assert len(fig.axes) == 1
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_xdata(), [1])


@pytest.mark.parametrize("bad, error, match", [
    ({}, ValueError, "history"),
    ({"loss": []}, ValueError, "history"),
    ([0.1, 0.2], TypeError, "history"),
    ({"loss": [1.0, 0.5], "val_loss": [1.0]}, ValueError, "val_loss"),
    ({"loss": [1.0, 0.5], "epoch": [1]}, ValueError, "epoch"),
    ({"loss": ["a", "b"]}, TypeError, "loss"),
    ({"loss": 0.5}, ValueError, "loss"),
])
def test_training_curves_reject_bad_history(tmp_path, bad, error, match):
    with pytest.raises(error, match=match):
        plots.plot_training_curves(bad, tmp_path / "c.png", dpi=DPI)


@pytest.mark.parametrize("bad, error", [
    ({"step": [1, 2], "loss": [1.0]}, ValueError),
    ({"step": [1, 2]}, ValueError),
    ([1.0], TypeError),
])
def test_training_curves_reject_bad_step_history(tmp_path, bad, error):
    with pytest.raises(error, match="step_history"):
        plots.plot_training_curves(history(), tmp_path / "c.png", bad, dpi=DPI)


# --------------------------------------------------------------------------- firing
def test_firing_frequencies_match_dense_codes(trained):
    model, X, _ = trained
    expected = (model.transform(X) != 0).mean(axis=0)
    np.testing.assert_array_equal(plots.firing_frequencies(model, X), expected)
    np.testing.assert_array_equal(plots.firing_frequencies(model, X, chunk=7), expected)
    assert plots.firing_frequencies(model, X).shape == (32,)


def test_firing_frequencies_count_nonzero_values_only():
    class FixedCodes:
        """encode: latent 0 kept with value 0 on every row (as a relu can give), latent 2
        firing on every row, latent 1 on the first row only."""

        config = ksae.ModelConfig(n_latents=4, k=2)

        def encode(self, X):
            n = len(X)
            values = np.tile([1.0, 0.0], (n, 1))
            indices = np.tile([2, 0], (n, 1))
            if n and X[0, 0] == 1:
                values[0], indices[0] = [1.0, 1.0], [2, 1]
            return ksae.SparseCode(values, indices)

    X = np.zeros((4, 3))
    X[0, 0] = 1
    np.testing.assert_array_equal(plots.firing_frequencies(FixedCodes(), X, chunk=3), [0, 0.25, 1, 0])


@pytest.mark.parametrize("X, chunk, error, match", [
    (np.zeros(64), 10, ValueError, "X"),
    (np.zeros((0, 64)), 10, ValueError, "X"),
    (np.zeros((3, 64)), 0, ValueError, "chunk"),
    (np.zeros((3, 64)), 1.5, TypeError, "chunk"),
    (np.zeros((3, 65)), 10, ValueError, "X"),
])
def test_firing_frequencies_reject_bad_input(trained, X, chunk, error, match):
    with pytest.raises(error, match=match):
        plots.firing_frequencies(trained[0], X, chunk=chunk)


def test_firing_histogram_states_dead_latents(tmp_path, rng):
    freq = np.concatenate([np.zeros(3), rng.uniform(1e-4, 0.5, size=29)])
    out = plots.plot_firing_histogram(freq, tmp_path / "firing.png", dpi=DPI)
    fig = plots._firing_histogram_figure(freq, 50)
    assert_png(out, fig)
    ax = fig.axes[0]
    assert "3 of 32 latents dead" in ax.get_title()
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["29 live latents", "3 dead latents (frequency 0, not shown)"]
    assert ax.get_xscale() == "log"
    # Every live latent, the smallest and the largest included, lands in a bar...
    assert sum(patch.get_height() for patch in ax.patches) == 29
    # ... of log-spaced bins: equal widths on the log axis.
    edges = np.array([patch.get_x() for patch in ax.patches] + [ax.patches[-1].get_x() + ax.patches[-1].get_width()])
    assert len(ax.patches) == 50
    np.testing.assert_allclose(np.diff(np.log(edges)), np.log(edges[-1] / edges[0]) / 50)


def test_firing_histogram_all_dead_or_one_value(tmp_path):
    fig = plots._firing_histogram_figure(np.zeros(8), 10)
    assert "8 of 8 latents dead" in fig.axes[0].get_title()
    fig = plots._firing_histogram_figure(np.full(4, 0.25), 10)
    assert sum(patch.get_height() for patch in fig.axes[0].patches) == 4
    assert_png(plots.plot_firing_histogram(np.zeros(8), tmp_path / "dead.png", dpi=DPI),
               plots._firing_histogram_figure(np.zeros(8), 50))


@pytest.mark.parametrize("freq, error", [
    ([0.1, 1.5], ValueError), ([-0.1, 0.5], ValueError), ([[0.1, 0.2]], ValueError),
    ([], ValueError), ([0.1, float("nan")], ValueError), (["a"], TypeError),
])
def test_firing_histogram_rejects_bad_frequencies(tmp_path, freq, error):
    with pytest.raises(error, match="frequencies"):
        plots.plot_firing_histogram(freq, tmp_path / "h.png", dpi=DPI)


# --------------------------------------------------------------------------- decoder tiles
def test_decoder_tiles_png_and_order(tmp_path, rng):
    W = rng.standard_normal((20, 12))  # 3x4 images
    order = np.arange(20)[::-1]
    out = plots.plot_decoder_tiles(W, (3, 4), tmp_path / "tiles.png", n_tiles=6, order=order, dpi=DPI)
    fig = image_plots._decoder_tiles_figure(W, (3, 4), 6, order, None)
    assert_png(out, fig)
    image = fig.axes[0].get_images()[0]
    assert image.get_clim() == (-1, 1)
    mosaic = np.ma.filled(image.get_array(), np.nan)
    # 6 tiles in 3 columns, 2 rows, gaps of 1: the first tile is row 19, scaled to max |x| = 1.
    assert mosaic.shape == (2 * 4 + 1, 3 * 5 + 1)
    first = W[19].reshape(3, 4)
    np.testing.assert_allclose(mosaic[1:4, 1:5], first / np.abs(first).max())
    assert np.nanmax(np.abs(mosaic)) == pytest.approx(1)
    assert np.isnan(mosaic).sum() == mosaic.size - 6 * 12
    assert "6 of 20" in fig.axes[0].get_title()


def test_decoder_tiles_zero_row_and_more_tiles_than_rows():
    W = np.zeros((2, 4))
    fig = image_plots._decoder_tiles_figure(W, np.array([2, 2]), 64, None, "custom title")
    mosaic = np.ma.filled(fig.axes[0].get_images()[0].get_array(), np.nan)
    assert np.nansum(np.abs(mosaic)) == 0 and (~np.isnan(mosaic)).sum() == 8
    assert fig.axes[0].get_title() == "custom title"


@pytest.mark.parametrize("W, shape, order, error, match", [
    (np.zeros((4, 10)), (3, 3), None, ValueError, "W_dec"),
    (np.zeros((4, 9)), (9,), None, ValueError, "image_shape"),
    (np.zeros((4, 9)), (3, 0), None, ValueError, "image_shape"),
    (np.zeros((4, 9)), (3.0, 3), None, TypeError, "image_shape"),
    (np.zeros(9), (3, 3), None, ValueError, "W_dec"),
    (np.zeros((4, 9)), (3, 3), [0, 4], ValueError, "order"),
    (np.zeros((4, 9)), (3, 3), [1, 1], ValueError, "order"),
    (np.zeros((4, 9)), (3, 3), [0.5, 1.0], TypeError, "order"),
])
def test_decoder_tiles_reject_bad_input(tmp_path, W, shape, order, error, match):
    with pytest.raises(error, match=match):
        plots.plot_decoder_tiles(W, shape, tmp_path / "t.png", order=order, dpi=DPI)


# --------------------------------------------------------------------------- reconstructions
def test_reconstructions_rows_per_label(tmp_path, rng):
    X = rng.random((12, 6))
    recs = {"k=2": X + 0.1, "k=4": X + 0.01}
    out = plots.plot_reconstructions(X, recs, (2, 3), tmp_path / "rec.png", n_images=5, dpi=DPI)
    fig = image_plots._reconstructions_figure(X, recs, (2, 3), 5)
    assert_png(out, fig)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels[0] == "original"
    assert labels[1].startswith("k=2\nMSE 0.01") and labels[2].startswith("k=4\nMSE 0.0001")
    strips = [np.ma.filled(ax.get_images()[0].get_array(), np.nan) for ax in fig.axes]
    assert all(strip.shape == (2 + 2, 5 * 4 + 1) for strip in strips)  # 5 images, gaps of 1
    np.testing.assert_allclose(strips[0][1:3, 1:4], X[0].reshape(2, 3))


def test_reconstructions_single_array(tmp_path, rng):
    X = rng.random((3, 4))
    out = plots.plot_reconstructions(X, X * 0.5, (2, 2), tmp_path / "rec.png", dpi=DPI)
    fig = image_plots._reconstructions_figure(X, X * 0.5, (2, 2), 10)
    assert_png(out, fig)
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel().startswith("reconstruction")


@pytest.mark.parametrize("recs, shape, error, match", [
    ({"k=1": np.zeros((4, 6))}, (2, 3), ValueError, r"reconstructions\['k=1'\]"),
    (np.zeros((5, 5)), (2, 3), ValueError, "reconstructions"),
    ({}, (2, 3), ValueError, "reconstructions"),
    ({1: np.zeros((5, 6))}, (2, 3), TypeError, "reconstructions"),
    (np.zeros((5, 6)), (3, 3), ValueError, "originals"),
])
def test_reconstructions_reject_mismatches(tmp_path, recs, shape, error, match):
    with pytest.raises(error, match=match):
        plots.plot_reconstructions(np.zeros((5, 6)), recs, shape, tmp_path / "r.png", dpi=DPI)


# --------------------------------------------------------------------------- recovery
def test_recovery_mean_is_dictionary_recovery(tmp_path, rng):
    W = rng.standard_normal((30, 16))
    directions = np.concatenate([W[:10] * 3.0, rng.standard_normal((5, 16))])  # 10 exact matches
    out = plots.plot_recovery(directions, W, tmp_path / "recovery.png", dpi=DPI)
    fig = plots._recovery_figure(directions, W, 40, 0.9)
    assert_png(out, fig)
    ax = fig.axes[0]
    expected = ksae.dictionary_recovery(directions, W)
    mean_line = ax.get_lines()[0]
    assert mean_line.get_xdata()[0] == pytest.approx(expected)
    assert f"{expected:.4f}" in ax.get_title()
    # Every direction is counted, the exact matches (cosine 1, up to rounding) included.
    assert sum(patch.get_height() for patch in ax.patches) == 15
    assert "10 of 15 at or above 0.9" in [text.get_text() for text in ax.get_legend().get_texts()]


def test_best_cosine_similarities_mean_is_dictionary_recovery(rng):
    from ksae.metrics import best_cosine_similarities

    T, W = rng.standard_normal((7, 5)), rng.standard_normal((11, 5))
    best = best_cosine_similarities(T, W)
    assert best.shape == (7,)
    cos = (T / np.linalg.norm(T, axis=1, keepdims=True)) @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T
    np.testing.assert_allclose(best, cos.max(axis=1))
    assert best.mean() == pytest.approx(ksae.dictionary_recovery(T, W))


@pytest.mark.parametrize("T, W, kwargs, error, match", [
    (np.zeros((3, 4)), np.zeros((5, 6)), {}, ValueError, "directions, W_dec"),
    (np.zeros(4), np.zeros((5, 4)), {}, ValueError, "directions"),
    (np.ones((3, 4)), np.ones((5, 4)), {"threshold": 2.0}, ValueError, "threshold"),
    (np.ones((3, 4)), np.ones((5, 4)), {"n_bins": 0}, ValueError, "n_bins"),
])
def test_recovery_rejects_bad_input(tmp_path, T, W, kwargs, error, match):
    with pytest.raises(error, match=match):
        plots.plot_recovery(T, W, tmp_path / "r.png", dpi=DPI, **kwargs)


# --------------------------------------------------------------------------- sweep
def test_sweep_sorted_log_lines(tmp_path):
    rows = [{"k": 16, "test_mse": 0.01, "pca_mse": 0.1}, {"k": 2, "test_mse": 0.2, "pca_mse": 0.5},
            {"k": 4, "test_mse": 0.1, "pca_mse": None}]
    out = plots.plot_sweep(rows, tmp_path / "sweep.png", dpi=DPI)
    fig = plots._sweep_figure(rows, "k", ("test_mse", "pca_mse"), None)
    assert_png(out, fig)
    ax = fig.axes[0]
    test_line, pca_line = ax.get_lines()
    np.testing.assert_array_equal(test_line.get_xdata(), [2, 4, 16])
    np.testing.assert_array_equal(test_line.get_ydata(), [0.2, 0.1, 0.01])
    assert np.isnan(pca_line.get_ydata()[1])  # None: a gap
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["test_mse", "pca_mse"]


def test_sweep_single_series_name_and_linear_scale():
    fig = plots._sweep_figure([{"k": 1, "fve": -0.5}, {"k": 2, "fve": 0.5}], "k", "fve", "FVE")
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 1 and ax.get_yscale() == "linear" and ax.get_xscale() == "linear"
    assert ax.get_title() == "FVE"


def test_sweep_labels_name_the_lines_and_the_axis_and_log_ticks_are_readable():
    rows = [{"k": 2, "test_mse": 0.05, "pca_mse": 0.09}, {"k": 8, "test_mse": 0.02, "pca_mse": 0.04}]
    fig = plots._sweep_figure(rows, "k", ("test_mse", "pca_mse"), None,
                              {"test_mse": "test MSE", "pca_mse": "PCA MSE"}, "MSE")
    ax = fig.axes[0]
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["test MSE", "PCA MSE"]
    assert ax.get_ylabel() == "MSE" and ax.get_yscale() == "log"
    shown = [t.get_text() for t in ax.get_yticklabels() if t.get_text()
             and ax.get_ylim()[0] <= t.get_position()[1] <= ax.get_ylim()[1]]
    assert len(shown) >= 3 and "0.05" in shown  # plain numbers, at least three ticks


def test_frontier_plots_fvu_against_l0_with_pca(tmp_path):
    rows = [{"k": 4, "test_l0": 4.0, "test_fvu": 0.30, "pca_fvu": 0.45},
            {"k": 16, "test_l0": 15.5, "test_fvu": 0.10, "pca_fvu": 0.25},
            {"k": 8, "test_l0": 8.0, "test_fvu": 0.18, "pca_fvu": None}]
    out = plots.plot_frontier(rows, tmp_path / "frontier.png", dpi=DPI)
    fig = plots._frontier_figure(rows, None)
    assert_png(out, fig)
    ax = fig.axes[0]
    sae, pca = ax.get_lines()
    np.testing.assert_array_equal(sae.get_xdata(), [4.0, 8.0, 15.5])
    np.testing.assert_array_equal(sae.get_ydata(), [0.30, 0.18, 0.10])
    np.testing.assert_array_equal(pca.get_xdata(), [4, 8, 16])
    assert np.isnan(pca.get_ydata()[1])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["k-sparse autoencoder", "PCA, k components"]
    assert ax.get_xlabel().startswith("L0") and ax.get_ylabel().startswith("FVU")
    assert sorted(t.get_text() for t in ax.texts) == ["k=16", "k=4", "k=8"]
    with pytest.raises(ValueError, match=r"rows\[0\].*pca_fvu"):
        plots.plot_frontier([{"k": 1, "test_l0": 1, "test_fvu": 0.5}], tmp_path / "f.png", dpi=DPI)


@pytest.mark.parametrize("rows, error, match", [
    ([], ValueError, "rows"),
    ({"k": 1}, TypeError, "rows"),
    ([{"k": 1, "test_mse": 0.1}], ValueError, r"rows\[0\].*pca_mse"),
    ([{"k": 1, "test_mse": 0.1, "pca_mse": 0.2}, 3], TypeError, r"rows\[1\]"),
    ([{"k": "one", "test_mse": 0.1, "pca_mse": 0.2}], TypeError, r"rows\[0\]\['k'\]"),
    ([{"k": None, "test_mse": 0.1, "pca_mse": 0.2}], ValueError, "'k'"),
])
def test_sweep_rejects_bad_rows(tmp_path, rows, error, match):
    with pytest.raises(error, match=match):
        plots.plot_sweep(rows, tmp_path / "s.png", dpi=DPI)


# --------------------------------------------------------------------------- report
@pytest.fixture
def figure_file(tmp_path) -> str:
    plots.plot_sweep([{"k": 1, "mse": 1.0}], tmp_path / "sweep plot.png", series="mse", dpi=DPI)
    return "sweep plot.png"


def test_report_holds_metrics_table_and_images(tmp_path, figure_file):
    metrics = {"test_mse": 0.012345678, "steps": 40, "rate": 152345.67, "tiny": 1.5e-7,
               "history": {"loss": [1.0, 0.5]}, "per_epoch": [1, 2], "flag": True,
               "dead": np.float32(0.25), "nothing": float("nan")}
    table = [{"k": 4, "test_mse": 0.5}, {"k": 8, "test_mse": 0.25, "pca_mse": 0.75}]
    out = write_report(tmp_path, "A run", metrics, [("A sweep", figure_file)], notes="Seed 0.", table=table)
    assert out == tmp_path / "report.html"
    md = (tmp_path / "report.md").read_text()
    page = out.read_text()
    for text in (md, page):
        for value in ("0.01235", "| 40 |" if text is md else ">40<", "152346", "1.500e-07", "0.25",
                      "True", "nan", "0.75", "Seed 0.", "A sweep"):
            assert value in text, (value, text)
        assert "history" not in text and "per_epoch" not in text  # nested values are left out
    assert "![A sweep](sweep%20plot.png)" in md
    assert '<img src="sweep%20plot.png" alt="A sweep">' in page
    assert "| k | test_mse | pca_mse |" in md
    assert "| 4 | 0.5 |  |" in md and "| 8 | 0.25 | 0.75 |" in md
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_report_escapes_html(tmp_path):
    write_report(tmp_path, "Run <b>1</b> & co", {"<script>alert(1)</script>": 1.0}, [],
                 notes='He said "<i>hi</i>"', table=[{"<td>": "<img src=x>"}])
    page = (tmp_path / "report.html").read_text()
    body = page.split("</style>", 1)[1]
    assert "<script>" not in page and "<i>" not in body and "<img src=x>" not in page and "<b>" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Run &lt;b&gt;1&lt;/b&gt; &amp; co" in page
    assert "&lt;img src=x&gt;" in page and "&lt;td&gt;" in page


def _unescaped_pipes(line: str) -> int:
    return sum(1 for i, c in enumerate(line) if c == "|" and (i == 0 or line[i - 1] != "\\"))


def test_report_escapes_markdown(tmp_path):
    write_report(tmp_path, "a | b", {"x|y": 1.0, "test_mse": 2.0, "*bold*": 3.0, "<b>": 4.0},
                 [], table=[{"a|b": "c|d", "e": "f\nnext line"}], notes="- not a list\n\n1. not a list")
    md = (tmp_path / "report.md").read_text().splitlines()
    assert md[0] == r"# a \| b"
    rows = [line for line in md if line.startswith("|")]
    # Every table line has exactly one more cell border than cells: the | inside text is escaped.
    assert all(_unescaped_pipes(line) == 3 for line in rows)
    assert r"| x\|y | 1 |" in md and "| test_mse | 2 |" in md
    assert r"| \*bold\* | 3 |" in md and r"| \<b\> | 4 |" in md
    assert r"| c\|d | f next line |" in md
    assert r"\- not a list" in md and r"1\. not a list" in md


@pytest.mark.parametrize("kwargs, error, match", [
    ({"images": [("cap", "missing.png")]}, FileNotFoundError, "missing.png"),
    ({"images": [("cap", "/etc/passwd")]}, ValueError, "relative"),
    ({"images": [("cap", "../x.png")]}, ValueError, "relative"),
    ({"images": ["x.png"]}, TypeError, r"images\[0\]"),
    ({"title": 3}, TypeError, "title"),
    ({"metrics": [("a", 1)]}, TypeError, "metrics"),
    ({"metrics": {1: 2.0}}, TypeError, "metrics"),
    ({"notes": ["x"]}, TypeError, "notes"),
    ({"table": [1, 2]}, TypeError, r"table\[0\]"),
    ({"table": {"k": 1}}, TypeError, "table"),
    ({"directory": None}, TypeError, "directory"),
])
def test_report_rejects_bad_input(tmp_path, kwargs, error, match):
    args = {"directory": tmp_path, "title": "t", "metrics": {}, "images": []} | kwargs
    with pytest.raises(error, match=match):
        write_report(args.pop("directory"), args.pop("title"), args.pop("metrics"), args.pop("images"), **args)


@pytest.mark.parametrize("value, text", [
    (0.0, "0"), (1.0, "1"), (0.012345678, "0.01235"), (12345.6, "12346"), (1e-9, "1.000e-09"),
    (3e13, "3.000e+13"), (float("inf"), "inf"), (np.float64(0.5), "0.5"), (np.int64(7), "7"),
    (np.array(2.5), "2.5"), (None, "None"), ("text", "text"), ({"a": 1}, None), ([1], None),
    (np.zeros(3), None),
])
def test_format_value(value, text):
    assert format_value(value) == text


# --------------------------------------------------------------------------- a whole run
def test_write_run_plots_for_a_trained_model(tmp_path, trained):
    model, X_test, directions = trained
    images = plots.write_run_plots(model, tmp_path / "run", X_test, image_shape=(8, 8),
                                   directions=directions, dpi=DPI)
    assert [name for _, name in images] == ["training_curves.png", "firing_histogram.png",
                                            "decoder_tiles.png", "reconstructions.png", "recovery.png"]
    for caption, name in images:
        assert caption and (tmp_path / "run" / name).read_bytes()[:8] == PNG_SIGNATURE
    page = write_report(tmp_path / "run", "tiny run", {"test_mse": 0.1}, images)
    assert all(name in page.read_text() for _, name in images)


def test_write_run_plots_minimal(tmp_path, trained):
    model, X_test, _ = trained
    images = plots.write_run_plots(model, tmp_path, X_test, dpi=DPI)
    assert [name for _, name in images] == ["training_curves.png", "firing_histogram.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["firing_histogram.png", "training_curves.png"]


def test_write_run_plots_rejects_wrong_image_shape(tmp_path, trained):
    model, X_test, _ = trained
    with pytest.raises(ValueError, match="W_dec"):
        plots.write_run_plots(model, tmp_path, X_test, image_shape=(4, 4), dpi=DPI)
