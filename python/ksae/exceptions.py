"""ksae's own exception types."""

from __future__ import annotations

import functools
import sys


class NotFittedError(ValueError, AttributeError, RuntimeError):
    """A fitted attribute or method was used before ``fit`` or ``partial_fit``.

    It is a ValueError and an AttributeError, as scikit-learn's ``NotFittedError`` is (so
    ``hasattr(model, "n_features_in_")`` is False on an unfitted model), and a RuntimeError,
    as ksae raised before. Where scikit-learn has been imported, the error raised is also an
    instance of ``sklearn.exceptions.NotFittedError`` (see ``not_fitted``)."""

    def __reduce__(self) -> tuple[type, tuple]:
        # The scikit-learn flavoured subclass is made at run time and has no importable
        # name: it pickles as this class.
        return NotFittedError, self.args


def not_fitted(what: str, call: str = "fit or partial_fit") -> NotFittedError:
    """The error to raise when a ``what`` (a class name) is used before ``call``.

    Where ``sklearn.exceptions`` is already imported, the error also subclasses its
    NotFittedError, so scikit-learn's ``check_is_fitted`` callers, pipelines and grid searches
    recognise it. It is not imported here: code that catches scikit-learn's class has
    necessarily imported it, and ``import ksae`` must stay free of scikit-learn."""
    message = f"This {what} is not fitted yet: call {call} first"
    sklearn_exceptions = sys.modules.get("sklearn.exceptions")
    if sklearn_exceptions is None:
        return NotFittedError(message)
    return _with_base(sklearn_exceptions.NotFittedError)(message)


@functools.cache
def _with_base(base: type) -> type:
    return type("NotFittedError", (NotFittedError, base),
                {"__module__": __name__, "__doc__": NotFittedError.__doc__})
