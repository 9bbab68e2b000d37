"""ksae: fast k-sparse (TopK) autoencoders on the CPU.

The heavy arithmetic (the encoder product, the per-row top-k selection, the sparse decode and
backward, the optimizer updates) runs in a C++ core with the GIL released; this package holds
the estimator, training loop, losses, optimizers, data and command line.
"""

from __future__ import annotations

from types import ModuleType

__version__ = "0.1.0"

from . import _core
from .config import ModelConfig, TrainConfig
from .array_files import NpyRowStream, load_array
from .activation_store import ActivationStore, ActivationStoreWriter
from .datasets import ImageDataset, load_mnist, make_sparse_dictionary
from .idx import read_idx
from .metrics import dictionary_recovery, fraction_of_variance_explained
from .estimator import SparseAutoencoder
from .state import ModelState, SparseCode
from .exceptions import NotFittedError
from .probe import LinearProbe
from .classifier import SparseClassifier
from .optim import SGD, Adam, RMSprop
from .report import write_report
from .loading import Checkpoint, load, load_checkpoint, resume
from .exporting import export_model
from .training import Trainer, TrainingInterrupted
from .batches import BatchSource


def has_openmp() -> bool:
    """Whether the C++ core was built with OpenMP (multi-threaded kernels)."""
    return bool(_core.has_openmp())


def build_info() -> dict:
    """How the C++ core was built: OpenMP, default thread count, SIMD sets, Eigen version,
    instruction-set target and CMake build type (Release for ``pip install``)."""
    return dict(_core.build_info())


def thread_round_trip_ns(trips: int = 1000, repeats: int = 5) -> float:
    """Median nanoseconds for one cache line to go from the kernels' first OpenMP thread to
    the second and back (``trips`` round trips per repeat, median of ``repeats``).

    It tells whether two threads share a last-level cache: tens of nanoseconds where they
    do, hundreds across AMD CCDs or sockets. A training step's threads exchange the rows one
    writes and another reads, so on this project's 2-vCPU Zen 4 VM the (256, 784, 1000, 25)
    step took about 4 ms at 50 ns and about 6.5 ms at 320 ns (benchmarks/RESULTS.md). A
    hypervisor may move virtual CPUs at any time, so the figure holds for the moment it was
    taken. Returns 0.0 where the core has no OpenMP, the process has one processor, or the
    OpenMP runtime starts only one thread (``OMP_THREAD_LIMIT=1``).
    """
    return float(_core.thread_round_trip_ns(trips, repeats))


def __getattr__(name: str) -> ModuleType:
    # ksae.plots imports matplotlib, which takes longer than the rest of ksae: it is loaded
    # on first use of ksae.plots (or by import ksae.plots), not by import ksae.
    if name == "plots":
        import importlib

        return importlib.import_module(".plots", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SparseAutoencoder", "SparseCode", "ModelState", "Trainer", "BatchSource", "NotFittedError", "LinearProbe", "SparseClassifier", "ModelConfig", "TrainConfig", "Adam", "SGD", "RMSprop",
    "load", "load_checkpoint", "resume", "export_model", "Checkpoint", "TrainingInterrupted",
    "make_sparse_dictionary", "dictionary_recovery", "fraction_of_variance_explained",
    "load_mnist", "ImageDataset", "read_idx", "load_array", "NpyRowStream", "ActivationStore",
    "ActivationStoreWriter", "write_report",
    "has_openmp", "build_info", "thread_round_trip_ns", "__version__",
]
