"""A/B encode timings in one process, interleaved round by round: NumPy's X @ W_enc (the
floor), another build's ``_core.encode`` (its .so loaded beside the installed one, with a pre
buffer and fused), the installed build with a pre buffer, and with ``pre=None`` (the fused
path). Checks first that all four give bitwise equal codes. For a loaded machine, where only
same-run comparisons mean anything.

    python benchmarks/bench_encode_ab.py OTHER/_core.cpython-311-x86_64-linux-gnu.so \
        1024,768,16384,32 31 1          # shape, rounds, threads (also OPENBLAS_NUM_THREADS)
"""
import importlib.util, sys, time, os
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
import numpy as np
import ksae
from ksae import _core as new
spec = importlib.util.spec_from_file_location("oldpkg._core", sys.argv[1])
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
from ksae.buffers import aligned_empty
B, d, n, k = map(int, sys.argv[2].split(","))
rounds, nt = int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
sae = ksae.SparseAutoencoder(n_latents=n, k=k, random_state=0, n_threads=nt)
X = rng.standard_normal((B, d), dtype=np.float32)
sae.partial_fit(X)
p = sae.state_.params
W_enc = np.ascontiguousarray(p["W_enc_t"].T)
centered = aligned_empty((B, d), np.float32); pre = aligned_empty((B, n), np.float32)
args = (X, p["W_enc_t"], p["b_enc"], p["b_dec"], k, "relu", nt, centered)
runs = {
    "floor X @ W_enc": lambda: X @ W_enc,
    "old encode (pre buffer)": lambda: old.encode(*args, pre),
    "old encode, fused": lambda: old.encode(*args, None),
    "new encode, pre buffer": lambda: new.encode(*args, pre),
    "new encode, fused": lambda: new.encode(*args, None),
}
a = old.encode(*args, pre); b = new.encode(*args, pre); c = new.encode(*args, None)
d = old.encode(*args, None)
assert all(np.array_equal(x, y) for o in (b, c, d) for x, y in zip(a, o))
times = {name: [] for name in runs}
for r in range(rounds):
    for name, f in runs.items():
        t = time.perf_counter(); f(); times[name].append(time.perf_counter() - t)
floor = np.median(times["floor X @ W_enc"])
for name, t in times.items():
    t = np.array(t) * 1e3
    print(f"{name:28s} median {np.median(t):8.2f} ms  p25 {np.percentile(t,25):8.2f}  p75 {np.percentile(t,75):8.2f}  / floor {np.median(t)/ (floor*1e3):.3f}")
