"""The model state: a sparse autoencoder's parameters and the kernel calls that use them.

``ModelState`` holds the weights in the kernels' layout, their gradient buffers, the scratch
arrays of a batch, the per-latent firing counters, batchtopk's inference threshold and the
random generator, and encodes and decodes through ``ksae._core``, under a readers-writer lock
(``access``) so that a model shared between threads is never read in the middle of a step,
and refusing weights and codes that hold NaN or infinity. It knows nothing of
training loops, optimizers' schedules or files: the training step is ``ksae.steps``, the loop
``ksae.training``, saving ``ksae.serialization``; the estimator ``SparseAutoencoder`` is a
facade over all of them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from . import _core
from .buffers import aligned_empty, as_aligned
from .config import DENSE_SPARSITIES, NEEDS_SELECTED_PRE, ModelConfig
from .initialization import initial_parameters
from .locking import ReadWriteLock
from .losses import sigmoid
from .sparsity import jumprelu_values
from .validation import as_code, as_float_matrix

PARAM_NAMES = ("W_enc_t", "b_enc", "W_dec", "b_dec")
"""Internal parameter names. W_enc is held transposed, (n_latents, d_in), so a latent's
encoder weights are one contiguous row; ``W_enc_`` shows it as (d_in, n_latents). A jumprelu
model has one more, ``log_threshold`` (n_latents,)."""

_TILE_BYTES = 1 << 20
"""kTileBytes of cpp/ksae/encode_tiles.hpp: the encode kernel multiplies tiles of about this many
bytes of (rows x latents) products and selects from each while it is in cache."""


def encode_chunk_rows(itemsize: int) -> int:
    """Rows per encode call at inference (1024 in float32, 512 in float64): few enough that
    the kernel's tiles of at least 240 latents (wide enough for Eigen's product to run at
    full speed) stay within about 1 MiB, in cache while they are selected from, and a bound
    on the kernel's per-row candidate scratch. There is no (rows x n_latents) array to bound
    any more: without ``pre`` the kernel never makes one."""
    return max(1, _TILE_BYTES // (256 * itemsize))


def code_width(cfg: ModelConfig, k: int | None = None) -> int:
    """Latents selected per sample before any thresholding: k for topk; for batchtopk and
    jumprelu the per-sample cap max_k (default 4k), within which the batch-wide choice or
    the thresholds act; every latent for the dense sparsities (l1, kl)."""
    k = k or cfg.k
    if cfg.sparsity in DENSE_SPARSITIES:
        return cfg.n_latents
    if cfg.sparsity in ("batchtopk", "jumprelu"):
        return int(min(cfg.n_latents, cfg.max_k or 4 * k))
    return k


def inference_k(cfg: ModelConfig) -> int:
    """Latents kept per sample by encode: round(inference_k_scale * k), within [1, n_latents]."""
    return int(min(cfg.n_latents, max(1, round(cfg.inference_k_scale * cfg.k))))


def selected_pre_buffer(rows: int, k: int, cfg: ModelConfig) -> np.ndarray | None:
    """Room for the kept pre-activations when the activation's derivative needs them."""
    return np.empty((rows, k), dtype=cfg.dtype) if cfg.activation in NEEDS_SELECTED_PRE else None


class SparseCode(NamedTuple):
    """A k-sparse code: ``dense[r, indices[r, s]] = values[r, s]``."""

    values: np.ndarray
    """(n_samples, k) activations of the kept latents, in decreasing order."""
    indices: np.ndarray
    """(n_samples, k) int64 indices of the kept latents."""


class _Scratch:
    """ModelState.scratch's context manager: a plain class, as the encode runs it once a
    batch and a generator-based one (contextlib) cost more of the interpreter."""

    __slots__ = ("state", "rows", "locked")

    def __init__(self, state: "ModelState", rows: int) -> None:
        self.state, self.rows, self.locked = state, rows, False

    def __enter__(self) -> dict[str, np.ndarray]:
        self.locked = self.state.lock.acquire(blocking=False)
        return self.state.buffers(self.rows) if self.locked else self.state.new_buffers(self.rows)

    def __exit__(self, *exc: object) -> None:
        if self.locked:
            self.locked = False
            self.state.lock.release()


class ModelState:
    """The parameters of one sparse autoencoder (``cfg`` describes it) and what a training
    step needs beside them: gradient buffers, scratch arrays (guarded by ``lock``: the
    kernels run without the GIL, so concurrent calls are real), ``samples_since_fired`` per
    latent, ``n_iter`` steps taken, batchtopk's inference ``threshold`` and the random
    generator ``rng`` (input dropout, resampling and the trainer's shuffles draw from it).

    Sharing between threads: encode, candidates, decode and reconstruct hold ``access.read``
    (any number at once), a training step ``access.write`` (alone; ``ksae.steps.train_step``
    takes it), so a read sees the weights of one step, never half of one. ``version`` counts
    the changes to the weights (each step, each ``weights_changed``); the reads check the
    weights for NaN and infinity once per version."""

    def __init__(self, cfg: ModelConfig, params: dict[str, np.ndarray],
                 rng: np.random.Generator | None = None) -> None:
        self.cfg = cfg
        dtype = np.dtype(cfg.dtype)
        names = PARAM_NAMES + (("log_threshold",) if "log_threshold" in params else ())
        self.params = {name: as_aligned(params[name], dtype) for name in names}
        self.grads = {name: aligned_empty(p.shape, dtype) for name, p in self.params.items()}
        self.workspace: dict[str, np.ndarray] = {}
        self.lock = threading.Lock()
        self.access = ReadWriteLock()
        self.version = 0
        self._finite_version = -1  # the version whose weights were last found finite
        self.rng = rng if rng is not None else np.random.default_rng(cfg.random_state)
        self.reset_training_state()

    @classmethod
    def initialize(cls, cfg: ModelConfig, d_in: int, rng: np.random.Generator,
                   X: np.ndarray | None = None) -> "ModelState":
        """A fresh model for input width ``d_in``, its weights drawn from ``rng`` (which the
        state keeps); X, the training data or a sample of it, sets ``b_dec_init`` and
        jumprelu's starting thresholds."""
        state = cls(cfg, initial_parameters(cfg, d_in, rng, X), rng)
        if cfg.sparsity == "jumprelu":
            state.params["log_threshold"].fill(np.log(state.initial_threshold(X)))
        return state

    def initial_threshold(self, X: np.ndarray | None) -> float:
        """jumprelu's starting threshold: jumprelu_init_threshold, or by default the one that
        k latents per sample of (up to 4096 rows of) X exceed on average with the current
        weights, so that the cap max_k does not bind from the start (at least 1e-6)."""
        cfg = self.cfg
        if cfg.jumprelu_init_threshold is not None:
            return cfg.jumprelu_init_threshold
        if X is None:
            return 1e-3
        sample, p = X[:4096], self.params
        with self.scratch(sample.shape[0]) as ws:
            pre, _ = _core.encode(sample, p["W_enc_t"], p["b_enc"], p["b_dec"], code_width(cfg),
                                  "linear", self.n_threads, ws["centered"])
        flat = pre.reshape(-1)
        budget = min(flat.size, cfg.k * sample.shape[0])
        return max(float(np.partition(flat, flat.size - budget)[flat.size - budget]), 1e-6)

    def reset_training_state(self) -> None:
        """Zero the step count and firing counters and forget batchtopk's threshold."""
        self.n_iter = 0
        self.samples_since_fired = np.zeros(self.n_latents, dtype=np.int64)
        self.threshold: float | None = None

    def __getstate__(self) -> dict[str, Any]:
        # copy and pickle support: the locks and the scratch buffers are per instance.
        state = self.__dict__.copy()
        state["workspace"] = {}
        del state["lock"], state["access"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()
        self.access = ReadWriteLock()

    @property
    def config(self) -> ModelConfig:
        """``cfg``, under the name the estimator gives its configuration (so that code
        written for one, such as ``ksae.training.evaluate``, takes the other)."""
        return self.cfg

    @property
    def d_in(self) -> int:
        return int(self.params["W_dec"].shape[1])

    @property
    def n_latents(self) -> int:
        return int(self.params["W_dec"].shape[0])

    @property
    def n_threads(self) -> int:
        """Threads for the kernels (0: all the kernels may use)."""
        return self.cfg.n_threads or 0

    def use_config(self, cfg: ModelConfig) -> None:
        """Adopt ``cfg`` (an estimator's parameters, changed by set_params since the weights
        were made) where it describes the same weights; raise where it does not."""
        if self.n_latents != cfg.n_latents or self.params["W_dec"].dtype != np.dtype(cfg.dtype):
            raise ValueError(
                f"n_latents/dtype: the model holds weights for n_latents={self.n_latents}, "
                f"dtype={self.params['W_dec'].dtype}, but its parameters now say "
                f"n_latents={cfg.n_latents}, dtype={cfg.dtype}; call fit to re-initialise")
        if ("log_threshold" in self.params) != (cfg.sparsity == "jumprelu"):
            raise ValueError(f"sparsity: the model's weights are not those of a "
                             f"sparsity={cfg.sparsity!r} model (jumprelu has thresholds, the "
                             f"others none); call fit to re-initialise")
        self.cfg = cfg

    # ----------------------------------------------------------------- finiteness
    def weights_changed(self) -> None:
        """Note that the weights were (or may have been) changed in place: the next read
        checks them for NaN and infinity again. Each training step calls it; so should code
        that writes into ``params``."""
        self.version += 1

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Hold the write lock while the weights are changed in place outside a training
        step (no read sees them half changed), and note the change at the end. Not
        reentrant: read nothing of the state (encode, reconstruct) inside it."""
        with self.access.write:
            try:
                yield
            finally:
                self.weights_changed()

    def check_weights(self, again: bool = False) -> None:
        """Raise ValueError, naming the tensor and the latent, if a weight is NaN or
        infinite. Checked once per ``version`` (an encode of an unchanged model costs
        nothing), or ``again`` regardless."""
        version = self.version  # read first: a change during the check makes it stale
        if version == self._finite_version and not again:
            return
        for name, param in self.params.items():
            if not _core.all_finite(param, self.n_threads):
                raise ValueError(_non_finite_weight(name, param))
        self._finite_version = version

    def _check_kernel_output(self, out: np.ndarray, indices: np.ndarray | None = None) -> None:
        """Check the weights again where the kernel's output shows a NaN weight that no
        ``weights_changed`` announced (written into ``params`` in place): NaN or infinity,
        or in a code (``indices`` given) a row that keeps latents 0..k-1 at 0, which is
        what relu makes of NaN pre-activations (a genuine row of zeros keeps the latents
        of its largest pre-activations)."""
        if not _core.all_finite(out, 1) or (indices is not None and _nan_rows(out, indices)):
            self.check_weights(again=True)

    # ----------------------------------------------------------------- scratch arrays
    def buffers(self, rows: int, pre: bool = False) -> dict[str, np.ndarray]:
        """Scratch arrays for a batch of ``rows`` samples, grown as needed, reused otherwise.
        ``pre`` adds the (rows, n_latents) pre-activations, which only AuxK needs (the encode
        fuses the selection with the product without it): a model trained without AuxK never
        holds that array. The caller must hold ``lock``."""
        ws = self.workspace
        if ws.get("centered") is None or ws["centered"].shape[0] < rows:
            ws.update(self.new_buffers(rows))
        if pre and (ws.get("pre") is None or ws["pre"].shape[0] < rows):
            ws["pre"] = aligned_empty((rows, self.n_latents), self.params["W_dec"].dtype)
        return {key: buf[:rows] for key, buf in ws.items() if pre or key != "pre"}

    def new_buffers(self, rows: int) -> dict[str, np.ndarray]:
        dtype = self.params["W_dec"].dtype
        return {"centered": aligned_empty((rows, self.d_in), dtype),
                "x_hat": aligned_empty((rows, self.d_in), dtype)}

    def scratch(self, rows: int) -> _Scratch:
        """``with state.scratch(rows) as ws``: the shared scratch arrays when no other thread
        is using them, otherwise private ones."""
        return _Scratch(self, rows)

    # ----------------------------------------------------------------- encode and decode
    def encode_batch(self, X: np.ndarray, width: int, ws: dict[str, np.ndarray],
                     selected_pre: np.ndarray | None = None,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The code of a checked batch, ``width`` latents per row, with the scratch arrays
        ``ws``: (values, indices, gap). For jumprelu the encode keeps the ``width`` largest
        ``pre - theta`` (bias ``b_enc - theta``, linear activation), values become the
        pre-activations above their thresholds (zeros below) and ``gap`` holds the kept
        ``pre - theta``, which the thresholds' gradient needs; otherwise ``gap`` is None."""
        p, cfg, nt = self.params, self.cfg, self.n_threads
        if cfg.sparsity != "jumprelu":
            values, indices = _core.encode(X, p["W_enc_t"], p["b_enc"], p["b_dec"], width,
                                           cfg.activation, nt, ws["centered"], ws.get("pre"),
                                           selected_pre)
            return values, indices, None
        threshold = np.exp(p["log_threshold"])
        gap, indices = _core.encode(X, p["W_enc_t"], p["b_enc"] - threshold, p["b_dec"], width,
                                    "linear", nt, ws["centered"], ws.get("pre"))
        return jumprelu_values(gap, indices, threshold), indices, gap

    def _checked_input(self, X: Any) -> np.ndarray:
        """X checked and converted for the encode, before any lock is taken."""
        return as_float_matrix(X, "X", self.cfg.dtype, self.d_in, self.n_threads)

    def _encode_chunk(self, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(values, indices) of a checked chunk of rows, its output checked (see
        _check_kernel_output; jumprelu's ``gap``, before the thresholds zero values)."""
        with self.scratch(X.shape[0]) as ws:
            values, indices, gap = self.encode_batch(X, k, ws)
        self._check_kernel_output(values if gap is None else gap, indices)
        return values, indices

    def _candidates(self, X: np.ndarray) -> SparseCode:
        """candidates of a checked X; the caller holds ``access``."""
        self.check_weights()
        n = X.shape[0]
        k = code_width(self.cfg, inference_k(self.cfg))
        chunk = encode_chunk_rows(X.itemsize)
        if n <= chunk:  # one call, whose arrays are the code
            return SparseCode(*self._encode_chunk(X, k))
        values = np.empty((n, k), dtype=self.cfg.dtype)
        indices = np.empty((n, k), dtype=np.int64)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            values[start:stop], indices[start:stop] = self._encode_chunk(X[start:stop], k)
        return SparseCode(values, indices)

    def candidates(self, X: Any) -> SparseCode:
        """The top code_width latents of each row of X (checked here), before any batchtopk
        threshold, in chunks of ``encode_chunk_rows``."""
        X = self._checked_input(X)
        with self.access.read:
            return self._candidates(X)

    def _encode(self, X: np.ndarray) -> SparseCode:
        """encode of a checked X; the caller holds ``access``."""
        values, indices = self._candidates(X)
        if self.cfg.sparsity == "batchtopk":
            # Per sample, independent of the batch: every latent above the learned threshold.
            values[values < (self.threshold or 0.0)] = 0
        return SparseCode(values, indices)

    def encode(self, X: Any) -> SparseCode:
        """The code of each row of X (see ``SparseAutoencoder.encode``)."""
        X = self._checked_input(X)
        with self.access.read:
            return self._encode(X)

    def calibrate_threshold(self, X: Any) -> float:
        """batchtopk: set ``threshold`` so that encoding X keeps k latents per sample on
        average (the (n_samples * k)-th largest candidate activation of X). Returns it."""
        cfg = self.cfg
        if cfg.sparsity != "batchtopk":
            raise ValueError(f"sparsity: calibrate_threshold is for 'batchtopk', this model uses {cfg.sparsity!r}")
        X = self._checked_input(X)
        with self.access.write:  # the threshold changes: no encode may see it half-set
            flat = self._candidates(X).values.reshape(-1)
            budget = min(flat.size, cfg.k * (flat.size // code_width(cfg)))
            self.threshold = float(np.partition(flat, flat.size - budget)[flat.size - budget])
        return self.threshold

    def _checked_code(self, values: Any, indices: Any) -> tuple[np.ndarray, np.ndarray]:
        """A code checked and converted for the decode: values finite, indices in range."""
        v, i = as_code(values, indices, self.cfg.dtype, self.n_latents)
        if not _core.all_finite(v, self.n_threads):
            row = int(np.flatnonzero(~np.isfinite(v).all(axis=1))[0])
            raise ValueError(f"values: row {row} holds NaN or infinity; expected finite values")
        return v, i

    def _decode(self, v: np.ndarray, i: np.ndarray) -> np.ndarray:
        """decode of a checked code; the caller holds ``access``."""
        self.check_weights()
        p = self.params
        X_hat = _core.decode(v, i, p["W_dec"], p["b_dec"], self.n_threads)
        self._check_kernel_output(X_hat)
        return sigmoid(X_hat, out=X_hat) if self.cfg.output_activation == "sigmoid" else X_hat

    def decode(self, values: Any, indices: Any) -> np.ndarray:
        """``out(dense(values, indices) @ W_dec + b_dec)``, ``out`` the output activation.
        Raises ValueError when ``values`` hold NaN or infinity."""
        v, i = self._checked_code(values, indices)
        with self.access.read:
            return self._decode(v, i)

    def reconstruct(self, X: Any) -> np.ndarray:
        """decode(encode(X)), both with the weights of the same step."""
        X = self._checked_input(X)
        with self.access.read:
            return self._decode(*self._encode(X))


def _nan_rows(values: np.ndarray, indices: np.ndarray) -> bool:
    """Whether a row of the code keeps latents 0..k-1, all at 0 (see _check_kernel_output)."""
    first = (values[:, 0] == 0) & (indices[:, 0] == 0)  # most rows are out at once
    if not first.any():
        return False
    rows = np.flatnonzero(first)
    return bool(((values[rows] == 0) & (indices[rows] == np.arange(indices.shape[1]))).all(axis=1).any())


def _non_finite_weight(name: str, param: np.ndarray) -> str:
    """The message for a weight tensor holding NaN or infinity, in the names users see
    (W_enc, (d_in, n_latents)), with the first latent (or input feature) concerned."""
    bad = np.argwhere(~np.isfinite(param))[0]
    public = "W_enc" if name == "W_enc_t" else name
    if param.ndim == 2:
        where = f"latent {bad[0]}, {'input' if name == 'W_enc_t' else 'output'} feature {bad[1]}"
    else:
        where = f"{'feature' if name == 'b_dec' else 'latent'} {bad[0]}"
    return (f"{public} holds NaN or infinity ({where}): the model cannot encode or decode; "
            f"retrain it (a lower learning rate) or load a finite copy")
