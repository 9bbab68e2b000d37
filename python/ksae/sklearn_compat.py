"""scikit-learn's conventions for ksae's estimators, without depending on scikit-learn:
tags, output containers (``set_output``), output feature names and dense codes.

Nothing here imports scikit-learn, pandas or polars until a caller that has them asks for
them (``__sklearn_tags__`` is only called by scikit-learn itself)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

OUTPUTS = ("default", "pandas", "polars")


def transformer_tags(dtype: str) -> Any:
    """The ``sklearn.utils.Tags`` of a transformer whose output has the model's ``dtype``
    whatever the input's, refuses NaN and sparse input, and needs no target."""
    from sklearn.utils import InputTags, Tags, TargetTags, TransformerTags

    preserved = dtype if dtype in ("float32", "float64") else "float32"  # params may be junk before fit
    return Tags(estimator_type="transformer", target_tags=TargetTags(required=False),
                transformer_tags=TransformerTags(preserves_dtype=[preserved]),
                input_tags=InputTags(allow_nan=False, sparse=False))


def check_output(transform: str) -> str:
    """``transform`` if it names an output container ksae can give."""
    if transform not in OUTPUTS:
        raise ValueError(f"transform: expected one of {', '.join(map(repr, OUTPUTS))} or None, "
                         f"got {transform!r}")
    return transform


def output_kind(config: dict[str, str] | None) -> str:
    """The container an estimator's transform returns: its own ``set_output`` choice, else
    scikit-learn's global ``transform_output`` where scikit-learn is loaded, else default."""
    if config and "transform" in config:
        return config["transform"]
    sklearn = sys.modules.get("sklearn")
    if sklearn is None:
        return "default"
    return check_output(sklearn.get_config().get("transform_output", "default"))


def wrap_output(Z: np.ndarray, kind: str, names: np.ndarray, like: Any) -> Any:
    """Z as a pandas or polars DataFrame with the columns ``names`` (and, for pandas, the
    index of ``like`` when it is a DataFrame), or as it is for ``"default"``."""
    if kind == "pandas":
        import pandas as pd

        index = like.index if isinstance(like, (pd.DataFrame, pd.Series)) else None
        return pd.DataFrame(Z, index=index, columns=list(names), copy=False)
    if kind == "polars":
        import polars as pl

        return pl.DataFrame(Z, schema=list(names), orient="row")
    return Z


def feature_names_out(prefix: str, n_out: int, n_in: int, input_features: Any = None) -> np.ndarray:
    """``prefix0 .. prefix{n_out-1}`` as an object array (scikit-learn's names for features
    that are not the input's); ``input_features``, when given, must have ``n_in`` names."""
    if input_features is not None and len(input_features) != n_in:
        raise ValueError(f"input_features should have length equal to number of features "
                         f"({n_in}), got {len(input_features)}")
    return np.asarray([f"{prefix}{i}" for i in range(n_out)], dtype=object)


def dense_to_code(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (values, indices) of a dense code's non-zero entries, padded per row with zeros
    on index 0 to the widest row's count, so the sparse decode reconstructs it at
    ``batch * width * d_in`` cost."""
    nonzero = Z != 0
    width = max(1, int(nonzero.sum(axis=1).max(initial=0)))
    # Non-zero entries first in each row (a stable sort keeps them in latent order).
    order = np.argsort(~nonzero, axis=1, kind="stable")[:, :width]
    values = np.take_along_axis(Z, order, axis=1)
    indices = np.where(np.take_along_axis(nonzero, order, axis=1), order, 0)
    return values, indices.astype(np.int64)
