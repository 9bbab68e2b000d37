"""The estimator ``SparseAutoencoder``: a scikit-learn-shaped facade over a model state
(``ksae.state``), the training step (``ksae.steps``) and the trainer (``ksae.training``).

It stores its constructor arguments, checks input, and delegates: every computation lives in
the layers below it.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import sklearn_compat
from .batches import BatchSource, fingerprint, training_rows
from .normalization import fold_input_scale, normalized
from .config import ModelConfig, TrainConfig, check_known_keys, field_names
from .fitted import FittedAttributes
from .metrics import fraction_of_variance_explained
from .optim import Optimizer, make_optimizer
from .serialization import save_model
from .state import ModelState, SparseCode, code_width, inference_k
from .steps import train_step
from .training import Trainer, TrainingPosition, hold_out
from .validation import as_float_matrix

_MODEL_FIELDS = tuple(field_names(ModelConfig))
_TRAIN_FIELDS = tuple(field_names(TrainConfig))
_model_values = operator.attrgetter(*_MODEL_FIELDS)  # a model's constructor arguments, as a tuple


def _same_settings_but_lr(a: Optimizer, b: Optimizer) -> bool:
    """Whether two optimizers differ at most in their learning rate (so state carries over)."""
    return type(a) is type(b) and {**a.hyperparameters(), "lr": None} == {**b.hyperparameters(), "lr": None}


def _partial_fit_config(model: "SparseAutoencoder", options: dict[str, Any]) -> TrainConfig:
    """partial_fit's validated TrainConfig, reused while the arguments repeat (as in a loop
    of calls): building and validating it took 100 us of a 5 ms step. A change of settings
    other than lr makes a new optimizer (see partial_fit)."""
    try:  # types too: True == 1, but a flag given 1 must still be refused
        key = tuple((name, type(value), value) for name, value in sorted(options.items()))
        hash(key)
    except TypeError:  # an unhashable option value: validate afresh
        key = None
    memo = model.__dict__.get("_partial_fit_memo")
    if key is not None and memo is not None and memo[0] == key:
        return memo[1]
    check_known_keys("partial_fit", options, _TRAIN_FIELDS)
    train = TrainConfig(**options)
    if key is not None:
        model._partial_fit_memo = (key, train)
    model._partial_fit_optimizer = None  # settings may have changed: compare them again
    return train


def _partial_fit_optimizer(model: "SparseAutoencoder", train: TrainConfig) -> Optimizer:
    """The optimizer of a partial_fit step at ``train.lr``: the model's own while its
    settings but lr stay the same (so its state carries over, from fit too), else a new one."""
    if model._optimizer is None or model._optimizer is not model.__dict__.get("_partial_fit_optimizer"):
        fresh = make_optimizer(train)
        if model._optimizer is None or not _same_settings_but_lr(model._optimizer, fresh):
            model._optimizer = fresh
        model._partial_fit_optimizer = model._optimizer
    model._optimizer.lr = train.lr
    return model._optimizer


def _split_params(model: "SparseAutoencoder", params: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """set_params's arguments checked and split into (constructor arguments, the training
    defaults they leave), validated together with the model's other values."""
    check_known_keys("set_params", params, _MODEL_FIELDS + _TRAIN_FIELDS)
    arch = {name: value for name, value in params.items() if name in _MODEL_FIELDS}
    training = {**model._training, **{name: value for name, value in params.items()
                                      if name not in arch}}
    ModelConfig(**{**{name: getattr(model, name) for name in _MODEL_FIELDS}, **arch})
    TrainConfig(**training)
    return arch, training


class SparseAutoencoder(FittedAttributes):
    """A k-sparse (TopK) autoencoder.

    Each sample is encoded as ``pre = (x - b_dec) @ W_enc + b_enc``; only its ``k`` largest
    pre-activations are kept (passed through ``activation``), the rest are zero; the decoder
    reconstructs ``x_hat = z @ W_dec + b_dec``. Training minimises the mean squared error,
    gradients flowing through the kept latents only. ``sparsity`` picks how latents are kept:
    topk, batchtopk, jumprelu (a learned threshold per latent), or the dense classic ones (l1:
    relu with an L1 penalty on the code; kl: sigmoid with a KL-divergence penalty toward a
    target mean activation). The parameters are the fields of :class:`ksae.config.ModelConfig`;
    fields of :class:`ksae.config.TrainConfig` given too (``lr=3e-4, epochs=20``) become the
    defaults of ``fit`` and ``partial_fit``, so that scikit-learn's searches can tune them.

    Fitted attributes: ``W_enc_`` (d_in, n_latents), ``b_enc_``, ``W_dec_`` (n_latents, d_in),
    ``b_dec_``, ``n_features_in_``, ``n_iter_`` (optimizer steps taken), ``history_``,
    ``step_history_``, ``samples_since_fired_``, ``threshold_`` (batchtopk), ``state_`` (the
    ``ksae.state.ModelState`` behind them). A scikit-learn transformer: ``transform`` gives
    dense codes, ``inverse_transform`` maps them back, and it works in pipelines and searches.

    Example::

        sae = ksae.SparseAutoencoder(n_latents=1000, k=25, random_state=0)
        sae.fit(X, epochs=10, batch_size=256)
        values, indices = sae.encode(X)
    """

    def __init__(self, n_latents: int = 1024, k: int = 32, *, sparsity: str = "topk",
                 max_k: int | None = None, jumprelu_init_threshold: float | None = None,
                 activation: str = "relu", init: str = "tied", normalize_decoder: bool = True,
                 output_activation: str = "linear", inference_k_scale: float = 1.0,
                 b_dec_init: str = "zeros", random_state: int | None = None, dtype: str = "float32",
                 n_threads: int | None = None, **training: Any) -> None:
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
        unknown = [name for name in training if name not in _TRAIN_FIELDS]
        if unknown:
            raise TypeError(f"SparseAutoencoder: unexpected argument(s) {unknown}; expected the "
                            f"fields of ModelConfig ({', '.join(_MODEL_FIELDS)}) or TrainConfig")
        self._training = training
        self._state: ModelState | None = None
        self._optimizer: Optimizer | None = None

    # ----------------------------------------------------------------- parameters
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments (the training defaults given too), as scikit-learn's
        ``get_params`` returns them."""
        return {**{name: getattr(self, name) for name in _MODEL_FIELDS}, **self._training}

    def set_params(self, **params: Any) -> "SparseAutoencoder":
        """Set constructor arguments or training defaults; unknown names raise a ValueError
        with suggestions, and nothing changes unless every value is valid. Changing the
        architecture of a fitted model takes effect at the next ``fit``."""
        arch, self._training = _split_params(self, params)
        for name, value in arch.items():
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
        defaults = {**asdict(ModelConfig()), **asdict(TrainConfig())}
        shown = [f"{k}={v!r}" for k, v in self.get_params().items() if v != defaults[k]
                 or k in ("n_latents", "k")]
        return f"SparseAutoencoder({', '.join(shown)})"

    def __sklearn_tags__(self) -> Any:
        return sklearn_compat.transformer_tags(self.dtype)

    def __sklearn_is_fitted__(self) -> bool:
        return self._state is not None

    # ----------------------------------------------------------------- training
    def fit(self, X: Any, y: Any = None, *, validation_data: Any = None,
            callback: Callable[[dict[str, Any]], None] | None = None,
            checkpoint: str | Path | None = None, **options: Any) -> "SparseAutoencoder":
        """Initialise the weights and train for ``epochs`` passes over ``X``: an array, a
        ``ksae.NpyRowStream`` (a .npy file larger than memory, read a window at a time and
        shuffled by blocks; ``b_dec_init`` and batchtopk's threshold use its first 65536
        rows), or any ``ksae.BatchSource``. ``y`` is ignored. ``options`` are TrainConfig
        fields (``epochs=10``, ``batch_size=256``, ``lr=1e-3``, ``optimizer="adam"``,
        schedule, AuxK, ...: the README lists each), over the constructor's training defaults.
        ``validation_data`` (or ``validation_split``) is scored after each epoch;
        ``callback`` receives every history record (``history_``, ``step_history_``).
        With ``checkpoint`` (a file path) the training state is saved there after each epoch,
        every ``checkpoint_every`` steps and on Ctrl-C (which then raises
        ``TrainingInterrupted``); ``ksae.resume(checkpoint, X)`` continues the run exactly."""
        options = {**self._training, **options}
        check_known_keys("fit", options, _TRAIN_FIELDS)
        train_cfg = TrainConfig(**options)
        cfg = self._cfg()
        source = training_rows(X, cfg.dtype)
        rng = np.random.default_rng(cfg.random_state)
        X_val, held_out = hold_out(source, validation_data, train_cfg, rng, cfg.dtype)
        data = {"fingerprint": fingerprint(source), "validation_rows": held_out}
        if held_out is not None:
            source, X_val = source.split(held_out)
        source, X_val, scale = normalized(source, X_val, train_cfg, cfg)
        self._start(ModelState.initialize(cfg, source.shape[1], rng, source.sample()))
        self._optimizer = make_optimizer(train_cfg)
        trainer = Trainer(self._state, self._optimizer, train_cfg, callback=callback,
                          checkpoint=checkpoint, data=data, history=self.history_,
                          step_history=self.step_history_)
        return self.train_with(trainer, source, X_val, input_scale=scale)

    def _start(self, state: ModelState, history: dict[str, list] | None = None,
               step_history: dict[str, list] | None = None) -> None:
        """Hold ``state`` as the fitted model, with fresh (or the given) histories."""
        self._state, self._optimizer = state, None
        self.history_ = {} if history is None else history
        self.step_history_ = {} if step_history is None else step_history
        for name in ("stopped_epoch_", "best_epoch_"):
            self.__dict__.pop(name, None)

    def train_with(self, trainer: Trainer, source: BatchSource, X_val: np.ndarray | None = None,
                   position: TrainingPosition | None = None, *,
                   input_scale: float = 1.0) -> "SparseAutoencoder":
        """Run ``trainer`` (made on this model's ``state_``) over the batch source, scoring
        ``X_val`` after each epoch, from ``position`` when resuming; records
        ``stopped_epoch_`` and ``best_epoch_``. Rows that training saw times ``input_scale``
        (``normalize_activations``) have that scale folded into the weights at the end.
        ``fit`` and ``ksae.resume`` end here."""
        outcome = trainer.run(source, X_val, position)
        fold_input_scale(trainer.state, input_scale)
        if outcome.stopped_epoch is not None:
            self.stopped_epoch_ = outcome.stopped_epoch
        if outcome.best_epoch is not None:
            self.best_epoch_ = outcome.best_epoch
        return self

    def partial_fit(self, X: Any, y: Any = None, **options: Any) -> "SparseAutoencoder":
        """One optimizer step on ``X`` taken as a single batch, initialising the model on the
        first call. ``options`` are TrainConfig fields as for ``fit`` (``lr=1e-3``,
        ``optimizer="adam"``, ...). The optimizer's state carries over between calls (and from
        ``fit``) while its kind stays the same; ``lr`` applies from this step on."""
        train = _partial_fit_config(self, {**self._training, **options} if self._training
                                    else options)
        cfg = self._cfg()
        if self._state is None:
            X = as_float_matrix(X, "X", cfg.dtype, n_threads=cfg.n_threads or 0)
            self._start(ModelState.initialize(cfg, X.shape[1],
                                              np.random.default_rng(cfg.random_state), X))
            state = self._state
        else:
            state = self._ready()
            X = as_float_matrix(X, "X", cfg.dtype, state.d_in, state.n_threads)
        train_step(state, X, _partial_fit_optimizer(self, train), train)
        return self

    def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> Any:
        """``fit(X, **fit_params)``, then the dense codes of X (see ``transform``)."""
        return self.fit(X, **fit_params).transform(X)

    # ----------------------------------------------------------------- inference
    def encode(self, X: Any) -> SparseCode:
        """The k-sparse code of each row of ``X``: ``SparseCode(values, indices)``, each
        (n_samples, k'), values in decreasing order (the lower index first on ties), where
        k' = round(inference_k_scale * k) (k by default). With batchtopk, k' is the per-sample
        cap and values below the learned ``threshold_`` are zero. With jumprelu, k' is the
        per-sample cap, values at or below their latent's threshold are zero, and the order is
        that of pre-activation minus threshold. With the dense sparsities (l1, kl) k' =
        n_latents: every latent, relu's inactive ones at zero."""
        return self._ready().encode(X)

    def calibrate_threshold(self, X: Any) -> float:
        """batchtopk: set ``threshold_`` so that encoding X keeps k latents per sample on
        average (the (n_samples * k)-th largest candidate activation of X), which makes
        single-sample encoding match training's batch sparsity. ``fit`` calls it on the
        training data at the end; call it after ``partial_fit`` training. Returns it."""
        return self._ready().calibrate_threshold(X)

    code_width = staticmethod(code_width)
    inference_k = staticmethod(inference_k)

    def transform(self, X: Any) -> Any:
        """Dense codes, (n_samples, n_latents), zero outside each row's kept latents (a
        DataFrame after ``set_output(transform="pandas")``)."""
        values, indices = self.encode(X)
        dense = np.zeros((values.shape[0], self._cfg().n_latents), dtype=values.dtype)
        np.put_along_axis(dense, indices, values, axis=1)
        kind = sklearn_compat.output_kind(self.__dict__.get("_sklearn_output_config"))
        if kind == "default":
            return dense
        return sklearn_compat.wrap_output(dense, kind, self.get_feature_names_out(), X)

    def inverse_transform(self, X: Any) -> np.ndarray:
        """Reconstruct inputs from dense codes X (n_samples, n_latents), as ``transform``
        gives them: the sparse decode of their non-zero entries."""
        state = self._ready()
        Z = as_float_matrix(X, "X", state.cfg.dtype, n_threads=state.n_threads)
        if Z.shape[1] != state.n_latents:
            raise ValueError(f"X: expected dense codes of {state.n_latents} columns (n_latents), "
                             f"got shape {Z.shape}")
        return state.decode(*sklearn_compat.dense_to_code(Z))

    def decode(self, values: Any, indices: Any) -> np.ndarray:
        """Reconstruct inputs from sparse codes: ``out(dense(values, indices) @ W_dec + b_dec)``
        with ``out`` the output activation (identity or sigmoid)."""
        return self._ready().decode(values, indices)

    def reconstruct(self, X: Any) -> np.ndarray:
        """``decode(*encode(X))``: the model's reconstruction of each row of ``X``."""
        return self._ready().reconstruct(X)

    def score(self, X: Any, y: Any = None) -> float:
        """Fraction of the variance of ``X`` explained by the reconstruction (1 is perfect;
        0 is no better than predicting the mean of X). ``y`` is ignored."""
        X = as_float_matrix(X, "X", self._cfg().dtype)
        return fraction_of_variance_explained(X, self.reconstruct(X))

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Names of the codes' columns: ``sparseautoencoder0`` .. (scikit-learn's style)."""
        state = self.state_
        return sklearn_compat.feature_names_out(type(self).__name__.lower(), state.n_latents,
                                                state.d_in, input_features)

    def set_output(self, *, transform: str | None = None) -> "SparseAutoencoder":
        """What ``transform`` returns: "default" (NumPy), "pandas" or "polars" DataFrames
        (None leaves the setting as it is). Returns self."""
        if transform is not None:
            self._sklearn_output_config = {"transform": sklearn_compat.check_output(transform)}
        return self

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write the model to the directory ``path`` (created if needed): the weights as
        ``model.safetensors`` and the configuration as ``config.json``. See ``ksae.load``.
        The weights saved are those of one step, even while another thread trains."""
        state = self._ready()
        with state.access.read:
            return save_model(state, path, getattr(self, "history_", {}))

    @classmethod
    def from_state(cls, state: ModelState, *, history: dict[str, list] | None = None,
                   step_history: dict[str, list] | None = None,
                   optimizer: Optimizer | None = None) -> "SparseAutoencoder":
        """An estimator fitted with ``state`` (a loaded model, a checkpoint's, or one made
        by hand), with its training history and the optimizer ``partial_fit`` continues."""
        model = cls(**asdict(state.cfg))
        model._start(state, history, step_history)
        model._optimizer = optimizer
        return model
