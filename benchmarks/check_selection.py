"""Where ksae's and PyTorch's float32 codes differ at one shape, and why: the rows whose
selected latent sets differ, with the gap between their k-th and (k+1)-th pre-activations
computed in float64. A gap at float32 rounding level means a near-tie that the two
libraries' products round differently, not a wrong selection.

    python benchmarks/check_selection.py 4096,2048,65536,64 --threads 2

Uses the weights and batch of bench_torch.py's agreement check (steps.make_problem).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import parse_shape, pin_threads  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", type=parse_shape, help="batch,d_in,n_latents,k")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--show", type=int, default=10, help="rows to describe")
    args = ap.parse_args(argv)
    pin_threads(args.threads)
    import numpy as np
    import torch

    from steps import make_problem

    torch.set_num_threads(args.threads)
    X, sae = make_problem(args.shape, args.threads)
    k = args.shape[3]
    _, mine = sae.encode(X)
    W_enc = torch.from_numpy(np.ascontiguousarray(sae.W_enc_))
    pre = (torch.from_numpy(X) - torch.from_numpy(sae.b_dec_)) @ W_enc + torch.from_numpy(sae.b_enc_)
    theirs = torch.topk(torch.relu(pre), k, dim=1).indices.numpy()
    differ = [r for r in range(X.shape[0]) if set(mine[r]) != set(theirs[r])]
    print(f"shape {args.shape}: {len(differ)} of {X.shape[0]} rows select different latents")
    W64, b64 = sae.W_enc_.astype(np.float64), sae.b_enc_.astype(np.float64)
    for r in differ[:args.show]:
        exact = (X[r].astype(np.float64) - sae.b_dec_) @ W64 + b64
        top = np.sort(exact)[::-1]
        only_mine = sorted(set(mine[r].tolist()) - set(theirs[r].tolist()))
        only_theirs = sorted(set(theirs[r].tolist()) - set(mine[r].tolist()))
        print(f"row {r}: float64 k-th {top[k - 1]:.9f}, (k+1)-th {top[k]:.9f}, gap "
              f"{top[k - 1] - top[k]:.2e}; only ksae keeps {only_mine} (float64 "
              f"{np.round(exact[only_mine], 9).tolist()}), only torch keeps {only_theirs} "
              f"(float64 {np.round(exact[only_theirs], 9).tolist()})")


if __name__ == "__main__":
    main()
