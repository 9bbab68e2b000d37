"""Type stub of ksae's private C++ extension (see cpp/bindings/)."""

from typing import Sequence

import numpy as np
from numpy.typing import NDArray

def has_openmp() -> bool: ...
def max_threads() -> int: ...
def build_info() -> dict[str, object]: ...
def encode(
    X: NDArray[np.floating], W_enc_t: NDArray[np.floating], b_enc: NDArray[np.floating],
    b_dec: NDArray[np.floating], k: int, activation: str = "relu", n_threads: int = 0,
    centered: NDArray[np.floating] | None = None, pre: NDArray[np.floating] | None = None,
    selected_pre: NDArray[np.floating] | None = None,
) -> tuple[NDArray[np.floating], NDArray[np.int64]]: ...
def decode(
    values: NDArray[np.floating], indices: NDArray[np.int64], W_dec: NDArray[np.floating],
    b_dec: NDArray[np.floating], n_threads: int = 0, out: NDArray[np.floating] | None = None,
) -> NDArray[np.floating]: ...
def decode_mse(
    values: NDArray[np.floating], indices: NDArray[np.int64], W_dec: NDArray[np.floating],
    b_dec: NDArray[np.floating], X: NDArray[np.floating], n_threads: int = 0,
    grad_out: NDArray[np.floating] | None = None,
) -> tuple[float, NDArray[np.floating]]: ...
def backward(
    grad_out: NDArray[np.floating], centered: NDArray[np.floating], values: NDArray[np.floating],
    indices: NDArray[np.int64], W_enc_t: NDArray[np.floating], W_dec: NDArray[np.floating],
    activation: str, project_decoder_grad: bool, n_threads: int,
    grad_W_enc_t: NDArray[np.floating], grad_b_enc: NDArray[np.floating],
    grad_W_dec: NDArray[np.floating], grad_b_dec: NDArray[np.floating] | None,
    accumulate: bool = False, selected_pre: NDArray[np.floating] | None = None,
    grad_values: NDArray[np.floating] | None = None,
    grad_values_out: NDArray[np.floating] | None = None,
) -> None: ...
def backward_adam(
    grad_out: NDArray[np.floating], centered: NDArray[np.floating], values: NDArray[np.floating],
    indices: NDArray[np.int64], W_enc_t: NDArray[np.floating], b_enc: NDArray[np.floating],
    W_dec: NDArray[np.floating], b_dec: NDArray[np.floating],
    exp_avg: Sequence[NDArray[np.floating]], exp_avg_sq: Sequence[NDArray[np.floating]],
    grad_b_enc: NDArray[np.floating], grad_b_dec: NDArray[np.floating], activation: str,
    project_decoder_grad: bool, unit_norm_decoder: bool, n_threads: int, lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
    selected_pre: NDArray[np.floating] | None = None,
    grad_values: NDArray[np.floating] | None = None,
    grad_values_out: NDArray[np.floating] | None = None,
) -> None: ...
def train_step_adam(
    X: NDArray[np.floating], W_enc_t: NDArray[np.floating], b_enc: NDArray[np.floating],
    W_dec: NDArray[np.floating], b_dec: NDArray[np.floating],
    exp_avg: Sequence[NDArray[np.floating]], exp_avg_sq: Sequence[NDArray[np.floating]],
    grad_b_enc: NDArray[np.floating], grad_b_dec: NDArray[np.floating],
    counts: NDArray[np.int64], k: int, activation: str, normalize_decoder: bool,
    n_threads: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    step: int, centered: NDArray[np.floating], grad_out: NDArray[np.floating],
    selected_pre: NDArray[np.floating] | None = None,
) -> tuple[float, NDArray[np.floating], NDArray[np.int64]]: ...
def select_topk(
    pre: NDArray[np.floating], bias: NDArray[np.floating], k: int, activation: str = "relu",
    n_threads: int = 0, selected_pre: NDArray[np.floating] | None = None,
) -> tuple[NDArray[np.floating], NDArray[np.int64]]: ...
def adam_update(
    param: NDArray[np.floating], grad: NDArray[np.floating], exp_avg: NDArray[np.floating],
    exp_avg_sq: NDArray[np.floating], lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, step: int, unit_norm_rows: bool = False, n_threads: int = 0,
    rows: NDArray[np.int64] | None = None,
) -> None: ...
def sgd_update(
    param: NDArray[np.floating], grad: NDArray[np.floating],
    momentum_buffer: NDArray[np.floating] | None, lr: float, momentum: float, nesterov: bool,
    weight_decay: float, unit_norm_rows: bool = False, n_threads: int = 0,
) -> None: ...
def rmsprop_update(
    param: NDArray[np.floating], grad: NDArray[np.floating], square_avg: NDArray[np.floating],
    momentum_buffer: NDArray[np.floating] | None, lr: float, alpha: float, eps: float,
    momentum: float, weight_decay: float, unit_norm_rows: bool = False, n_threads: int = 0,
) -> None: ...
def squared_norm(array: NDArray[np.floating], n_threads: int = 0) -> float: ...
def all_finite(array: NDArray[np.floating], n_threads: int = 0) -> bool: ...
def mark_fired(
    counts: NDArray[np.int64], values: NDArray[np.floating], indices: NDArray[np.int64],
    n_samples: int, above: float | None = None,
) -> None: ...
def note_fired(
    fired: NDArray[np.bool_], values: NDArray[np.floating], indices: NDArray[np.int64],
    above: float | None = None,
) -> int: ...
def sums_and_squares(
    X: NDArray[np.floating], n_threads: int = 0,
) -> tuple[NDArray[np.float64], float]: ...
def take_rows(
    X: NDArray[np.floating], rows: NDArray[np.int64], n_threads: int = 0,
    out: NDArray[np.floating] | None = None,
) -> NDArray[np.floating]: ...
def _kth_largest(values: NDArray[np.floating], k: int) -> float: ...
def _rank_top_k(
    keys: NDArray[np.floating], indices: NDArray[np.int64], k: int,
) -> NDArray[np.int64] | None: ...
