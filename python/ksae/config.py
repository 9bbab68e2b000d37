"""Configuration: one dataclass per concern, validated in one place.

The estimator's constructor arguments are ``ModelConfig``'s fields, ``fit``'s are
``TrainConfig``'s, and the command line and config files are derived from these classes
(``ksae.cli``), so an option is written down once, here, with its help text.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

ACTIVATIONS = ("relu", "linear", "sigmoid", "tanh", "leaky_relu", "elu", "swish", "gelu", "softmax")
NEEDS_SELECTED_PRE = ("swish", "gelu")  # derivatives that need the pre-activation itself
INITS = ("tied", "xavier", "he")
DTYPES = ("float32", "float64")
B_DEC_INITS = ("zeros", "mean", "geometric_median")
OUTPUT_ACTIVATIONS = ("linear", "sigmoid")
LOSSES = ("mse", "bce")
NORMALIZATIONS = ("none", "mean_norm")
SPARSITIES = ("topk", "batchtopk", "jumprelu", "l1", "kl")
DENSE_SPARSITIES = ("l1", "kl")
"""Sparsities without a fixed k: every latent is in the code (the classic sparse autoencoders)."""
SPARSITY_ACTIVATION = {
    "batchtopk": ("relu", "a latent the batch-wide choice zeroes must carry no gradient"),
    "jumprelu": ("relu", "a latent at or below its threshold must carry no gradient"),
    "l1": ("relu", "the L1 penalty makes latents exactly zero through relu"),
    "kl": ("sigmoid", "the KL divergence compares mean activations in (0, 1)"),
}
"""The activation a sparsity needs, and why."""
SCHEDULE_NAMES = ("constant", "step", "exponential", "cosine")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")

FORMAT_VERSION = 1
"""Version of the saved-model layout (config.json + model.safetensors)."""


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``; otherwise raise a ValueError that names
    the argument, the value, the choices and the closest match."""
    if isinstance(value, str) and value in choices:
        return value
    hint = difflib.get_close_matches(str(value), choices, n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}{suggestion}")


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """Return ``value`` if it is an integer in [minimum, maximum]; otherwise raise."""
    if isinstance(value, bool) or not isinstance(value, (int,)) and not hasattr(value, "__index__"):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name}: expected an integer >= {minimum}{upper}, got {value}")
    return value


def check_positive_float(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float if it is finite and > 0 (or >= 0); otherwise raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    v = float(value)
    ok = v >= 0 if allow_zero else v > 0
    if not (ok and v == v and v != float("inf")):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")
    return v


def dtype_name(value: Any) -> str:
    """Canonical name ('float32' or 'float64') of a dtype given as a string or numpy type."""
    import numpy as np

    try:
        name = np.dtype(value).name
    except TypeError:
        name = str(value)
    return check_choice("dtype", name, DTYPES)


@dataclass
class ModelConfig:
    """The architecture of a k-sparse autoencoder (the estimator's constructor arguments)."""

    n_latents: int = field(default=1024, metadata=_help("number of dictionary latents"))
    k: int = field(default=32, metadata=_help(
        "active latents kept per sample (top-k; batchtopk: on average; jumprelu: at the start, "
        "and sets the default max_k; unused by l1 and kl)"))
    sparsity: str = field(default="topk", metadata=_help(
        "topk: exactly k latents per sample; batchtopk: the k * batch largest over the whole "
        "batch (at most max_k per sample), and at inference every latent above a threshold "
        "learned in training, so a sample's code does not depend on its batch; jumprelu: every "
        "latent whose pre-activation exceeds its own learned threshold (at most max_k per "
        "sample), trained with an L0 penalty (l0_coef); l1: relu codes "
        "with an L1 penalty (l1_coef); kl: sigmoid codes with a KL-divergence penalty toward "
        "the mean activation kl_target (kl_coef). l1 and kl codes are dense (every latent, "
        "n_latents wide): the classic baselines, at batch * n_latents * d_in cost per product",
        choices=SPARSITIES))
    max_k: int | None = field(default=None, metadata=_help(
        "batchtopk and jumprelu: most latents one sample may keep (default: 4 * k)"))
    jumprelu_init_threshold: float | None = field(default=None, metadata=_help(
        "jumprelu: every latent's initial threshold (default: calibrated on the first training "
        "data so that k latents per sample exceed it on average; a threshold so low that max_k "
        "binds leaves no latent near it, and the thresholds cannot learn)"))
    activation: str = field(default="relu", metadata=_help(
        "encoder activation: relu, linear, sigmoid, tanh, leaky_relu (slope 0.01), elu, swish, "
        "gelu (these two are not monotone: the top-k ranks act(pre)), or softmax over the k "
        "kept latents", choices=ACTIVATIONS))
    init: str = field(default="tied", metadata=_help(
        "weight initialisation: tied (W_enc = W_dec.T, unit decoder rows), xavier or he",
        choices=INITS))
    normalize_decoder: bool = field(default=True, metadata=_help(
        "keep decoder rows at unit norm (project their gradient, renormalise after each step)"))
    output_activation: str = field(default="linear", metadata=_help(
        "decoder output: linear, or sigmoid for data in [0, 1]", choices=OUTPUT_ACTIVATIONS))
    inference_k_scale: float = field(default=1.0, metadata=_help(
        "encode/transform keep round(scale * k) latents (the k-sparse paper's alpha; training "
        "always uses k)"))
    b_dec_init: str = field(default="zeros", metadata=_help(
        "initial decoder bias: zeros, the mean of the first training data, or its geometric "
        "median (robust to outliers)", choices=B_DEC_INITS))
    random_state: int | None = field(default=None, metadata=_help("seed for initialisation and shuffling"))
    dtype: str = field(default="float32", metadata=_help("floating-point precision", choices=DTYPES))
    n_threads: int | None = field(default=None, metadata=_help(
        "threads for the C++ kernels (default: all cores, fewer for kernels too small to gain)"))

    def __post_init__(self) -> None:
        self.n_latents = check_int("n_latents", self.n_latents, 1)
        self.k = check_int("k", self.k, 1)
        check_choice("sparsity", self.sparsity, SPARSITIES)
        if self.k > self.n_latents and self.sparsity not in DENSE_SPARSITIES:
            raise ValueError(f"k: expected 1 <= k <= n_latents = {self.n_latents}, got {self.k}")
        check_choice("activation", self.activation, ACTIVATIONS)
        needed, why = SPARSITY_ACTIVATION.get(self.sparsity, (self.activation, ""))
        if self.activation != needed:
            raise ValueError(f"activation: {self.sparsity} needs {needed!r} ({why}), "
                             f"got {self.activation!r}")
        if self.max_k is not None:
            least = self.k if self.sparsity == "batchtopk" else 1
            self.max_k = check_int("max_k", self.max_k, least, self.n_latents)
        check_choice("init", self.init, INITS)
        check_choice("b_dec_init", self.b_dec_init, B_DEC_INITS)
        check_choice("output_activation", self.output_activation, OUTPUT_ACTIVATIONS)
        self.inference_k_scale = check_positive_float("inference_k_scale", self.inference_k_scale)
        if self.jumprelu_init_threshold is not None:
            self.jumprelu_init_threshold = check_positive_float("jumprelu_init_threshold",
                                                                self.jumprelu_init_threshold)
        if not isinstance(self.normalize_decoder, bool):
            raise TypeError(f"normalize_decoder: expected a bool, got {self.normalize_decoder!r}")
        if self.random_state is not None:
            self.random_state = check_int("random_state", self.random_state, 0)
        self.dtype = dtype_name(self.dtype)
        if self.n_threads is not None:
            self.n_threads = check_int("n_threads", self.n_threads, 1)


@dataclass
class TrainConfig:
    """How a model is trained (the arguments of ``SparseAutoencoder.fit``)."""

    epochs: int = field(default=10, metadata=_help("passes over the training data"))
    loss: str = field(default="mse", metadata=_help(
        "reconstruction loss: mse (mean over all elements) or bce (binary cross-entropy; needs "
        "output_activation='sigmoid' and data in [0, 1])", choices=LOSSES))
    l1_weight: float = field(default=0.0, metadata=_help(
        "L1 penalty on W_enc and W_dec (with l2_weight: elastic net)"))
    l2_weight: float = field(default=0.0, metadata=_help("L2 penalty on W_enc and W_dec"))
    input_dropout: float = field(default=0.0, metadata=_help(
        "denoising: fraction of input features zeroed (masking noise) before encoding; the "
        "target stays the clean input"))
    batch_size: int = field(default=256, metadata=_help("samples per optimizer step"))
    lr: float = field(default=1e-3, metadata=_help("learning rate"))
    optimizer: str = field(default="adam", metadata=_help(
        "adam, adamw (decoupled weight decay), sgd or rmsprop", choices=OPTIMIZERS))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum (0 for plain SGD)"))
    nesterov: bool = field(default=False, metadata=_help("use Nesterov momentum with SGD"))
    weight_decay: float = field(default=0.0, metadata=_help(
        "weight decay: decoupled for adamw, an L2 gradient term for sgd and rmsprop, unused by adam"))
    shuffle: bool = field(default=True, metadata=_help("reshuffle the samples every epoch"))
    schedule: str = field(default="constant", metadata=_help(
        "learning-rate schedule: constant, step, exponential or cosine", choices=SCHEDULE_NAMES))
    warmup_steps: int = field(default=0, metadata=_help("steps of linear learning-rate warm-up"))
    lr_step_size: int = field(default=1000, metadata=_help("step schedule: steps between decays"))
    lr_gamma: float = field(default=0.5, metadata=_help(
        "step schedule: decay factor per lr_step_size steps; exponential: factor per step"))
    min_lr: float = field(default=0.0, metadata=_help("cosine schedule: final learning rate"))
    clip_grad_norm: float | None = field(default=None, metadata=_help(
        "rescale the gradients when their global norm exceeds this (default: no clipping)"))
    validation_split: float = field(default=0.0, metadata=_help(
        "fraction of the training data held out (at random) for validation"))
    early_stopping_patience: int | None = field(default=None, metadata=_help(
        "stop after this many epochs without a validation-loss improvement (needs validation)"))
    early_stopping_min_delta: float = field(default=0.0, metadata=_help(
        "smallest decrease of the validation loss that counts as an improvement"))
    restore_best_weights: bool = field(default=True, metadata=_help(
        "on early stopping, return to the weights of the best validation epoch"))
    log_every: int = field(default=0, metadata=_help(
        "also record training figures every this many steps in step_history_ (0: off)"))
    dead_after_samples: int = field(default=100_000, metadata=_help(
        "a latent that has not fired for this many training samples counts as dead"))
    auxk_coef: float = field(default=0.0, metadata=_help(
        "weight of the AuxK loss: the top auxk_k dead latents reconstruct the residual "
        "(0: off; OpenAI uses 1/32)"))
    auxk_k: int | None = field(default=None, metadata=_help(
        "dead latents AuxK uses per sample (default: 2 * k)"))
    resample_every: int = field(default=0, metadata=_help(
        "every this many steps, re-initialise dead latents toward badly reconstructed inputs "
        "(0: off)"))
    k_start: int | None = field(default=None, metadata=_help(
        "k curriculum: start training with this many active latents (>= k) ..."))
    k_anneal_fraction: float = field(default=0.5, metadata=_help(
        "... and anneal linearly to k over this fraction of the training steps"))
    lazy_adam: bool = field(default=False, metadata=_help(
        "adam/adamw: update only the latents a step selected (their W_enc and W_dec rows and "
        "b_enc entries); faster for large dictionaries, but the others' moments do not decay "
        "and their weights do not coast on momentum"))
    checkpoint_every: int = field(default=0, metadata=_help(
        "with a checkpoint path, also save a checkpoint every this many steps (0: at the end "
        "of each epoch and on Ctrl-C only)"))
    normalize_activations: str = field(default="none", metadata=_help(
        "mean_norm: train on the rows scaled by one factor (estimated once, from the first "
        "65536 rows) to mean norm sqrt(d_in), the scale then folded into b_enc, b_dec and the "
        "thresholds so the fitted model takes raw rows (relu-like activations, linear output)",
        choices=NORMALIZATIONS))
    l0_coef: float = field(default=1e-3, metadata=_help(
        "sparsity='jumprelu': weight of the L0 penalty, l0_coef times the active latents per "
        "sample averaged over the batch (its gradient reaches the thresholds only)"))
    jumprelu_bandwidth: float = field(default=1e-3, metadata=_help(
        "sparsity='jumprelu': width of the rectangle kernel of the thresholds' "
        "straight-through gradient (pre-activations within half of it of a threshold count)"))
    l1_coef: float = field(default=1e-3, metadata=_help(
        "sparsity='l1': weight of the L1 penalty on the code, l1_coef times the per-sample "
        "sum of the activations averaged over the batch (l1_weight penalises the weights)"))
    kl_target: float = field(default=0.05, metadata=_help(
        "sparsity='kl': target mean activation rho of every latent"))
    kl_coef: float = field(default=1e-3, metadata=_help(
        "sparsity='kl': weight beta of the penalty beta times the sum over latents of the KL "
        "divergence between Bernoullis of means kl_target and the latent's batch mean "
        "activation"))

    def __post_init__(self) -> None:
        self.epochs = check_int("epochs", self.epochs, 1)
        check_choice("loss", self.loss, LOSSES)
        self.l1_weight = check_positive_float("l1_weight", self.l1_weight, allow_zero=True)
        self.l2_weight = check_positive_float("l2_weight", self.l2_weight, allow_zero=True)
        self.input_dropout = check_positive_float("input_dropout", self.input_dropout, allow_zero=True)
        if self.input_dropout >= 1:
            raise ValueError(f"input_dropout: expected 0 <= input_dropout < 1, got {self.input_dropout}")
        self.batch_size = check_int("batch_size", self.batch_size, 1)
        self.lr = check_positive_float("lr", self.lr)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        self.momentum = check_positive_float("momentum", self.momentum, allow_zero=True)
        if self.momentum >= 1:
            raise ValueError(f"momentum: expected 0 <= momentum < 1, got {self.momentum}")
        self.weight_decay = check_positive_float("weight_decay", self.weight_decay, allow_zero=True)
        for name in ("nesterov", "shuffle"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0")
        check_choice("schedule", self.schedule, SCHEDULE_NAMES)
        self.warmup_steps = check_int("warmup_steps", self.warmup_steps, 0)
        self.lr_step_size = check_int("lr_step_size", self.lr_step_size, 1)
        self.lr_gamma = check_positive_float("lr_gamma", self.lr_gamma)
        self.min_lr = check_positive_float("min_lr", self.min_lr, allow_zero=True)
        if self.clip_grad_norm is not None:
            self.clip_grad_norm = check_positive_float("clip_grad_norm", self.clip_grad_norm)
        self.validation_split = check_positive_float("validation_split", self.validation_split,
                                                     allow_zero=True)
        if self.validation_split >= 1:
            raise ValueError(f"validation_split: expected 0 <= validation_split < 1, got {self.validation_split}")
        if self.early_stopping_patience is not None:
            self.early_stopping_patience = check_int("early_stopping_patience",
                                                     self.early_stopping_patience, 1)
        self.early_stopping_min_delta = check_positive_float(
            "early_stopping_min_delta", self.early_stopping_min_delta, allow_zero=True)
        if not isinstance(self.restore_best_weights, bool):
            raise TypeError(f"restore_best_weights: expected a bool, got {self.restore_best_weights!r}")
        self.log_every = check_int("log_every", self.log_every, 0)
        self.dead_after_samples = check_int("dead_after_samples", self.dead_after_samples, 1)
        self.auxk_coef = check_positive_float("auxk_coef", self.auxk_coef, allow_zero=True)
        if self.auxk_k is not None:
            self.auxk_k = check_int("auxk_k", self.auxk_k, 1)
        self.resample_every = check_int("resample_every", self.resample_every, 0)
        self.checkpoint_every = check_int("checkpoint_every", self.checkpoint_every, 0)
        check_choice("normalize_activations", self.normalize_activations, NORMALIZATIONS)
        if not isinstance(self.lazy_adam, bool):
            raise TypeError(f"lazy_adam: expected a bool, got {self.lazy_adam!r}")
        if self.lazy_adam and self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"lazy_adam: lazy updates are for adam and adamw, not {self.optimizer!r}")
        if self.k_start is not None:
            self.k_start = check_int("k_start", self.k_start, 1)
        self.k_anneal_fraction = check_positive_float("k_anneal_fraction", self.k_anneal_fraction)
        if self.k_anneal_fraction > 1:
            raise ValueError(f"k_anneal_fraction: expected 0 < k_anneal_fraction <= 1, got {self.k_anneal_fraction}")
        self.l0_coef = check_positive_float("l0_coef", self.l0_coef, allow_zero=True)
        self.jumprelu_bandwidth = check_positive_float("jumprelu_bandwidth", self.jumprelu_bandwidth)
        self.l1_coef = check_positive_float("l1_coef", self.l1_coef, allow_zero=True)
        self.kl_target = check_positive_float("kl_target", self.kl_target)
        if self.kl_target >= 1:
            raise ValueError(f"kl_target: expected 0 < kl_target < 1, got {self.kl_target}")
        self.kl_coef = check_positive_float("kl_coef", self.kl_coef, allow_zero=True)


DATASETS = ("synthetic", "mnist", "fashion-mnist", "array", "store")
IMAGE_DATASET_NAMES = ("mnist", "fashion-mnist")


def _check_optional_str(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name}: expected a string or None, got {type(value).__name__} {value!r}")
    return value


@dataclass
class DataConfig:
    """The data an experiment trains on (``ksae train``): ``synthetic`` draws samples from a
    planted sparse dictionary (``ksae.make_sparse_dictionary``, no network needed); ``mnist``
    and ``fashion-mnist`` are the 28 x 28 image sets (``ksae.load_mnist``, pixels as float32
    in [0, 1], with labels); ``array`` is a 2-D matrix in a ``.npy`` or ``.npz`` file."""

    dataset: str = field(default="synthetic", metadata=_help(
        "dataset to train on: synthetic, mnist, fashion-mnist, array or store (an activation "
        "store directory, ksae.ActivationStore)", choices=DATASETS))
    path: str | None = field(default=None, metadata=_help(
        "array: the .npy or .npz training file; store: the store's directory; "
        "mnist/fashion-mnist: a directory holding the IDX files (default: search the system "
        "copy and the cache, then download)"))
    test_path: str | None = field(default=None, metadata=_help(
        "array: a separate .npy or .npz test file (default: hold out the last test_fraction "
        "of the rows of path)"))
    key: str | None = field(default=None, metadata=_help(
        "array: name of the array in a .npz file (default: its only array)"))
    stream: bool = field(default=False, metadata=_help(
        "array: train from the .npy file without loading it into memory (ksae.NpyRowStream); "
        "only the test rows are read into memory"))
    download: bool = field(default=True, metadata=_help(
        "mnist/fashion-mnist: download the files when no local copy is found"))
    cache_dir: str | None = field(default=None, metadata=_help(
        "mnist/fashion-mnist: download cache root (default: $KSAE_DATA or ~/.cache/ksae)"))
    n_samples: int = field(default=20000, metadata=_help("synthetic: number of samples"))
    d_in: int = field(default=64, metadata=_help("synthetic: input width"))
    n_components: int = field(default=128, metadata=_help("synthetic: ground-truth directions"))
    n_active: int = field(default=4, metadata=_help("synthetic: directions active per sample"))
    noise: float = field(default=0.01, metadata=_help("synthetic: Gaussian noise per feature"))
    test_fraction: float = field(default=0.2, metadata=_help(
        "synthetic, and array without test_path: fraction of the samples held out for "
        "testing (the last rows); store: fraction of the documents held out, whole"))

    def __post_init__(self) -> None:
        check_choice("dataset", self.dataset, DATASETS)
        for name in ("path", "test_path", "key", "cache_dir"):
            _check_optional_str(name, getattr(self, name))
        for name in ("stream", "download"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        self.n_samples = check_int("n_samples", self.n_samples, 2)
        self.d_in = check_int("d_in", self.d_in, 1)
        self.n_components = check_int("n_components", self.n_components, 1)
        self.n_active = check_int("n_active", self.n_active, 1, self.n_components)
        self.noise = check_positive_float("noise", self.noise, allow_zero=True)
        self.test_fraction = check_positive_float("test_fraction", self.test_fraction)
        if self.test_fraction >= 1:
            raise ValueError(f"test_fraction: expected 0 < test_fraction < 1, got {self.test_fraction}")
        self._check_combinations()

    def _check_combinations(self) -> None:
        array_only = [name for name in ("test_path", "key") if getattr(self, name) is not None]
        if self.stream:
            array_only.append("stream")
        if self.dataset != "array" and array_only:
            raise ValueError(f"{', '.join(array_only)}: only used with dataset 'array', "
                             f"not {self.dataset!r}")
        if self.dataset == "synthetic" and self.path is not None:
            raise ValueError("path: the synthetic dataset is generated, not read; "
                             f"got path={self.path!r} (use dataset 'array' for a file)")
        if self.dataset in ("store", "array") and self.path is None:
            raise ValueError(f"path: dataset {self.dataset!r} needs path, "
                             + ("a .npy or .npz file" if self.dataset == "array" else "a directory"))
        if self.dataset != "array":
            return
        for name in ("path", "test_path"):
            value = getattr(self, name)
            if value is not None and not value.lower().endswith((".npy", ".npz")):
                raise ValueError(f"{name}: expected a file ending in .npy or .npz, got {value!r}")
        if self.stream and not self.path.lower().endswith(".npy"):
            raise ValueError(f"stream: streaming reads a .npy file; path is {self.path!r} "
                             "(convert it with np.save, or train without stream)")
        if self.key is not None and not any(p is not None and p.lower().endswith(".npz")
                                            for p in (self.path, self.test_path)):
            raise ValueError(f"key: names an array in a .npz file, but no path is a .npz file "
                             f"(path={self.path!r}, test_path={self.test_path!r})")


def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def check_known_keys(where: str, given: dict[str, Any], known: Sequence[str]) -> None:
    """Raise a ValueError listing unknown keys, each with its closest known name."""
    unknown = [key for key in given if key not in known]
    if not unknown:
        return
    parts = []
    for key in unknown:
        hint = difflib.get_close_matches(key, known, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    raise ValueError(f"{where}: unknown option(s) {', '.join(parts)}; known: {', '.join(known)}")
