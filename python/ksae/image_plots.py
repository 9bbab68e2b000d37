"""Figures of image data: decoder rows as image tiles, and samples beside their
reconstructions (``ksae.plots`` gives both, with the rest)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .plot_inputs import (DEFAULT_DPI, checked_image_shape, mosaic, output_path, positive_int,
                          real_array, save_figure, with_gap_colour)


# --------------------------------------------------------------------------- decoder tiles
def _latent_order(order: Any, n_latents: int) -> np.ndarray:
    idx = np.asarray(order)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"order: expected integer latent indices (e.g. np.argsort(-frequencies)), "
                        f"got dtype {idx.dtype}")
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError(f"order: expected a non-empty 1-D array of latent indices, got shape {idx.shape}")
    if idx.min() < 0 or idx.max() >= n_latents:
        raise ValueError(f"order: expected indices in [0, {n_latents}), got [{idx.min()}, {idx.max()}]")
    if np.unique(idx).size != idx.size:
        raise ValueError("order: expected each latent index at most once, got repeated indices")
    return idx.astype(np.int64)


def _decoder_tiles_figure(W_dec: Any, image_shape: Any, n_tiles: int, order: Any, title: str | None) -> Figure:
    W = real_array(W_dec, "W_dec", ndim=2)
    h, w = checked_image_shape(image_shape, W.shape[1], "W_dec")
    n_tiles = positive_int(n_tiles, "n_tiles")
    chosen = np.arange(W.shape[0]) if order is None else _latent_order(order, W.shape[0])
    chosen = chosen[:n_tiles]
    tiles = W[chosen].reshape(-1, h, w)
    # Each tile on its own symmetric scale: the sign pattern of a row matters, not its size
    # (rows are unit-norm in training anyway), and 0 stays the colormap's neutral middle.
    scale = np.abs(tiles).max(axis=(1, 2), keepdims=True)
    tiles = tiles / np.where(scale > 0, scale, 1.0)
    cols = math.ceil(math.sqrt(len(chosen)))
    rows = math.ceil(len(chosen) / cols)
    tile_inches = 0.7
    aspect = h / w
    fig = Figure(figsize=(max(3.5, cols * tile_inches + 1.2), max(2.5, rows * tile_inches * aspect + 0.7)),
                 layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(mosaic(tiles, cols, gap=max(1, min(h, w) // 8)), cmap=with_gap_colour("RdBu_r"),
                      vmin=-1, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    which = "in index order" if order is None else "in the given order"
    ax.set_title(title or f"Decoder rows: {len(chosen)} of {W.shape[0]}, {which}", fontsize="medium")
    fig.colorbar(image, ax=ax, shrink=0.7, label="value / max |value| of the row")
    return fig


def plot_decoder_tiles(W_dec: Any, image_shape: tuple[int, int], path: str | os.PathLike,
                       n_tiles: int = 64, order: Any = None, *, title: str | None = None,
                       dpi: float = DEFAULT_DPI) -> Path:
    """The first ``n_tiles`` decoder rows (``W_dec`` is (n_latents, height * width)) drawn
    as ``image_shape`` tiles in a near-square grid, each scaled to [-1, 1] by its largest
    absolute value, blue negative, red positive. ``order`` (integer latent indices, e.g.
    ``np.argsort(-frequencies)`` for the most frequently firing first) picks and orders
    the rows; ``title`` replaces the default one, which says how many rows are shown.
    Returns ``path``."""
    out = output_path(path, dpi)
    return save_figure(_decoder_tiles_figure(W_dec, image_shape, n_tiles, order, title), out, dpi)


# --------------------------------------------------------------------------- reconstructions
def _reconstructions_figure(originals: Any, reconstructions: Any, image_shape: Any, n_images: int) -> Figure:
    O = real_array(originals, "originals", ndim=2)
    h, w = checked_image_shape(image_shape, O.shape[1], "originals")
    n_images = positive_int(n_images, "n_images")
    if isinstance(reconstructions, Mapping):
        if not reconstructions:
            raise ValueError("reconstructions: expected an array or a non-empty dict label -> array, got {}")
        labelled = dict(reconstructions)
    else:
        labelled = {"reconstruction": reconstructions}
    rows: list[tuple[str, np.ndarray]] = []
    for label, value in labelled.items():
        if not isinstance(label, str):
            raise TypeError(f"reconstructions: expected str labels, got {type(label).__name__} {label!r}")
        R = real_array(value, f"reconstructions[{label!r}]", ndim=2)
        if R.shape != O.shape:
            raise ValueError(f"reconstructions[{label!r}]: expected the shape of originals {O.shape}, got {R.shape}")
        rows.append((label, R))
    n = min(n_images, O.shape[0])
    # One grey scale for the whole grid, set by the originals, so a reconstruction's
    # contrast can be compared with its original's.
    lo, hi = float(O[:n].min()), float(O[:n].max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    gap = max(1, min(h, w) // 8)
    cmap = with_gap_colour("gray")
    tile_inches = 0.75
    fig = Figure(figsize=(max(4.0, n * tile_inches + 1.6), (len(rows) + 1) * (tile_inches * h / w + 0.1) + 0.5),
                 layout="constrained")
    axes = fig.subplots(len(rows) + 1, 1, squeeze=False)[:, 0]
    strips = [("original", O)] + [(f"{label}\nMSE {np.mean((R - O) ** 2):.3g}", R) for label, R in rows]
    for ax, (label, images) in zip(axes, strips):
        ax.imshow(mosaic(images[:n].reshape(n, h, w), n, gap), cmap=cmap, vmin=lo, vmax=hi,
                  interpolation="nearest")
        # Hide ticks and frame but keep the axes on, or the row label would vanish with them.
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize="small")
    axes[0].set_title(f"First {n} samples and their reconstructions (MSE over all {O.shape[0]})",
                      fontsize="medium")
    return fig


def plot_reconstructions(originals: Any, reconstructions: Mapping[str, Any] | Any,
                         image_shape: tuple[int, int], path: str | os.PathLike, n_images: int = 10,
                         *, dpi: float = DEFAULT_DPI) -> Path:
    """A grid of images: the first ``n_images`` rows of ``originals`` (n_samples,
    height * width) on top, below them one row per entry of ``reconstructions`` (a dict
    ``label -> array`` of the shape of ``originals``, e.g. ``{"k=5": ..., "k=10": ...}`` for
    a k sweep, or a single array), labelled on the left with the label and the MSE against
    the originals over all their samples. Returns ``path``."""
    out = output_path(path, dpi)
    return save_figure(_reconstructions_figure(originals, reconstructions, image_shape, n_images), out, dpi)


