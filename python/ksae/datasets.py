"""Data sets: synthetic data with a planted sparse dictionary, and MNIST / Fashion-MNIST
found on disk or downloaded once into a cache."""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .config import check_choice, check_int, check_positive_float
from .idx import read_idx
from .serialization import atomic_write_bytes


class SparseDictionaryData(NamedTuple):
    """Samples made from a known sparse dictionary."""

    X: np.ndarray
    """(n_samples, d_in) samples."""
    directions: np.ndarray
    """(n_components, d_in) ground-truth unit directions."""
    codes: np.ndarray
    """(n_samples, n_components) the non-negative coefficients of each sample."""


def make_sparse_dictionary(n_samples: int = 20000, d_in: int = 64, n_components: int = 128,
                           n_active: int = 4, noise: float = 0.01, random_state: int | None = 0,
                           dtype: str = "float32") -> SparseDictionaryData:
    """Synthetic data with a planted sparse dictionary.

    Each sample is a sum of ``n_active`` distinct ground-truth unit directions (chosen at
    random out of ``n_components``) with coefficients drawn uniformly from [0.5, 1.5), plus
    Gaussian noise of standard deviation ``noise`` per feature. A k-sparse autoencoder with
    ``k >= n_active`` and enough latents should find the directions again
    (see ``ksae.metrics.dictionary_recovery``).
    """
    n_samples = check_int("n_samples", n_samples, 1)
    d_in = check_int("d_in", d_in, 1)
    n_components = check_int("n_components", n_components, 1)
    n_active = check_int("n_active", n_active, 1, n_components)
    noise = check_positive_float("noise", noise, allow_zero=True)
    # A stream of its own, so that data and a model given the same integer seed do not share
    # random numbers (the model's first decoder rows would otherwise equal the planted atoms).
    rng = np.random.default_rng(None if random_state is None else [random_state, 0xDA7A])
    directions = rng.standard_normal((n_components, d_in))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    # n_active distinct components per sample: the first n_active of a random ranking
    chosen = np.argsort(rng.random((n_samples, n_components)), axis=1)[:, :n_active]
    codes = np.zeros((n_samples, n_components))
    np.put_along_axis(codes, chosen, rng.uniform(0.5, 1.5, (n_samples, n_active)), axis=1)
    X = codes @ directions + noise * rng.standard_normal((n_samples, d_in))
    return SparseDictionaryData(X.astype(dtype), directions.astype(dtype), codes.astype(dtype))


# --- MNIST and Fashion-MNIST ----------------------------------------------------------------

SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""The standard IDX file names (images, labels) of each split; on disk raw or with ``.gz``."""

DOWNLOAD_TIMEOUT = 60.0
"""Seconds a download may wait for the server before that mirror counts as failed."""


@dataclass(frozen=True)
class ImageSource:
    """Where an IDX image data set is found and how its downloads are checked."""

    mirrors: tuple[str, ...]
    """Base URLs, tried in turn; a file's URL is the base followed by its ``.gz`` name."""
    sha256: Mapping[str, str]
    """SHA-256 (hex) of each ``.gz`` file as published; a download must match it."""
    system_dirs: tuple[Path, ...]
    """Directories a system package installs the files into, searched before the cache."""
    class_names: tuple[str, ...]
    """Name of each label value."""


# The SHA-256 sums are those published for the original files (by several independent
# projects; they are the files whose MD5s torchvision's MNIST and FashionMNIST check).
# Debian's dataset-fashion-mnist holds the same data recompressed, so its .gz files have other
# checksums: files found on disk are not checked, only downloads are.
IMAGE_DATASETS: dict[str, ImageSource] = {
    "mnist": ImageSource(
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        sha256={
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        system_dirs=(Path("/usr/share/datasets/mnist"),),
        class_names=tuple(str(digit) for digit in range(10)),
    ),
    "fashion-mnist": ImageSource(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        sha256={
            "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
        system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                     "Sneaker", "Bag", "Ankle boot"),
    ),
}
"""The image data sets ``load_mnist`` knows, by name."""


class ImageDataset(NamedTuple):
    """Images with one class label each, flattened for training."""

    images: np.ndarray
    """(n_samples, height * width) pixel rows: float32 in [0, 1], or the stored uint8 0..255."""
    labels: np.ndarray
    """(n_samples,) int64 class of each image, an index into ``class_names``."""
    image_shape: tuple[int, int]
    """(height, width) of one image: ``images[i].reshape(image_shape)`` shows it."""
    class_names: tuple[str, ...]
    """Name of each class."""


class DownloadError(OSError):
    """No mirror delivered a file whose checksum matched."""


def data_cache_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory downloads of data set ``name`` are cached in: ``<root>/<name>``, where
    root is ``cache_dir`` if given, else the environment variable ``KSAE_DATA``, else
    ``$XDG_CACHE_HOME/ksae`` (``~/.cache/ksae`` when that is unset)."""
    if cache_dir is not None:
        root = Path(cache_dir).expanduser()
    elif os.environ.get("KSAE_DATA"):
        root = Path(os.environ["KSAE_DATA"]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        # The XDG spec says to ignore a relative path here.
        root = (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "ksae"
    return root / name


def load_mnist(name: str = "mnist", split: str = "train", *, data_dir: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None, download: bool = True,
               normalize: bool = True) -> ImageDataset:
    """MNIST digits or Fashion-MNIST clothes: 28 x 28 grey images in 10 classes, 60000 in
    ``split="train"`` and 10000 in ``split="test"``.

    ``name`` is ``"mnist"`` or ``"fashion-mnist"``. The IDX files (raw or ``.gz``) of the
    split are looked for in this order:

    1. ``data_dir``, when given: it must hold the split's two files (``train-images-idx3-ubyte``
       and ``train-labels-idx1-ubyte``, or ``t10k-images-idx3-ubyte`` and
       ``t10k-labels-idx1-ubyte``, each possibly with ``.gz``), and nothing else is searched;
    2. a system package's copy: ``/usr/share/datasets/<name>`` (Debian's
       ``dataset-fashion-mnist`` installs Fashion-MNIST there);
    3. the cache, ``data_cache_dir(name, cache_dir)``;
    4. with ``download``, the data set's public mirrors, tried in turn: each file is checked
       against its published SHA-256 and only then renamed into the cache, so a failed or
       partial download never leaves a file under its final name.

    ``normalize`` scales pixels to float32 in [0, 1]; otherwise they stay uint8. Raises
    ``FileNotFoundError`` (listing where it looked) when the files are missing and
    ``download`` is false or ``data_dir`` was given, ``DownloadError`` (an ``OSError``,
    naming every URL tried and why it failed) when no mirror works, and ``ValueError`` for a
    damaged file.
    """
    name = check_choice("name", name, tuple(IMAGE_DATASETS))
    split = check_choice("split", split, tuple(SPLIT_FILES))
    for flag, value in (("download", download), ("normalize", normalize)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag}: expected a bool, got {type(value).__name__} {value!r}")
    source = IMAGE_DATASETS[name]
    files = _locate_split(name, split, data_dir, cache_dir, download)
    images, labels = (read_idx(path) for path in files)
    _check_images_and_labels(images, labels, files, len(source.class_names))
    flat = images.reshape(len(images), -1)
    if normalize:
        flat = flat.astype(np.float32)
        flat /= 255
    return ImageDataset(flat, labels.astype(np.int64), (images.shape[1], images.shape[2]),
                        source.class_names)


def _locate_split(name: str, split: str, data_dir: str | os.PathLike | None,
                  cache_dir: str | os.PathLike | None, download: bool) -> tuple[Path, Path]:
    """The (images, labels) files of a split, found or downloaded as ``load_mnist`` says."""
    source = IMAGE_DATASETS[name]
    bases = SPLIT_FILES[split]
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        files = _split_files_in(directory, split)
        if files is None:
            missing = [base for base in bases if _find_file(directory, base) is None]
            raise FileNotFoundError(
                f"data_dir: {str(directory)!r} lacks {', '.join(missing)} (raw or .gz) for the "
                f"{split} split of {name}")
        return files
    cache = data_cache_dir(name, cache_dir)
    searched = (*source.system_dirs, cache)
    for directory in searched:
        files = _split_files_in(directory, split)
        if files is not None:
            return files
    if not download:
        raise FileNotFoundError(
            f"{name} {split} split not found: looked for {' and '.join(bases)} (raw or .gz) in "
            f"{', '.join(map(str, searched))}; pass download=True, or data_dir= a directory "
            "holding them")
    images, labels = (_find_file(cache, base) or _download(source, base + ".gz", cache, name)
                      for base in bases)
    return images, labels


def _find_file(directory: Path, base: str) -> Path | None:
    """``directory/base`` or ``directory/base.gz``, whichever is a file (raw first)."""
    for candidate in (directory / base, directory / (base + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _split_files_in(directory: Path, split: str) -> tuple[Path, Path] | None:
    images, labels = (_find_file(directory, base) for base in SPLIT_FILES[split])
    return (images, labels) if images is not None and labels is not None else None


def _check_images_and_labels(images: np.ndarray, labels: np.ndarray, files: tuple[Path, Path],
                             n_classes: int) -> None:
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{files[0]}: expected uint8 images of shape (n, height, width), "
                         f"got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{files[1]}: expected uint8 labels of shape (n,), got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{files[0]} holds {len(images)} images but {files[1]} holds {len(labels)} labels")
    if len(labels) and labels.max() >= n_classes:
        raise ValueError(f"{files[1]}: labels must be below {n_classes}, found {labels.max()}")


def _download(source: ImageSource, filename: str, cache: Path, name: str) -> Path:
    """Fetch ``filename`` from the first mirror that delivers it with the right SHA-256 and
    store it as ``cache/filename``; raise ``DownloadError`` naming each URL tried."""
    expected = source.sha256[filename]
    failures = []
    for base in source.mirrors:
        url = base.rstrip("/") + "/" + filename
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the response; left open it warns when collected
            failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
            continue
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            failures.append(f"{url}: {type(exc).__name__}: {reason}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            failures.append(f"{url}: SHA-256 mismatch ({len(data)} bytes with {digest}, expected {expected})")
            continue
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / filename
        atomic_write_bytes(target, data)  # a temporary file renamed into place, never half-written
        return target
    tried = "\n  ".join(failures)
    raise DownloadError(
        f"could not download {filename} of {name}; tried:\n  {tried}\n"
        f"Without network access, copy the files (raw or .gz) by hand into {cache} (the cache) "
        "or any directory passed as data_dir=")
