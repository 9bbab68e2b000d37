"""Peak memory of training straight from a .npy file larger than we want in memory.

Writes a float32 .npy of about ``--gib`` GiB (d_in columns of uniform noise, written a chunk at
a time so this script itself stays small), then in a fresh child process trains one epoch of a
k-sparse autoencoder from ``ksae.NpyRowStream`` and reports the child's peak resident memory
(VmHWM) against the file size and against what the model itself needs (weights, gradients,
Adam's two moments, the batch's pre-activations).

    python benchmarks/bench_stream_memory.py --gib 2 --d-in 768 --n-latents 4096 --k 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np, ksae
    path, n_latents, k, batch, threads = sys.argv[1], *map(int, sys.argv[2:6])
    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    stream = ksae.NpyRowStream(path)
    sae = ksae.SparseAutoencoder(n_latents, k, random_state=0, n_threads=threads)
    before = vm("VmRSS")
    started = time.perf_counter()
    sae.fit(stream, epochs=1, batch_size=batch)
    seconds = time.perf_counter() - started
    print(json.dumps({"rss_before_mib": before, "peak_mib": vm("VmHWM"), "seconds": seconds,
                      "steps": sae.n_iter_, "loss_first": sae.history_["loss"][0]}))
""")


def write_npy(path: Path, rows: int, d_in: int, chunk: int = 65536) -> None:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, d_in))
    rng = np.random.default_rng(0)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        out[start:stop] = rng.random((stop - start, d_in), dtype=np.float32)
        out.flush()
    del out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="file size in GiB (default 2)")
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--n-latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the file (default: a temp dir)")
    args = parser.parse_args()
    rows = int(args.gib * 2**30 / (4 * args.d_in))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "activations.npy"
        write_npy(path, rows, args.d_in)
        file_mib = path.stat().st_size / 2**20
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.n_latents),
                              str(args.k), str(args.batch_size), str(args.threads)],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout)
    n, d = args.n_latents, args.d_in
    model_mib = (2 * n * d + n + d) * 4 * 4 / 2**20  # weights, gradients, Adam m and v
    scratch_mib = args.batch_size * (n + 3 * d) * 4 / 2**20  # pre-activations, centered, x_hat
    print(f"file: {rows} x {d} float32 = {file_mib:.0f} MiB; model {n} latents, k = {args.k}, "
          f"batch {args.batch_size}, {args.threads} threads")
    print(f"| file | peak RSS (VmHWM) | peak / file | RSS before fit | model + optimizer | "
          f"batch scratch | steps | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {file_mib:.0f} MiB | {result['peak_mib']:.0f} MiB | "
          f"{result['peak_mib'] / file_mib:.2f} | {result['rss_before_mib']:.0f} MiB | "
          f"{model_mib:.0f} MiB | {scratch_mib:.0f} MiB | {result['steps']} | {result['seconds']:.1f} |")


if __name__ == "__main__":
    main()
