"""ksae against a plain PyTorch TopK SAE, both trained on the same activation store.

The store is split by documents as ``ksae train --dataset store`` splits it
(``split_documents(test_fraction)``, seed 0). Each implementation then trains in a child
process of its own, every thread pool pinned to ``--threads``, the two interleaved over
``--repeats`` rounds (the order alternating round by round), and reports:

- training tokens/s: training rows times epochs over the wall-clock of the training loop
  only, from the first batch asked of the store to the last step's end. Both loops read
  their batches from the store the same way (``train_view.batches``: memory-mapped shards,
  shuffled a window at a time on ``--threads``), so data reading is inside both timings;
  the set-up before it (opening and splitting the store, the store's checksums and total
  variance, the initial weights) is outside both.
  - ksae: ``SparseAutoencoder(n_latents, k, random_state=0, n_threads=T).fit(train_view,
    epochs=E, batch_size=B)`` with every other training option at its default (Adam lr
    1e-3, constant schedule, no AuxK or resampling); fit sees the view through a thin
    wrapper that notes the seed of each epoch's batches and starts the clock at the first.
  - torch: ``torch_sae.IdiomaticTopKSAE`` (nn.Module, ``torch.topk``, dense code, autograd,
    ``torch.optim.Adam``), started from the weights fit starts from (``ModelState.initialize``
    with ``default_rng(0)`` on ``train_view.sample()``, as fit calls it), stepped on
    ``train_view.batches(B, seed)`` for each epoch seed fit draws from that generator
    afterwards: the same batches in the same order. The parent checks that the seeds and
    a hash of the initial weights agree.
- test figures over the held-out documents' rows, encoded ``--encode-batch`` rows at a time:
  FVU (sum of squared errors over the total variance about the test mean, float64), L0
  (latents > 0 per row), dead fraction (latents > 0 on no test row), and encode tokens/s
  (the codes alone, ksae's ``encode`` against ``torch.topk`` of the encoder product).

    python benchmarks/bench_store.py STORE --n-latents 6144 --k 32 --epochs 1 \\
        --batch-size 256 --threads 2 --out benchmarks/out/store.json
    python benchmarks/bench_store.py /tmp/synth --write-synthetic 60000 --n-latents 1024 --k 16

``--write-synthetic N`` first writes a synthetic store of N rows at STORE (d=384, documents
of 128 rows, sparse combinations of a random dictionary plus noise): for trying the script
out before a real store exists. The JSON holds every round; the table row printed last is
for RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    limit_blas_threads,
    median,
    peak_rss_mib,
    pin_threads,
    run_json_child,
)

IMPLEMENTATIONS = ("ksae", "torch")
PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_dec")
SPLIT_SEED = 0
RANDOM_STATE = 0
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


# ----------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="activation store directory")
    parser.add_argument("--n-latents", type=int, default=6144)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--test-fraction", type=float, default=0.1,
                        help="fraction of the documents held out whole (ksae train's split)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds, each training both once (order alternating); medians")
    parser.add_argument("--encode-batch", type=int, default=4096,
                        help="test rows per encode call, for both")
    parser.add_argument("--out", default="benchmarks/out/store.json", help="JSON record")
    parser.add_argument("--write-synthetic", type=int, default=None, metavar="ROWS",
                        help="first write a synthetic store of ROWS rows at STORE (must not exist)")
    parser.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child_argv(impl: str, args: argparse.Namespace) -> list[str]:
    """The command line that runs ``impl`` once in a child process."""
    return [os.path.abspath(__file__), args.store, "--child", impl,
            "--n-latents", str(args.n_latents), "--k", str(args.k), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--threads", str(args.threads),
            "--test-fraction", str(args.test_fraction), "--encode-batch", str(args.encode_batch)]


# ----------------------------------------------------------------- synthetic store
def write_synthetic_store(path: str, rows: int, d: int = 384, doc_rows: int = 128,
                          n_atoms: int = 4096, active: int = 24, noise: float = 0.05) -> None:
    """A store of ``rows`` rows (documents of ``doc_rows``) that a sparse dictionary explains
    in part: each row is a shared offset plus ``active`` of ``n_atoms`` random unit
    directions (drawn with probability falling as rank**-0.8) with exponential weights,
    plus Gaussian noise."""
    import ksae
    import numpy as np

    if Path(path).exists():
        raise SystemExit(f"--write-synthetic: {path} exists; give a new directory")
    rng = np.random.default_rng(1234)
    atoms = rng.standard_normal((n_atoms, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    popularity = rng.permutation(np.arange(1, n_atoms + 1) ** -0.8)
    popularity /= popularity.sum()
    offset = 0.5 * rng.standard_normal(d).astype(np.float32)
    writer = ksae.ActivationStoreWriter(path, d, metadata={"synthetic": True, "atoms": n_atoms,
                                                           "active": active, "noise": noise})
    docs_per_add = 16
    for first in range(0, -(-rows // doc_rows), docs_per_add):
        n = min(docs_per_add * doc_rows, rows - first * doc_rows)
        which = rng.choice(n_atoms, (n, active), p=popularity)
        weights = rng.exponential(1.0, (n, active)).astype(np.float32)
        X = offset + np.einsum("na,nad->nd", weights, atoms[which], dtype=np.float32)
        X += noise * rng.standard_normal((n, d), dtype=np.float32)
        index = np.arange(n)
        writer.add(X, rng.integers(0, 30522, n), first + index // doc_rows, index % doc_rows)
    writer.close()


# ----------------------------------------------------------------- shared by both children
def open_split(args: argparse.Namespace) -> tuple[Any, Any]:
    """(train, test) views, split as ``ksae train --dataset store`` splits them, with every
    shard checked and in the page cache (``total_variance`` reads each one), so neither
    timed loop pays for a first read."""
    import ksae

    store = ksae.ActivationStore(args.store)
    train, test = store.split_documents(args.test_fraction, seed=SPLIT_SEED)
    train.total_variance(args.threads)
    return train, test


def rows_of(view: Any) -> Any:
    """All rows of a store view, in order, in memory."""
    import numpy as np

    return np.concatenate(list(view.batches(65536, None)))


def weights_hash(weights: dict[str, Any]) -> str:
    """SHA-256 of the four parameters as float32, in the public shapes."""
    import numpy as np

    h = hashlib.sha256()
    for name in PARAMETERS:
        h.update(np.ascontiguousarray(weights[name], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def chunks(X: Any, size: int) -> Iterator[Any]:
    for start in range(0, X.shape[0], size):
        yield X[start:start + size]


def test_figures(X: Any, code: Callable[[Any], tuple[Any, Any]],
                 reconstruct: Callable[[Any], Any], n_latents: int, size: int) -> dict[str, float]:
    """FVU, MSE, L0 and dead fraction over the rows X (float64 sums), ``size`` rows at a
    time; ``code`` gives (values, indices) as NumPy arrays, ``reconstruct`` X_hat."""
    import numpy as np

    mean = X.mean(axis=0, dtype=np.float64)
    total = sse = active = 0.0
    fired = np.zeros(n_latents, dtype=bool)
    for part in chunks(X, size):
        part64 = part.astype(np.float64)
        total += float(np.sum((part64 - mean) ** 2))
        sse += float(np.sum((part64 - reconstruct(part)) ** 2))
        values, indices = code(part)
        on = values > 0
        active += float(on.sum())
        fired[indices[on]] = True
    return {"fvu": sse / total, "mse": sse / X.size, "l0": active / X.shape[0],
            "dead_fraction": float(1.0 - fired.mean())}


def time_encode(encode: Callable[[Any], Any], X: Any, size: int) -> dict[str, float]:
    """Encode tokens/s over X, ``size`` rows a call: one untimed pass, then the best of two
    passes (each pass takes seconds; the best is the least disturbed by other work)."""
    for part in chunks(X, size):
        encode(part)
    passes = []
    for _ in range(2):
        start = time.perf_counter()
        for part in chunks(X, size):
            encode(part)
        passes.append(time.perf_counter() - start)
    return {"encode_seconds": min(passes), "encode_tokens_per_s": X.shape[0] / min(passes)}


# ----------------------------------------------------------------- ksae child
class TimedSource:
    """The train view as ``fit`` sees it (a ``ksae.BatchSource``): notes each epoch's seed,
    and when the first epoch's batches are asked for (the start of the training loop),
    calls ``on_start`` and then starts the clock."""

    def __init__(self, view: Any, on_start: Callable[[], None]) -> None:
        self.view, self.on_start = view, on_start
        self.shape, self.dtype = view.shape, view.dtype
        self.seeds: list[int | None] = []
        self.started: float | None = None

    def batches(self, batch_size: int, seed: int | None, skip: int = 0,
                n_threads: int = 0) -> Iterator[Any]:
        if self.started is None:
            self.on_start()
            self.started = time.perf_counter()
        self.seeds.append(seed)
        return self.view.batches(batch_size, seed, skip, n_threads)

    def total_variance(self, n_threads: int = 0) -> float:
        return self.view.total_variance(n_threads)

    def sample(self) -> Any:
        return self.view.sample()

    def row(self, i: int) -> Any:
        return self.view.row(i)


def run_ksae(args: argparse.Namespace) -> dict[str, Any]:
    """Train ksae with ``fit`` on the train view, then score and time encode on the test rows."""
    settings = limit_blas_threads(args.threads)
    import ksae

    train, test = open_split(args)
    sae = ksae.SparseAutoencoder(args.n_latents, args.k, random_state=RANDOM_STATE,
                                 n_threads=args.threads)
    initial: dict[str, str] = {}

    def note_initial() -> None:  # runs before the clock starts
        initial["hash"] = weights_hash({name: getattr(sae, name + "_") for name in PARAMETERS})

    source = TimedSource(train, note_initial)
    sae.fit(source, epochs=args.epochs, batch_size=args.batch_size)
    seconds = time.perf_counter() - source.started
    X_test = rows_of(test)
    figures = test_figures(X_test, sae.encode, sae.reconstruct, args.n_latents, args.encode_batch)
    return {"seeds": source.seeds, "initial_hash": initial["hash"], "train_seconds": seconds,
            "train_loss": sae.history_["loss"][-1], **figures,
            **time_encode(sae.encode, X_test, args.encode_batch),
            "threads": f"ksae n_threads={args.threads}; NumPy {settings}",
            "versions": {"ksae": ksae.__version__, "build_info": ksae.build_info()}}


# ----------------------------------------------------------------- torch child
def initial_state(args: argparse.Namespace, train: Any) -> tuple[dict[str, Any], list[int]]:
    """The weights ``fit`` starts from and the seeds of its epochs: ``fit`` initialises the
    model state from ``default_rng(random_state)`` on the source's sample, then draws one
    seed per epoch from the same generator (nothing else draws from it with the defaults)."""
    import ksae
    import numpy as np

    cfg = ksae.SparseAutoencoder(args.n_latents, args.k, random_state=RANDOM_STATE,
                                 n_threads=args.threads).config
    state = ksae.ModelState.initialize(cfg, train.shape[1], np.random.default_rng(RANDOM_STATE),
                                       train.sample())
    sae = ksae.SparseAutoencoder.from_state(state)
    weights = {name: np.array(getattr(sae, name + "_"), dtype=np.float32) for name in PARAMETERS}
    seeds = [int(state.rng.integers(2**63)) for _ in range(args.epochs)]
    return weights, seeds


def run_torch(args: argparse.Namespace) -> dict[str, Any]:
    """Train IdiomaticTopKSAE on fit's batches, then score and time encode on the test rows."""
    from torch_sae import IdiomaticTopKSAE, set_threads

    settings = set_threads(args.threads)  # first, before PyTorch does any parallel work
    import torch

    train, test = open_split(args)
    weights, seeds = initial_state(args, train)
    model = IdiomaticTopKSAE(*(weights[name] for name in PARAMETERS), args.k)
    sse = rows = 0.0
    start = time.perf_counter()
    for seed in seeds:
        sse = rows = 0.0
        for batch in train.batches(args.batch_size, seed, 0, args.threads):
            loss = model.step(torch.from_numpy(batch))
            sse, rows = sse + loss * len(batch), rows + len(batch)
    seconds = time.perf_counter() - start

    @torch.no_grad()
    def encode(X: Any) -> tuple[Any, Any]:
        pre = (torch.from_numpy(X) - model.b_dec) @ model.W_enc + model.b_enc
        top = torch.topk(pre, args.k, dim=1)
        return torch.relu(top.values).numpy(), top.indices.numpy()

    @torch.no_grad()
    def reconstruct(X: Any) -> Any:
        return model(torch.from_numpy(X)).numpy().astype("float64")

    X_test = rows_of(test)
    figures = test_figures(X_test, encode, reconstruct, args.n_latents, args.encode_batch)
    return {"seeds": seeds, "initial_hash": weights_hash(weights), "train_seconds": seconds,
            "train_loss": sse / rows, **figures, **time_encode(encode, X_test, args.encode_batch),
            "threads": settings, "model": "torch_sae.IdiomaticTopKSAE",
            "optimizer": model.optimizer_kind, "versions": {"torch": torch.__version__}}


def run_child(args: argparse.Namespace) -> None:
    """Child entry point: train ``args.child`` once and print one JSON line, with the
    machine's load average before and after (other work on a shared machine shows there)."""
    load_before = os.getloadavg()[0]
    result = run_ksae(args) if args.child == "ksae" else run_torch(args)
    import numpy as np

    result.update(impl=args.child, numpy=np.__version__, peak_rss_mib=peak_rss_mib(),
                  load_average=[load_before, os.getloadavg()[0]])
    print(json.dumps(result))


# ----------------------------------------------------------------- parent
def cpu_description() -> dict[str, Any]:
    """CPU model, the SIMD flags that matter here, logical CPUs and those this process may use."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "flags": {flag: flag in flags for flag in CPU_FLAGS},
            "logical_cpus": os.cpu_count(), "usable_cpus": usable}


def store_description(args: argparse.Namespace) -> dict[str, Any]:
    """The store's metadata and the split's sizes (rows and documents)."""
    import ksae
    import numpy as np

    store = ksae.ActivationStore(args.store)
    train, test = store.split_documents(args.test_fraction, seed=SPLIT_SEED)

    def documents(view: Any) -> int:
        ids = [view.tokens_and_positions(i)[1][:, 0] for i in range(len(view.manifest["shards"]))]
        return int(np.unique(np.concatenate(ids)).size)

    return {"path": str(Path(args.store).resolve()), "d": store.shape[1],
            "stored_dtype": store.manifest["dtype"], "metadata": store.metadata,
            "train_rows": len(train), "test_rows": len(test),
            "train_documents": documents(train), "test_documents": documents(test)}


def check_agreement(runs: list[dict[str, Any]]) -> None:
    """Stop unless every run drew the same epoch seeds and started from the same weights."""
    for key in ("seeds", "initial_hash"):
        values = {json.dumps(run[key]) for run in runs}
        if len(values) != 1:
            raise SystemExit(f"the implementations disagree on {key}: {sorted(values)}")


def summarise(runs: list[dict[str, Any]], train_rows: int, epochs: int) -> dict[str, Any]:
    """Medians over one implementation's rounds."""
    tokens = train_rows * epochs
    out = {"train_tokens_per_s": median([tokens / r["train_seconds"] for r in runs]),
           "train_seconds": median([r["train_seconds"] for r in runs])}
    for key in ("fvu", "mse", "l0", "dead_fraction", "train_loss", "encode_tokens_per_s"):
        out[key] = median([r[key] for r in runs])
    return out


def table(record: dict[str, Any]) -> str:
    """A header and one markdown row for RESULTS.md."""
    s, a, b = record["settings"], record["summary"]["ksae"], record["summary"]["torch"]
    cpu = record["machine"]
    flags = "AVX-512" if cpu["flags"]["avx512f"] else "AVX2" if cpu["flags"]["avx2"] else "no AVX2"
    header = ("| store (train / test rows) | n_latents, k | epochs x batch | threads | "
              "ksae train tok/s | torch train tok/s | ksae / torch | ksae test FVU | "
              "torch test FVU | ksae L0, dead | torch L0, dead | ksae encode tok/s | "
              "torch encode tok/s | CPU |")
    row = (f"| {Path(record['store']['path']).name} ({record['store']['train_rows']} / "
           f"{record['store']['test_rows']}) | {s['n_latents']}, {s['k']} | "
           f"{s['epochs']} x {s['batch_size']} | {s['threads']} | "
           f"{a['train_tokens_per_s']:,.0f} | {b['train_tokens_per_s']:,.0f} | "
           f"{a['train_tokens_per_s'] / b['train_tokens_per_s']:.2f}x | {a['fvu']:.4f} | "
           f"{b['fvu']:.4f} | {a['l0']:.1f}, {a['dead_fraction']:.3f} | "
           f"{b['l0']:.1f}, {b['dead_fraction']:.3f} | {a['encode_tokens_per_s']:,.0f} | "
           f"{b['encode_tokens_per_s']:,.0f} | {cpu['model']} ({flags}, {cpu['usable_cpus']} CPUs) |")
    return "\n".join([header, "|" + "---|" * header.count(" | ") + "---|", row])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    pin_threads(args.threads)
    if args.write_synthetic:
        start = time.perf_counter()
        write_synthetic_store(args.store, args.write_synthetic)
        print(f"wrote {args.write_synthetic} synthetic rows to {args.store} "
              f"in {time.perf_counter() - start:.1f} s")
    began = time.perf_counter()
    store = store_description(args)
    print(f"store {store['path']}: {store['train_rows']} train rows ({store['train_documents']} "
          f"documents), {store['test_rows']} test rows ({store['test_documents']} documents), d={store['d']}")
    runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in IMPLEMENTATIONS}
    for round_ in range(args.repeats):
        order = IMPLEMENTATIONS if round_ % 2 == 0 else IMPLEMENTATIONS[::-1]
        for impl in order:
            result = run_json_child(child_argv(impl, args), args.threads)
            runs[impl].append(result)
            print(f"round {round_ + 1} {impl}: {result['train_seconds']:.1f} s training, "
                  f"test FVU {result['fvu']:.4f}, L0 {result['l0']:.1f}, "
                  f"encode {result['encode_tokens_per_s']:,.0f} tok/s; 1-minute load average "
                  f"{result['load_average'][0]:.1f} before, {result['load_average'][1]:.1f} after",
                  flush=True)
        check_agreement(runs["ksae"] + runs["torch"])
    record = {"machine": cpu_description(), "store": store,
              "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
              "versions": {**runs["ksae"][0]["versions"], **runs["torch"][0]["versions"],
                           "numpy": runs["ksae"][0]["numpy"],
                           "python": sys.version.split()[0]},
              "summary": {impl: summarise(runs[impl], store["train_rows"], args.epochs)
                          for impl in IMPLEMENTATIONS},
              "runs": runs, "wall_seconds": time.perf_counter() - began}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{args.repeats} round(s) in {record['wall_seconds']:.0f} s; medians; JSON in {args.out}\n")
    print(table(record))


if __name__ == "__main__":
    main()
