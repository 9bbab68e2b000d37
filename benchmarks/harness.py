"""The measuring harness the benchmark scripts share: thread pinning, timing loops, peak
memory, a description of the machine, and child processes that report JSON.

Every benchmark times each library in a child process of its own, as it would run in a
training script: libraries that keep idle worker threads spinning (OpenBLAS after a NumPy
matmul, PyTorch's OpenMP pool) otherwise take cores from the next library's kernels.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables that fix the size of the BLAS and OpenMP thread pools. They are
read once, when a library loads, so they must be set before NumPy or PyTorch is imported."""


def pin_threads(n: int) -> None:
    """Set the thread-pool variables to ``n`` for this process and its children; call before
    NumPy, PyTorch or ksae is imported."""
    for var in THREAD_VARIABLES:
        os.environ[var] = str(n)


def limit_blas_threads(n: int) -> str:
    """Limit NumPy's BLAS to ``n`` threads with threadpoolctl when it is installed (the
    environment variables of ``pin_threads`` already did so at import otherwise) and describe
    the pools in effect, for the record."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        return f"BLAS threads from {THREAD_VARIABLES[1]}={os.environ.get(THREAD_VARIABLES[1])} (no threadpoolctl)"
    import numpy  # noqa: F401  (loads the BLAS so that threadpoolctl can see it)

    threadpool_limits(n)
    pools = [f"{p['internal_api']}={p['num_threads']}" for p in threadpool_info()]
    return "threadpoolctl: " + ", ".join(pools)


def time_calls(fn: Callable[[], Any], seconds: float = 0.5, warmup: float = 0.5) -> list[float]:
    """Timings of repeated calls to fn filling about `seconds`, after calling it for about
    `warmup` seconds untimed (allocation, page faults and the first slow calls of a fresh
    process: a 4.5 ms step here takes 8 ms for its first ~0.2 s). At least one call is
    timed and one is not, however long a call takes."""
    start = time.perf_counter()
    fn()
    while time.perf_counter() - start < warmup:
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while not times or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def median(samples: Sequence[float]) -> float:
    return sorted(samples)[len(samples) // 2]


def _status_mib(field: str) -> float | None:
    """A kB field of /proc/self/status in MiB, or None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Unlike getrusage's ru_maxrss, which on
    Linux carries the parent's peak across fork+exec, it counts this process only."""
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """This process's resident set now (VmRSS), for a baseline before the model exists."""
    now = _status_mib("VmRSS")
    return now if now is not None else float("nan")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def parse_shape(spec: str) -> tuple[int, int, int, int]:
    """'batch,d_in,n_latents,k' -> a tuple of four ints."""
    values = tuple(int(v) for v in spec.split(","))
    if len(values) != 4 or min(values) < 1:
        raise ValueError(f"shape: expected four positive integers batch,d_in,n_latents,k, got {spec!r}")
    return values  # type: ignore[return-value]


def run_json_child(args: Sequence[str], threads: int,
                   first_on_path: str | None = None) -> dict[str, Any]:
    """Run ``python *args`` with every thread pool pinned to ``threads`` and return the JSON
    object its last output line holds; its error output is shown if it fails.
    ``first_on_path`` goes first on the child's PYTHONPATH (another ksae install)."""
    env = dict(os.environ)
    env.update({var: str(threads) for var in THREAD_VARIABLES})
    if first_on_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [first_on_path, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stdout + out.stderr)
        raise RuntimeError(f"child {' '.join(args)} failed with status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])
