"""The estimator: ``SparseAutoencoder``, a TopK sparse autoencoder trained by ksae's kernels."""

from __future__ import annotations

import copy
import math
import operator
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from . import _core
from .config import (DENSE_SPARSITIES, NEEDS_SELECTED_PRE, ModelConfig, TrainConfig,
                     check_known_keys, field_names)
from .checkpoint import data_fingerprint, save_checkpoint
from .buffers import aligned_copy, aligned_empty, as_aligned
from . import training
from .hygiene import initial_decoder_bias, normalize_rows
from .losses import add_weight_penalties, reconstruction_loss, sigmoid
from .metrics import fraction_of_variance_explained
from .optim import Adam, Optimizer, make_optimizer
from .optim import clip_grad_norm as clip_gradients
from .sparsity import (active_entries, active_threshold, code_penalty, jumprelu_threshold_gradient,
                       jumprelu_values)
from .validation import as_code, as_float_matrix

PARAM_NAMES = ("W_enc_t", "b_enc", "W_dec", "b_dec")
"""Internal parameter names. W_enc is held transposed, (n_latents, d_in), so a latent's
encoder weights are one contiguous row; ``W_enc_`` shows it as (d_in, n_latents). A jumprelu
model has one more, ``log_threshold`` (n_latents,)."""

_TILE_BYTES = 1 << 20
"""kTileBytes of cpp/ksae/encode.hpp: the encode kernel multiplies tiles of about this many
bytes of (rows x latents) products and selects from each while it is in cache."""

_MODEL_FIELDS = tuple(field_names(ModelConfig))
_TRAIN_FIELDS = tuple(field_names(TrainConfig))
_model_values = operator.attrgetter(*_MODEL_FIELDS)  # a model's constructor arguments, as a tuple


def _encode_chunk_rows(itemsize: int) -> int:
    """Rows per encode call at inference (1024 in float32, 512 in float64): few enough that
    the kernel's tiles of at least 240 latents (wide enough for Eigen's product to run at
    full speed) stay within about 1 MiB, in cache while they are selected from, and a bound
    on the kernel's per-row candidate scratch. There is no (rows x n_latents) array to bound
    any more: without ``pre`` the kernel never makes one."""
    return max(1, _TILE_BYTES // (256 * itemsize))


def _same_settings_but_lr(a: Optimizer, b: Optimizer) -> bool:
    """Whether two optimizers differ at most in their learning rate (so state carries over)."""
    return type(a) is type(b) and {**a.hyperparameters(), "lr": None} == {**b.hyperparameters(), "lr": None}


class StepResult(NamedTuple):
    """What one training step reports."""

    loss: float
    """The reconstruction loss."""
    values: np.ndarray
    indices: np.ndarray
    auxk_loss: float
    sparsity_loss: float
    """The penalty the sparsity puts on the code (0 for topk and batchtopk)."""
    active_above: float | None
    """Entries above this count as active latents; None: the non-zero ones."""

    @property
    def active(self) -> np.ndarray:
        """Which code entries count as active latents (see ``ksae.sparsity.active_mask``),
        formed when asked for: fit's figures need it, partial_fit does not."""
        return active_entries(self.values, self.active_above)


class SparseCode(NamedTuple):
    """A k-sparse code: ``dense[r, indices[r, s]] = values[r, s]``."""

    values: np.ndarray
    """(n_samples, k) activations of the kept latents, in decreasing order."""
    indices: np.ndarray
    """(n_samples, k) int64 indices of the kept latents."""


class _Scratch:
    """SparseAutoencoder._scratch's context manager: a plain class, as the encode runs it
    once a batch and a generator-based one (contextlib) cost more of the interpreter."""

    __slots__ = ("model", "rows", "locked")

    def __init__(self, model: "SparseAutoencoder", rows: int) -> None:
        self.model, self.rows, self.locked = model, rows, False

    def __enter__(self) -> dict[str, np.ndarray]:
        self.locked = self.model._workspace_lock.acquire(blocking=False)
        return self.model._buffers(self.rows) if self.locked else self.model._new_buffers(self.rows)

    def __exit__(self, *exc: object) -> None:
        if self.locked:
            self.locked = False
            self.model._workspace_lock.release()


class SparseAutoencoder:
    """A k-sparse (TopK) autoencoder.

    Each sample is encoded as ``pre = (x - b_dec) @ W_enc + b_enc``; only its ``k`` largest
    pre-activations are kept (passed through ``activation``), the rest are zero; the decoder
    reconstructs ``x_hat = z @ W_dec + b_dec``. Training minimises the mean squared error,
    gradients flowing through the kept latents only. ``sparsity`` picks how latents are kept:
    topk, batchtopk, jumprelu (a learned threshold per latent), or the dense classic ones (l1:
    relu with an L1 penalty on the code; kl: sigmoid with a KL-divergence penalty toward a
    target mean activation).

    Parameters are those of :class:`ksae.config.ModelConfig`: ``n_latents``, ``k``,
    ``activation`` ("relu", "linear", "sigmoid", "tanh"), ``init`` ("tied", "xavier", "he"),
    ``normalize_decoder``, ``output_activation`` ("linear", "sigmoid"), ``inference_k_scale``,
    ``b_dec_init`` ("zeros", "mean", "geometric_median"), ``random_state``, ``dtype`` ("float32", "float64") and
    ``n_threads`` (None: all cores).

    Fitted attributes: ``W_enc_`` (d_in, n_latents), ``b_enc_``, ``W_dec_`` (n_latents, d_in),
    ``b_dec_``, ``n_features_in_``, ``n_iter_`` (optimizer steps taken) and ``history_``.

    Example::

        sae = ksae.SparseAutoencoder(n_latents=1000, k=25, random_state=0)
        sae.fit(X, epochs=10, batch_size=256)
        values, indices = sae.encode(X)
    """

    def __init__(self, n_latents: int = 1024, k: int = 32, *, sparsity: str = "topk",
                 max_k: int | None = None, jumprelu_init_threshold: float | None = None,
                 activation: str = "relu",
                 init: str = "tied", normalize_decoder: bool = True,
                 output_activation: str = "linear", inference_k_scale: float = 1.0,
                 b_dec_init: str = "zeros", random_state: int | None = None, dtype: str = "float32",
                 n_threads: int | None = None) -> None:
        self.n_latents = n_latents
        self.k = k
        self.sparsity = sparsity
        self.max_k = max_k
        self.jumprelu_init_threshold = jumprelu_init_threshold
        self.activation = activation
        self.init = init
        self.normalize_decoder = normalize_decoder
        self.output_activation = output_activation
        self.inference_k_scale = inference_k_scale
        self.b_dec_init = b_dec_init
        self.random_state = random_state
        self.dtype = dtype
        self.n_threads = n_threads
        self._params: dict[str, np.ndarray] | None = None
        self._grads: dict[str, np.ndarray] = {}
        self._workspace: dict[str, np.ndarray] = {}
        self._workspace_lock = threading.Lock()
        self._optimizer: Optimizer | None = None
        self._rng: np.random.Generator | None = None

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy support: the lock and the scratch buffers are per-instance.
        state = self.__dict__.copy()
        state["_workspace"] = {}
        del state["_workspace_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._workspace_lock = threading.Lock()

    # ----------------------------------------------------------------- parameters (sklearn)
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, as scikit-learn's ``get_params`` returns them."""
        return {name: getattr(self, name) for name in _MODEL_FIELDS}

    def set_params(self, **params: Any) -> "SparseAutoencoder":
        """Set constructor arguments; unknown names raise a ValueError with suggestions.
        Changing the architecture of a fitted model takes effect at the next ``fit``."""
        check_known_keys("set_params", params, _MODEL_FIELDS)
        ModelConfig(**{**self.get_params(), **params})  # validate the combination first
        for name, value in params.items():
            setattr(self, name, value)
        return self

    @property
    def config(self) -> ModelConfig:
        """The validated model configuration (a copy: changing it changes nothing)."""
        return copy.copy(self._cfg())

    def _cfg(self) -> ModelConfig:
        """The validated model configuration, validated again only when a constructor
        argument changed (a step at (256, 784, 1000, 25) spent 60 us validating it)."""
        values = _model_values(self)
        memo = self.__dict__.get("_cfg_memo")
        if memo is None or memo[0] != values:
            memo = (values, ModelConfig(**dict(zip(_MODEL_FIELDS, values))))
            self._cfg_memo = memo
        return memo[1]

    def __repr__(self) -> str:
        defaults = ModelConfig()
        shown = [f"{k}={v!r}" for k, v in self.get_params().items() if v != getattr(defaults, k)
                 or k in ("n_latents", "k")]
        return f"SparseAutoencoder({', '.join(shown)})"

    # ----------------------------------------------------------------- fitted attributes
    def _fitted(self) -> dict[str, np.ndarray]:
        if self._params is None:
            raise RuntimeError("This SparseAutoencoder is not fitted yet: call fit or partial_fit first")
        return self._params

    @property
    def W_enc_(self) -> np.ndarray:
        """Encoder weights, (d_in, n_latents) (a transposed view of the internal layout)."""
        return self._fitted()["W_enc_t"].T

    @property
    def b_enc_(self) -> np.ndarray:
        """Encoder bias, (n_latents,)."""
        return self._fitted()["b_enc"]

    @property
    def W_dec_(self) -> np.ndarray:
        """Decoder weights, (n_latents, d_in); rows have unit norm with normalize_decoder."""
        return self._fitted()["W_dec"]

    @property
    def b_dec_(self) -> np.ndarray:
        """Decoder bias, (d_in,); it is also subtracted from the input before encoding."""
        return self._fitted()["b_dec"]

    @property
    def log_threshold_(self) -> np.ndarray:
        """jumprelu: the log of each latent's threshold, (n_latents,) (theta = exp of it)."""
        p = self._fitted()
        if "log_threshold" not in p:
            raise AttributeError(f"log_threshold_: only jumprelu models have thresholds; this "
                                 f"one's sparsity is {self.sparsity!r}")
        return p["log_threshold"]

    @property
    def n_features_in_(self) -> int:
        """Input width d_in seen at fit time."""
        return int(self._fitted()["W_dec"].shape[1])

    # ----------------------------------------------------------------- training
    def fit(self, X: Any, *, epochs: int = 10, batch_size: int = 256, lr: float = 1e-3,
            optimizer: str = "adam", shuffle: bool = True, validation_data: Any = None,
            callback: Callable[[dict[str, Any]], None] | None = None,
            checkpoint: str | Path | None = None, **options: Any) -> "SparseAutoencoder":
        """Initialise the weights and train for ``epochs`` passes over ``X``: an array, or a
        ``ksae.NpyRowStream`` to train from a .npy file larger than memory (batches are read
        a window at a time and shuffled by blocks; ``b_dec_init`` and batchtopk's threshold
        then use the file's first 65536 rows).

        ``options`` are the other :class:`ksae.config.TrainConfig` fields (loss, penalties,
        input dropout, schedule, clipping, validation split, early stopping, AuxK,
        resampling, k curriculum, ...; the README lists each with its default).
        ``validation_data`` (or ``validation_split``) is scored after each epoch.
        ``callback`` receives every history record (see ``ksae.training``). Returns self;
        per-epoch figures are in ``history_``, per-``log_every``-steps ones in
        ``step_history_``.

        With ``checkpoint`` (a file path), the full training state is saved there at the end
        of each epoch, every ``checkpoint_every`` steps, and when Ctrl-C interrupts training
        (which finishes the step in progress, saves, and raises ``TrainingInterrupted``);
        ``ksae.resume(checkpoint, X)`` continues such a run exactly.
        """
        check_known_keys("fit", options, _TRAIN_FIELDS)
        train_cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                                shuffle=shuffle, **options)
        cfg = self._cfg()
        rows = training.training_rows(X, cfg.dtype)
        self._rng = np.random.default_rng(cfg.random_state)
        X_val, held_out = None, None
        if validation_data is not None:
            if train_cfg.validation_split:
                raise ValueError("validation_split: give validation_data or validation_split, not both")
            X_val = as_float_matrix(validation_data, "validation_data", cfg.dtype, rows.shape[1])
        elif train_cfg.validation_split:
            if not isinstance(rows, training.ArrayRows):
                raise ValueError("validation_split: a streamed X cannot be split; pass "
                                 "validation_data (rows read into memory) instead")
            held_out = training.validation_rows(rows.shape[0], train_cfg.validation_split, self._rng)
        if train_cfg.early_stopping_patience and X_val is None and held_out is None:
            raise ValueError("early_stopping_patience: early stopping needs validation_data "
                             "or validation_split > 0")
        data = {"fingerprint": data_fingerprint(rows), "validation_rows": held_out}
        if held_out is not None:
            train_X, X_val = training.split_rows(rows.X, held_out)
            rows = training.ArrayRows(train_X)
        self._initialize(rows.shape[1], cfg, rows.sample())
        self._optimizer = make_optimizer(train_cfg)
        self._train(rows, X_val, train_cfg, callback, checkpoint, data)
        return self

    def _train(self, rows: "training.ArrayRows | training.StreamRows", X_val: np.ndarray | None,
               train_cfg: TrainConfig, callback: Callable[[dict[str, Any]], None] | None,
               checkpoint: str | Path | None, data: dict[str, Any],
               position: "training.TrainingPosition | None" = None) -> None:
        def save(path: Path, pos: training.TrainingPosition) -> None:
            save_checkpoint(path, self, train_cfg, pos, data)

        training.train(self, rows, X_val, train_cfg, self._cfg(), callback, position=position,
                       checkpoint=None if checkpoint is None else Path(checkpoint), save=save)

    def partial_fit(self, X: Any, *, lr: float = 1e-3, optimizer: str = "adam",
                    **options: Any) -> "SparseAutoencoder":
        """One optimizer step on ``X`` taken as a single batch, initialising the model on the
        first call. The optimizer's state carries over between calls (and from ``fit``) while
        its kind stays the same; ``lr`` applies from this step on."""
        train = self._partial_fit_config(lr, optimizer, options)
        cfg = self._cfg()
        if self._params is None:
            X = as_float_matrix(X, "X", cfg.dtype, n_threads=self._threads(cfg))
            self._rng = np.random.default_rng(cfg.random_state)
            self._initialize(X.shape[1], cfg, X)
        else:
            self._check_architecture(cfg)
            X = as_float_matrix(X, "X", cfg.dtype, self.n_features_in_, self._threads(cfg))
        if self._optimizer is None or self._optimizer is not self.__dict__.get("_partial_fit_optimizer"):
            fresh = make_optimizer(train)
            if self._optimizer is None or not _same_settings_but_lr(self._optimizer, fresh):
                self._optimizer = fresh
            self._partial_fit_optimizer = self._optimizer
        self._optimizer.lr = train.lr
        self._train_step(X, cfg, train)
        return self

    def _partial_fit_config(self, lr: float, optimizer: str, options: dict[str, Any]) -> TrainConfig:
        """partial_fit's validated TrainConfig, reused while the arguments repeat (as in a
        loop of calls): building and validating it took 100 us of a 5 ms step. A change of
        settings other than lr makes a new optimizer (see partial_fit)."""
        try:  # types too: True == 1, but a flag given 1 must still be refused
            key = (("lr", type(lr), lr), ("optimizer", type(optimizer), optimizer)) if not options \
                else tuple((name, type(value), value) for name, value in
                           sorted({**options, "lr": lr, "optimizer": optimizer}.items()))
            hash(key)
        except TypeError:  # an unhashable option value: validate afresh
            key = None
        memo = self.__dict__.get("_partial_fit_memo")
        if key is not None and memo is not None and memo[0] == key:
            return memo[1]
        check_known_keys("partial_fit", options, _TRAIN_FIELDS)
        train = TrainConfig(lr=lr, optimizer=optimizer, **options)
        if key is not None:
            self._partial_fit_memo = (key, train)
        self._partial_fit_optimizer = None  # settings may have changed: compare them again
        return train

    def _initialize(self, d_in: int, cfg: ModelConfig, X: np.ndarray | None = None) -> None:
        """Fresh weights for input width ``d_in`` (see ``init``; ``b_dec_init`` uses the
        training data X), written straight into their final buffers so that no full-size
        temporaries raise the memory peak. Draws from ``self._rng``."""
        if self._rng is None:
            self._rng = np.random.default_rng(cfg.random_state)
        rng, n, dtype = self._rng, cfg.n_latents, np.dtype(cfg.dtype)

        # Drawn in float64 row chunks (the same stream as one draw, so float32 and float64
        # models with one seed start from the same weights) without a full float64 copy.
        rows = max(1, (8 << 20) // (8 * d_in))

        def draw(sample: Callable[[int], np.ndarray]) -> np.ndarray:
            out = aligned_empty((n, d_in), dtype)
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                out[start:stop] = sample(stop - start)
            return out

        def normal(scale: float) -> np.ndarray:
            return draw(lambda m: rng.standard_normal((m, d_in)) * scale)

        def uniform(bound: float) -> np.ndarray:
            return draw(lambda m: rng.uniform(-bound, bound, (m, d_in)))

        if cfg.init == "tied":
            W_dec = normal(1.0)
            normalize_rows(W_dec)
            W_enc_t = aligned_copy(W_dec)
        elif cfg.init == "xavier":
            bound = np.sqrt(6.0 / (d_in + n))
            W_enc_t, W_dec = uniform(bound), uniform(bound)
        else:  # he: variance 2 / fan_in for each layer
            W_enc_t, W_dec = normal(np.sqrt(2.0 / d_in)), normal(np.sqrt(2.0 / n))
        if cfg.normalize_decoder:
            normalize_rows(W_dec)
        b_dec = initial_decoder_bias(X, cfg.b_dec_init) if X is not None else None
        params = {"W_enc_t": W_enc_t, "b_enc": np.zeros(n), "W_dec": W_dec,
                  "b_dec": np.zeros(d_in) if b_dec is None else b_dec}
        if cfg.sparsity == "jumprelu":
            params["log_threshold"] = np.zeros(n)  # set below: calibrating needs the weights
        self._set_weights(params, dtype)
        if cfg.sparsity == "jumprelu":
            self._params["log_threshold"].fill(np.log(self._initial_threshold(cfg, X)))
        self._reset_training_state(n)

    def _initial_threshold(self, cfg: ModelConfig, X: np.ndarray | None) -> float:
        """jumprelu's starting threshold: jumprelu_init_threshold, or by default the one that
        k latents per sample of (up to 4096 rows of) X exceed on average with the initial
        weights, so that the cap max_k does not bind from the start (at least 1e-6)."""
        if cfg.jumprelu_init_threshold is not None:
            return cfg.jumprelu_init_threshold
        if X is None:
            return 1e-3
        sample = X[:4096]
        width = self.code_width(cfg)
        with self._scratch(sample.shape[0]) as ws:
            pre, _ = _core.encode(sample, self._params["W_enc_t"], self._params["b_enc"],
                                  self._params["b_dec"], width, "linear", self._threads(cfg),
                                  ws["centered"])
        flat = pre.reshape(-1)
        budget = min(flat.size, cfg.k * sample.shape[0])
        return max(float(np.partition(flat, flat.size - budget)[flat.size - budget]), 1e-6)

    def _reset_training_state(self, n_latents: int) -> None:
        self._optimizer = None
        self.n_iter_ = 0
        self.history_: dict[str, list] = {}
        self.step_history_: dict[str, list] = {}
        self.samples_since_fired_ = np.zeros(n_latents, dtype=np.int64)
        self.threshold_: float | None = None  # batchtopk's inference threshold

    def _set_weights(self, params: dict[str, np.ndarray], dtype: np.dtype) -> None:
        names = PARAM_NAMES + (("log_threshold",) if "log_threshold" in params else ())
        self._params = {name: as_aligned(params[name], dtype) for name in names}
        self._grads = {name: aligned_empty(p.shape, dtype) for name, p in self._params.items()}
        self._workspace = {}

    def _check_architecture(self, cfg: ModelConfig) -> None:
        p = self._fitted()
        if p["W_dec"].shape[0] != cfg.n_latents or p["W_dec"].dtype != np.dtype(cfg.dtype):
            raise ValueError(
                f"n_latents/dtype: the model holds weights for n_latents={p['W_dec'].shape[0]}, "
                f"dtype={p['W_dec'].dtype}, but its parameters now say n_latents={cfg.n_latents}, "
                f"dtype={cfg.dtype}; call fit to re-initialise")
        if ("log_threshold" in p) != (cfg.sparsity == "jumprelu"):
            raise ValueError(f"sparsity: the model's weights are not those of a "
                             f"sparsity={cfg.sparsity!r} model (jumprelu has thresholds, the "
                             f"others none); call fit to re-initialise")

    def _buffers(self, rows: int, pre: bool = False) -> dict[str, np.ndarray]:
        """Scratch arrays for a batch of ``rows`` samples, grown as needed, reused otherwise.
        ``pre`` adds the (rows, n_latents) pre-activations, which only AuxK needs (the encode
        fuses the selection with the product without it): a model trained without AuxK never
        holds that array. The caller must hold ``_workspace_lock``."""
        ws = self._workspace
        if ws.get("centered") is None or ws["centered"].shape[0] < rows:
            ws.update(self._new_buffers(rows))
        if pre and (ws.get("pre") is None or ws["pre"].shape[0] < rows):
            ws["pre"] = self._pre_buffer(rows)
        return {key: buf[:rows] for key, buf in ws.items() if pre or key != "pre"}

    def _new_buffers(self, rows: int) -> dict[str, np.ndarray]:
        d, dtype = self._params["W_dec"].shape[1], self._params["W_dec"].dtype
        return {"centered": aligned_empty((rows, d), dtype), "x_hat": aligned_empty((rows, d), dtype)}

    def _pre_buffer(self, rows: int) -> np.ndarray:
        return aligned_empty((rows, self._params["W_dec"].shape[0]), self._params["W_dec"].dtype)

    def _scratch(self, rows: int) -> "_Scratch":
        """``with model._scratch(rows) as ws``: the shared scratch arrays when no other thread
        is using them (the kernels run without the GIL, so concurrent calls are real),
        otherwise private ones."""
        return _Scratch(self, rows)

    def _train_step(self, batch: np.ndarray, cfg: ModelConfig, train_cfg: TrainConfig | None = None,
                    k: int | None = None) -> StepResult:
        """Forward, loss, backward (plus AuxK), clipping and optimizer update on one batch,
        shared by fit and partial_fit; ``k`` overrides cfg.k (the k curriculum). Returns the
        loss before the update and the batch's code."""
        with self._workspace_lock:
            return self._locked_train_step(batch, cfg, train_cfg or TrainConfig(), k or cfg.k)

    def _locked_train_step(self, batch: np.ndarray, cfg: ModelConfig, train_cfg: TrainConfig,
                           k: int) -> StepResult:
        if self._fuses_step(cfg, train_cfg):
            return self._fused_step(batch, cfg, k)
        p, g, nt = self._params, self._grads, self._threads(cfg)
        auxk = train_cfg.auxk_coef > 0
        ws = self._buffers(batch.shape[0], pre=auxk)
        encoded = batch
        if train_cfg.input_dropout > 0:  # denoising: encode a masked copy, reconstruct the clean one
            encoded = batch * (self._rng.random(batch.shape) >= train_cfg.input_dropout)
        width = self.code_width(cfg, k)
        selected_pre = self._selected_pre_buffer(batch.shape[0], width, cfg)
        # AuxK selects again from the pre-activations, so only then does encode keep them
        # (ws holds "pre" only when asked for).
        values, indices, gap = self._encode(encoded, width, cfg, nt, ws, selected_pre)
        if cfg.sparsity == "batchtopk":
            self._keep_batch_top(values, k)
        if self._linear_mse(cfg, train_cfg):
            # Decode and loss in one kernel: on several threads it decodes by latent group,
            # so that each core reads the decoder rows it updates in the backward.
            loss, grad_out = _core.decode_mse(values, indices, p["W_dec"], p["b_dec"], batch, nt,
                                              ws["x_hat"])
        else:
            x_hat = _core.decode(values, indices, p["W_dec"], p["b_dec"], nt, ws["x_hat"])
            loss, grad_out = reconstruction_loss(x_hat, batch, cfg.output_activation, train_cfg.loss)
        sparsity_loss, grad_values = code_penalty(values, indices, cfg, train_cfg)
        self._check_finite("loss", loss + sparsity_loss)
        fused = self._fuses_adam(train_cfg, gap)
        auxk_loss, rows = 0.0, None
        if fused:
            self._backward_adam(grad_out, ws["centered"], values, indices, cfg, nt,
                                selected_pre, grad_values)
        else:
            dvalues = np.empty_like(values) if gap is not None else None  # dL/dz for the thresholds
            _core.backward(grad_out, ws["centered"], values, indices, p["W_enc_t"], p["W_dec"],
                           cfg.activation, cfg.normalize_decoder, nt, g["W_enc_t"], g["b_enc"],
                           g["W_dec"], g["b_dec"], False, selected_pre, grad_values, dvalues)
            if gap is not None:
                jumprelu_threshold_gradient(gap, indices, dvalues, p["log_threshold"],
                                            train_cfg.jumprelu_bandwidth, train_cfg.l0_coef,
                                            g["log_threshold"])
            if auxk:
                auxk_loss = self._auxk_backward(batch, grad_out, ws, cfg, train_cfg, nt)
            if train_cfg.l1_weight or train_cfg.l2_weight:
                add_weight_penalties(p, g, train_cfg.l1_weight, train_cfg.l2_weight)
            if train_cfg.clip_grad_norm is not None:
                self._check_finite("gradient norm", clip_gradients(g, train_cfg.clip_grad_norm, nt))
            # Before the firing counts move: with AuxK the dead latents count as touched.
            rows = self._touched_rows(indices, train_cfg) if train_cfg.lazy_adam else None
        # One call where NumPy took four (an active mask, a boolean index, a scatter and an
        # add): in the step, after the kernels have pushed the interpreter's and NumPy's code
        # and data out of the caches, those took 65-73 us of a 4 ms step at
        # (256, 784, 1000, 25).
        above = active_threshold(cfg)
        _core.mark_fired(self.samples_since_fired_, values, indices, batch.shape[0], above)
        if not fused:
            self._optimizer.step(p, g, unit_norm_rows=frozenset({"W_dec"}) if cfg.normalize_decoder
                                 else frozenset(), n_threads=nt, rows=rows)
        self.n_iter_ += 1
        return StepResult(loss, values, indices, auxk_loss, sparsity_loss, above)

    def _backward_adam(self, grad_out: np.ndarray, centered: np.ndarray, values: np.ndarray,
                       indices: np.ndarray, cfg: ModelConfig, nt: int,
                       selected_pre: np.ndarray | None, grad_values: np.ndarray | None) -> None:
        """Backward and the Adam update in one kernel: each latent's rows are updated as soon
        as the gradient rows of its block of latents are formed, bitwise as backward then
        Optimizer.step would leave them (the whole weight gradients are never stored). See
        _fuses_adam for when it applies."""
        p, g, opt = self._params, self._grads, self._optimizer
        opt.n_steps += 1
        exp_avg, exp_avg_sq = opt.moments(p)
        _core.backward_adam(grad_out, centered, values, indices, p["W_enc_t"], p["b_enc"],
                            p["W_dec"], p["b_dec"], exp_avg, exp_avg_sq, g["b_enc"], g["b_dec"],
                            cfg.activation, cfg.normalize_decoder, cfg.normalize_decoder, nt,
                            opt.lr, opt.betas[0], opt.betas[1], opt.eps, opt.weight_decay,
                            opt.n_steps, selected_pre, grad_values)

    def _fuses_step(self, cfg: ModelConfig, train_cfg: TrainConfig) -> bool:
        """Whether the whole step is one kernel call (_core.train_step_adam): topk on the
        clean batch, the MSE of the linear output, and an Adam update that fuses into the
        backward (see _fuses_adam)."""
        return (cfg.sparsity == "topk" and not train_cfg.input_dropout
                and self._linear_mse(cfg, train_cfg) and self._fuses_adam(train_cfg, None))

    def _fused_step(self, batch: np.ndarray, cfg: ModelConfig, k: int) -> StepResult:
        """The step of _locked_train_step in one kernel call, bitwise the same: encode,
        decode_mse, backward_adam and mark_fired without the interpreter between them (the
        separate calls cost 38-62 us more of a 4 ms step at (256, 784, 1000, 25), alternated
        in one process). On a non-finite loss the kernel updates nothing and the step raises
        as the separate kernels' step does."""
        p, g, opt, rows = self._params, self._grads, self._optimizer, batch.shape[0]
        ws = self._buffers(rows)
        exp_avg, exp_avg_sq = opt.moments(p)
        loss, values, indices = _core.train_step_adam(
            batch, p["W_enc_t"], p["b_enc"], p["W_dec"], p["b_dec"], exp_avg, exp_avg_sq,
            g["b_enc"], g["b_dec"], self.samples_since_fired_, k, cfg.activation,
            cfg.normalize_decoder, self._threads(cfg), opt.lr, opt.betas[0], opt.betas[1],
            opt.eps, opt.weight_decay, opt.n_steps + 1, ws["centered"], ws["x_hat"],
            self._selected_pre_buffer(rows, k, cfg))
        self._check_finite("loss", loss)
        opt.n_steps += 1
        self.n_iter_ += 1
        return StepResult(loss, values, indices, 0.0, 0.0, None)

    @staticmethod
    def _linear_mse(cfg: ModelConfig, train_cfg: TrainConfig) -> bool:
        """Whether the model trains on the MSE of its linear output: the loss decode_mse
        computes, and the residual AuxK reconstructs."""
        return train_cfg.loss == "mse" and cfg.output_activation == "linear"

    def _fuses_adam(self, train_cfg: TrainConfig, gap: np.ndarray | None) -> bool:
        """Whether this step's Adam update can be fused into the backward kernel: plain
        (not lazy) Adam on exactly the four parameters, with nothing between the gradients and
        the update (no AuxK second backward, weight penalty or clipping) and no threshold
        gradient (jumprelu)."""
        return (type(self._optimizer) is Adam and not self._optimizer.lazy and gap is None
                and train_cfg.auxk_coef == 0 and not train_cfg.l1_weight
                and not train_cfg.l2_weight and train_cfg.clip_grad_norm is None
                and len(self._params) == len(PARAM_NAMES))

    def _encode(self, X: np.ndarray, width: int, cfg: ModelConfig, nt: int,
                ws: dict[str, np.ndarray], selected_pre: np.ndarray | None = None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The code of a batch, ``width`` latents per row, with the scratch arrays ``ws``:
        (values, indices, gap). For jumprelu the encode keeps the ``width`` largest
        ``pre - theta`` (bias ``b_enc - theta``, linear activation), values become the
        pre-activations above their thresholds (zeros below) and ``gap`` holds the kept
        ``pre - theta``, which the thresholds' gradient needs; otherwise ``gap`` is None."""
        p = self._params
        if cfg.sparsity != "jumprelu":
            values, indices = _core.encode(X, p["W_enc_t"], p["b_enc"], p["b_dec"], width,
                                           cfg.activation, nt, ws["centered"], ws.get("pre"),
                                           selected_pre)
            return values, indices, None
        threshold = np.exp(p["log_threshold"])
        gap, indices = _core.encode(X, p["W_enc_t"], p["b_enc"] - threshold, p["b_dec"], width,
                                    "linear", nt, ws["centered"], ws.get("pre"))
        return jumprelu_values(gap, indices, threshold), indices, gap

    def _touched_rows(self, indices: np.ndarray, train_cfg: TrainConfig) -> dict[str, np.ndarray]:
        """lazy_adam: the latents whose parameters received gradient this step (those the
        batch selected, and with AuxK every dead latent, a superset of those it selected),
        per per-latent parameter."""
        touched = np.zeros(self.samples_since_fired_.shape[0], dtype=bool)
        touched[indices.reshape(-1)] = True
        if train_cfg.auxk_coef > 0:
            touched |= self.samples_since_fired_ >= train_cfg.dead_after_samples
        latents = np.flatnonzero(touched).astype(np.int64)
        rows = {"W_enc_t": latents, "W_dec": latents, "b_enc": latents}
        if "log_threshold" in self._params:  # jumprelu: a threshold moves with its latent
            rows["log_threshold"] = latents
        return rows

    @staticmethod
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

    def _keep_batch_top(self, values: np.ndarray, k: int) -> None:
        """BatchTopK, in place: of the (batch, max_k) candidate values keep the k * batch
        largest over the whole batch (zeroing the rest; relu makes a zero carry no gradient)
        and fold the smallest kept value into a running estimate of the inference threshold
        (which fit then calibrates on the training data, see calibrate_threshold)."""
        budget = k * values.shape[0]
        flat = values.reshape(-1)
        if budget < flat.size:
            cut = np.partition(flat, flat.size - budget)[flat.size - budget]
            values[values < cut] = 0
        kept = values[values > 0]
        if kept.size:
            smallest = float(kept.min())
            step = self.n_iter_ + 1  # a plain mean at first, then an exponential one
            rate = max(1.0 / step, 0.01)
            self.threshold_ = (smallest if self.threshold_ is None
                               else (1 - rate) * self.threshold_ + rate * smallest)

    @staticmethod
    def _selected_pre_buffer(rows: int, k: int, cfg: ModelConfig) -> np.ndarray | None:
        """Room for the kept pre-activations when the activation's derivative needs them."""
        return np.empty((rows, k), dtype=cfg.dtype) if cfg.activation in NEEDS_SELECTED_PRE else None

    def _check_finite(self, what: str, value: float) -> None:
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training diverged at step {self.n_iter_ + 1}: the {what} is {value}; the "
                "weights are those of the last finite step. Lower the learning rate or rescale "
                "the data.")

    def _auxk_backward(self, batch: np.ndarray, grad_out: np.ndarray, ws: dict[str, np.ndarray],
                       cfg: ModelConfig, train_cfg: TrainConfig, nt: int) -> float:
        """AuxK (Gao et al., 2024): the top auxk_k dead latents of each sample, chosen from the
        pre-activations the encode left in ``ws["pre"]``, reconstruct the main model's residual
        e = X - X_hat. Adds the gradients of ``auxk_coef * |e_hat - e|^2 / |e - mean(e)|^2`` to
        the main ones; e is a constant (no gradient flows back into the main reconstruction).
        Returns the AuxK loss (0 when no latent is dead)."""
        if cfg.sparsity in DENSE_SPARSITIES:
            raise ValueError(f"auxk_coef: AuxK revives dead latents of a k-sparse model; "
                             f"sparsity={cfg.sparsity!r} puts every latent in the code")
        if not self._linear_mse(cfg, train_cfg):
            raise ValueError("auxk_coef: AuxK reconstructs the residual of a linear-output MSE "
                             f"model; this one has loss={train_cfg.loss!r}, "
                             f"output_activation={cfg.output_activation!r}")
        dead = self.samples_since_fired_ >= train_cfg.dead_after_samples
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0.0
        p, g = self._params, self._grads
        k_aux = min(train_cfg.auxk_k or 2 * cfg.k, n_dead)
        bias = np.where(dead, p["b_enc"], -np.inf).astype(p["b_enc"].dtype)
        selected_pre = self._selected_pre_buffer(batch.shape[0], k_aux, cfg)
        values, indices = _core.select_topk(ws["pre"], bias, k_aux, cfg.activation, nt, selected_pre)
        residual = grad_out * grad_out.dtype.type(-grad_out.size / 2)  # X - X_hat, from the MSE gradient
        scale = float(np.sum((residual - residual.mean(axis=0)) ** 2, dtype=np.float64))
        if scale == 0:
            return 0.0
        # e_hat = dense(values) @ W_dec: the kernels' decode with a zero bias, so that AuxK
        # trains the dead latents and leaves b_dec to the main loss.
        zero_bias = np.zeros_like(p["b_dec"])
        diff = _core.decode(values, indices, p["W_dec"], zero_bias, nt) - residual
        loss = train_cfg.auxk_coef * float(np.sum(diff * diff, dtype=np.float64)) / scale
        grad = diff * diff.dtype.type(2 * train_cfg.auxk_coef / scale)
        _core.backward(grad, ws["centered"], values, indices, p["W_enc_t"], p["W_dec"],
                       cfg.activation, cfg.normalize_decoder, nt, g["W_enc_t"], g["b_enc"],
                       g["W_dec"], g["b_dec"], True, selected_pre)
        # The kernel's b_dec gradient includes the decoder's bias term, absent from e_hat;
        # keep only the encoder's part (b_dec is subtracted from the input before encoding).
        g["b_dec"] -= grad.sum(axis=0)
        return loss

    def _resample_dead_latents(self, batch: np.ndarray, train_cfg: TrainConfig) -> int:
        """Re-initialise every dead latent toward an input the model reconstructs badly
        (after Anthropic's resampling): inputs of ``batch`` are drawn with probability
        proportional to their squared reconstruction error; a dead latent's decoder row
        becomes the unit direction of that input's residual, its encoder row the same
        direction at the mean norm of the live encoder rows (not Anthropic's 0.2 times: in a
        TopK model a latent must win a place in the top k, and at 0.2 it measurably died
        again), its bias 0, and its optimizer state is cleared. Returns how many latents were
        resampled."""
        dead = np.flatnonzero(self.samples_since_fired_ >= train_cfg.dead_after_samples)
        if dead.size == 0:
            return 0
        residual = (batch - self.reconstruct(batch)).astype(np.float64)
        error = np.einsum("ij,ij->i", residual, residual)
        usable = error > 0
        if not usable.any():
            return 0
        chosen = self._rng.choice(batch.shape[0], size=dead.size, p=error / error.sum())
        directions = residual[chosen] / np.sqrt(error[chosen])[:, None]
        p = self._params
        alive = np.ones(p["W_dec"].shape[0], dtype=bool)
        alive[dead] = False
        enc_norm = float(np.linalg.norm(p["W_enc_t"][alive], axis=1).mean()) if alive.any() else 1.0
        p["W_dec"][dead] = directions
        p["W_enc_t"][dead] = directions * enc_norm
        p["b_enc"][dead] = 0
        if "log_threshold" in p:  # the dead latents' encoder rows are new: their thresholds too
            p["log_threshold"][dead] = np.median(p["log_threshold"][alive]) if alive.any() else 0
        for name in ("W_dec", "W_enc_t", "b_enc", "log_threshold"):
            for buffer in self._optimizer.state.get(name, {}).values():
                buffer[dead] = 0
        self.samples_since_fired_[dead] = 0
        return int(dead.size)

    @staticmethod
    def _threads(cfg: ModelConfig) -> int:
        return cfg.n_threads or 0

    # ----------------------------------------------------------------- inference
    def encode(self, X: Any) -> SparseCode:
        """The k-sparse code of each row of ``X``: ``SparseCode(values, indices)``, each
        (n_samples, k'), values in decreasing order (the lower index first on ties), where
        k' = round(inference_k_scale * k) (k by default). With batchtopk, k' is the per-sample
        cap and values below the learned ``threshold_`` are zero. With jumprelu, k' is the
        per-sample cap, values at or below their latent's threshold are zero, and the order is
        that of pre-activation minus threshold. With the dense sparsities (l1, kl) k' =
        n_latents: every latent, relu's inactive ones at zero."""
        values, indices = self._candidates(X)
        if self._cfg().sparsity == "batchtopk":
            # Per sample, independent of the batch: every latent above the learned threshold.
            values[values < (self.threshold_ or 0.0)] = 0
        return SparseCode(values, indices)

    def _candidates(self, X: Any) -> SparseCode:
        """The top code_width latents of each row, before any batchtopk threshold."""
        cfg = self._cfg()
        self._check_architecture(cfg)
        nt = self._threads(cfg)
        X = as_float_matrix(X, "X", cfg.dtype, self.n_features_in_, nt)
        n = X.shape[0]
        k = self.code_width(cfg, self.inference_k(cfg))
        chunk = _encode_chunk_rows(X.itemsize)
        if n <= chunk:  # one call, whose arrays are the code
            with self._scratch(n) as ws:
                values, indices, _ = self._encode(X, k, cfg, nt, ws)
            return SparseCode(values, indices)
        values = np.empty((n, k), dtype=cfg.dtype)
        indices = np.empty((n, k), dtype=np.int64)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            with self._scratch(stop - start) as ws:
                values[start:stop], indices[start:stop], _ = self._encode(X[start:stop], k,
                                                                          cfg, nt, ws)
        return SparseCode(values, indices)

    def calibrate_threshold(self, X: Any) -> float:
        """batchtopk: set ``threshold_`` so that encoding X keeps k latents per sample on
        average (the (n_samples * k)-th largest candidate activation of X), which makes
        single-sample encoding match training's batch sparsity. ``fit`` calls it on the
        training data at the end; call it after ``partial_fit`` training. Returns it."""
        cfg = self._cfg()
        if cfg.sparsity != "batchtopk":
            raise ValueError(f"sparsity: calibrate_threshold is for 'batchtopk', this model uses {cfg.sparsity!r}")
        flat = self._candidates(X).values.reshape(-1)
        budget = min(flat.size, cfg.k * (flat.size // self.code_width(cfg)))
        self.threshold_ = float(np.partition(flat, flat.size - budget)[flat.size - budget])
        return self.threshold_

    @staticmethod
    def inference_k(cfg: ModelConfig) -> int:
        """Latents kept per sample by encode: round(inference_k_scale * k), within [1, n_latents]."""
        return int(min(cfg.n_latents, max(1, round(cfg.inference_k_scale * cfg.k))))

    def transform(self, X: Any) -> np.ndarray:
        """Dense codes, (n_samples, n_latents), zero outside each row's k kept latents."""
        values, indices = self.encode(X)
        dense = np.zeros((values.shape[0], self._cfg().n_latents), dtype=values.dtype)
        np.put_along_axis(dense, indices, values, axis=1)
        return dense

    def decode(self, values: Any, indices: Any) -> np.ndarray:
        """Reconstruct inputs from sparse codes: ``out(dense(values, indices) @ W_dec + b_dec)``
        with ``out`` the output activation (identity or sigmoid)."""
        cfg = self._cfg()
        self._check_architecture(cfg)
        v, i = as_code(values, indices, cfg.dtype, cfg.n_latents)
        p = self._params
        X_hat = _core.decode(v, i, p["W_dec"], p["b_dec"], self._threads(cfg))
        return sigmoid(X_hat, out=X_hat) if cfg.output_activation == "sigmoid" else X_hat

    def reconstruct(self, X: Any) -> np.ndarray:
        """``decode(*encode(X))``: the model's reconstruction of each row of ``X``."""
        return self.decode(*self.encode(X))

    def score(self, X: Any) -> float:
        """Fraction of the variance of ``X`` explained by the reconstruction (1 is perfect;
        0 is no better than predicting the mean of X)."""
        X = as_float_matrix(X, "X", self._cfg().dtype)
        return fraction_of_variance_explained(X, self.reconstruct(X))

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write the model to the directory ``path`` (created if needed): the weights as
        ``model.safetensors`` and the configuration as ``config.json``. See ``ksae.load``."""
        from .serialization import save_model

        return save_model(self, path)

    def _state_for_saving(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        p = self._fitted()
        self._check_architecture(self._cfg())
        meta = {"params": asdict(self._cfg()), "n_iter": self.n_iter_,
                "threshold": self.threshold_,
                "history": getattr(self, "history_", {})}
        weights = {"W_enc": np.ascontiguousarray(p["W_enc_t"].T), "b_enc": p["b_enc"],
                   "W_dec": p["W_dec"], "b_dec": p["b_dec"]}
        if "log_threshold" in p:  # jumprelu
            weights["log_threshold"] = p["log_threshold"]
        return meta, weights

    def _restore(self, meta: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
        cfg = self._cfg()
        params = {"W_enc_t": weights["W_enc"].T, "b_enc": weights["b_enc"],
                  "W_dec": weights["W_dec"], "b_dec": weights["b_dec"]}
        if "log_threshold" in weights:  # jumprelu
            params["log_threshold"] = weights["log_threshold"]
        self._set_weights(params, np.dtype(cfg.dtype))
        self._rng = np.random.default_rng(cfg.random_state)
        self._reset_training_state(cfg.n_latents)
        self.n_iter_ = int(meta.get("n_iter", 0))
        self.history_ = meta.get("history", {})
        threshold = meta.get("threshold")
        self.threshold_ = None if threshold is None else float(threshold)
