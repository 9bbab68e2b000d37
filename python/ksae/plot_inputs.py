"""What the figures of ``ksae.plots`` share: checks of their arguments (each failure a
``TypeError``/``ValueError`` naming the argument, what it got and what was expected), the
tile mosaic and its colours, and writing a figure to its PNG file."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

DEFAULT_DPI = 100

# Tile mosaics are drawn as one image rather than one axes per tile: it is much faster for
# 64+ tiles, and the NaN gaps between tiles show as this background colour.
_GAP_COLOUR = "white"

# Below this many points the curves carry markers, so a one- or two-epoch run still shows dots.
_MARKER_LIMIT = 50


# --------------------------------------------------------------------------- input checks
def output_path(path: str | os.PathLike, dpi: float) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike naming a .png file, got {type(path).__name__}")
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"path: expected a file name ending in .png, got {str(out)!r}")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not dpi > 0 or not math.isfinite(dpi):
        raise ValueError(f"dpi: expected a positive number of dots per inch, got {dpi!r}")
    return out


def save_figure(fig: Figure, path: Path, dpi: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # No bbox_inches="tight": the constrained layout already fits the labels, and a fixed
    # canvas makes the pixel size figsize * dpi, predictable for pages that embed the image.
    fig.savefig(path, dpi=dpi, format="png")
    return path


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def real_array(value: Any, name: str, ndim: int) -> np.ndarray:
    """``value`` as a finite float64 array with ``ndim`` dimensions and no empty axis."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim or 0 in arr.shape:
        raise ValueError(f"{name}: expected a non-empty {ndim}-D array, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: expected finite values, got NaN or infinity")
    return arr


def checked_image_shape(image_shape: Any, width: int, name: str) -> tuple[int, int]:
    """A checked (height, width) whose product is ``width``, the row length of ``name``."""
    if isinstance(image_shape, np.ndarray):
        image_shape = tuple(image_shape.tolist())
    if not isinstance(image_shape, Sequence) or isinstance(image_shape, str) or len(image_shape) != 2:
        raise ValueError(f"image_shape: expected (height, width), got {image_shape!r}")
    h, w = (positive_int(side, "image_shape") for side in image_shape)
    if h * w != width:
        raise ValueError(f"{name}: expected rows of prod(image_shape) = {h} * {w} = {h * w} values, "
                         f"got rows of {width}")
    return h, w


def history_series(history: Mapping, key: str, name: str, length: int | None) -> np.ndarray:
    """``history[key]`` as a 1-D float array (NaN kept: a gap in the curve), of ``length``."""
    try:
        values = np.asarray(history[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}[{key!r}]: expected a list of numbers, got {history[key]!r:.80}") from None
    if values.ndim != 1:
        raise ValueError(f"{name}[{key!r}]: expected a flat list of numbers, got shape {values.shape}")
    if length is not None and values.size != length:
        raise ValueError(f"{name}[{key!r}]: expected {length} values (one per record, as "
                         f"{name}['loss']), got {values.size}")
    return values


def history_records(history: Any, name: str, x_key: str) -> tuple[int, np.ndarray]:
    """The record count of a history dict (from its ``loss`` list) and its x values
    (``history[x_key]``, or 1, 2, ... without it)."""
    if not isinstance(history, Mapping):
        raise TypeError(f"{name}: expected a dict of lists such as a fitted model's history_, "
                        f"got {type(history).__name__}")
    loss = history_series(history, "loss", name, None) if "loss" in history else np.empty(0)
    if loss.size == 0:
        raise ValueError(f"{name}: expected at least one record with a 'loss' value (a fitted "
                         f"model's history_), got keys {list(history)}")
    x = (history_series(history, x_key, name, loss.size) if x_key in history
         else np.arange(1, loss.size + 1, dtype=np.float64))
    return loss.size, x


# --------------------------------------------------------------------------- drawing helpers
def all_positive(*arrays: np.ndarray) -> bool:
    """Whether a log scale can show every finite value (NaN is a gap, so it does not count)."""
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays])
    return finite.size > 0 and bool((finite > 0).all())


def plot_line(ax: Any, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> None:
    ax.plot(x, y, marker="o" if y.size <= _MARKER_LIMIT else None, markersize=3, **kwargs)


def mosaic(tiles: np.ndarray, cols: int, gap: int) -> np.ndarray:
    """Tiles (n, h, w) laid out row by row in ``cols`` columns, separated by NaN gaps."""
    n, h, w = tiles.shape
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap), np.nan)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        top, left = gap + r * (h + gap), gap + c * (w + gap)
        out[top:top + h, left:left + w] = tile
    return out


def with_gap_colour(name: str) -> Any:
    return matplotlib.colormaps[name].with_extremes(bad=_GAP_COLOUR)

