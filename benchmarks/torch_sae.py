"""The ksae training step written in PyTorch (CPU), twice: as a PyTorch user would write it,
and as one would write it knowing the code is k-sparse. The benchmarks race both against
ksae; they are not part of the library.

Both train the model of ``ksae.SparseAutoencoder`` with its defaults (relu, topk,
``normalize_decoder=True``) exactly as ksae's step does:

    pre   = (X - b_dec) @ W_enc + b_enc
    S     = the k largest entries of each row of pre;  z = relu(pre) on S, 0 elsewhere
    X_hat = z @ W_dec + b_dec;   loss = mean((X_hat - X)**2)   (over all elements)
    grad_W_dec[j] -= (grad_W_dec[j] . W_dec[j] / |W_dec[j]|^2) W_dec[j]   (projection)
    Adam (PyTorch's formulation, lr 1e-3, betas 0.9/0.999, eps 1e-8) on all four parameters
    W_dec[j] /= |W_dec[j]|                                                 (renormalisation)

Each model is built from NumPy weights in the public shapes, W_enc (d_in, n_latents) and
W_dec (n_latents, d_in), so that every implementation can start from ksae's own.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def set_threads(n: int) -> str:
    """Pin PyTorch to ``n`` intra-op threads and one inter-op thread; call right after the
    import, before any parallel work (the inter-op pool can be sized only once). Returns a
    description for the record."""
    torch.set_num_threads(n)
    torch.set_num_interop_threads(1)
    return (f"torch {torch.__version__}: {torch.get_num_threads()} intra-op, "
            f"{torch.get_num_interop_threads()} inter-op threads")


def _parameter(array: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.tensor(np.ascontiguousarray(array, dtype=np.float32)))


@torch.no_grad()
def project_decoder_grad(grad: torch.Tensor, W_dec: torch.Tensor) -> None:
    """Remove from each row of the decoder gradient its component along the decoder row, in
    place (ksae divides by the row's squared norm rather than assuming it is 1; so do we)."""
    coef = torch.linalg.vecdot(grad, W_dec, dim=1) / torch.linalg.vecdot(W_dec, W_dec, dim=1)
    grad.addcmul_(coef.unsqueeze(1), W_dec, value=-1)


@torch.no_grad()
def normalize_decoder_rows(W_dec: torch.Tensor) -> None:
    """Rescale each decoder row to unit norm, in place."""
    W_dec.div_(torch.linalg.vector_norm(W_dec, dim=1, keepdim=True))


class IdiomaticTopKSAE(nn.Module):
    """What a PyTorch user writes: parameters in an ``nn.Module``, ``torch.topk`` on the
    pre-activations (relu on the kept values, as OpenAI's TopK layer does), the code
    scattered into a dense (batch, n_latents) tensor, a dense decoder product, autograd, and
    ``torch.optim.Adam`` with its defaults. Autograd keeps z dense, so the backward pass
    costs two more dense batch x n_latents x d_in products: the cost ksae avoids."""

    def __init__(self, W_enc: np.ndarray, b_enc: np.ndarray, W_dec: np.ndarray,
                 b_dec: np.ndarray, k: int, lr: float = 1e-3) -> None:
        super().__init__()
        self.k = k
        self.W_enc = _parameter(W_enc)
        self.b_enc = _parameter(b_enc)
        self.W_dec = _parameter(W_dec)
        self.b_dec = _parameter(b_dec)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        # With foreach and fused left unset, PyTorch picks neither for CPU tensors.
        self.optimizer_kind = "torch.optim.Adam, defaults (per-tensor loop on the CPU)"

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        pre = (X - self.b_dec) @ self.W_enc + self.b_enc
        top = torch.topk(pre, self.k, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
        return z @ self.W_dec + self.b_dec

    def loss(self, X: torch.Tensor) -> float:
        with torch.no_grad():
            return F.mse_loss(self(X), X).item()

    def step(self, X: torch.Tensor) -> float:
        """One Adam step on the batch X; returns the loss before the update."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(self(X), X)
        loss.backward()
        project_decoder_grad(self.W_dec.grad, self.W_dec)
        self.optimizer.step()
        normalize_decoder_rows(self.W_dec)
        return loss.item()

    def weights(self) -> dict[str, np.ndarray]:
        """The parameters in the public shapes, as NumPy arrays (copies)."""
        return {name: getattr(self, name).detach().numpy().copy()
                for name in ("W_enc", "b_enc", "W_dec", "b_dec")}


def fused_adam_works() -> bool:
    """Whether ``torch.optim.Adam(..., fused=True)`` runs on the CPU in this PyTorch (it was
    CUDA-only before 2.4): tried on a two-element parameter, since an unsupported device
    fails at the first step rather than in the constructor."""
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    try:
        torch.optim.Adam([p], lr=1e-3, fused=True).step()
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True


class SparseTopKSAE:
    """The same step written for a k-sparse code, without autograd (under ``no_grad``):

    - one dense product, ``torch.addmm(b_enc, X - b_dec, W_enc)``, with W_enc held
      transposed (n_latents, d_in) as ksae holds it, so a latent's gradient is one
      contiguous row;
    - ``torch.topk(..., sorted=False)`` and relu on the k kept values;
    - decode by ``F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")``:
      batch * k * d_in work;
    - the backward by hand: dz by gathering the kept decoder rows, dW_dec, dW_enc and db_enc
      by ``index_add_`` of the selected rows only, db_dec from the bias gradients;
    - Adam with ``fused=True`` where it runs on the CPU, else ``foreach=True``.
    The gradient buffers are allocated once and handed to the optimizer as ``.grad``.
    """

    def __init__(self, W_enc: np.ndarray, b_enc: np.ndarray, W_dec: np.ndarray,
                 b_dec: np.ndarray, k: int, lr: float = 1e-3) -> None:
        self.k = k
        self.W_enc_t = _parameter(np.asarray(W_enc).T)
        self.b_enc = _parameter(b_enc)
        self.W_dec = _parameter(W_dec)
        self.b_dec = _parameter(b_dec)
        self.params = [self.W_enc_t, self.b_enc, self.W_dec, self.b_dec]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        kind = "fused" if fused_adam_works() else "foreach"
        self.optimizer = torch.optim.Adam(self.params, lr=lr, **{kind: True})
        self.optimizer_kind = f"torch.optim.Adam({kind}=True)"

    @torch.no_grad()
    def encode(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(centered input, kept values, their indices), each row's k latents unordered."""
        centered = X - self.b_dec
        pre = torch.addmm(self.b_enc, centered, self.W_enc_t.t())
        top = torch.topk(pre, self.k, dim=1, sorted=False)
        return centered, torch.relu(top.values), top.indices

    @torch.no_grad()
    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        X_hat = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")
        return X_hat.add_(self.b_dec)

    @torch.no_grad()
    def loss(self, X: torch.Tensor) -> float:
        _, values, indices = self.encode(X)
        return F.mse_loss(self.decode(values, indices), X).item()

    @torch.no_grad()
    def step(self, X: torch.Tensor) -> float:
        """One Adam step on the batch X; returns the loss before the update."""
        centered, values, indices = self.encode(X)
        diff = self.decode(values, indices).sub_(X)
        flat = diff.view(-1)
        loss = (torch.dot(flat, flat) / flat.numel()).item()
        grad_out = diff.mul_(2.0 / flat.numel())  # dL/dX_hat, (batch, d_in)
        batch, d_in = grad_out.shape
        rows = indices.reshape(-1)
        # dz[r, s] = grad_out[r] . W_dec[indices[r, s]]; relu' keeps it where the value is > 0
        kept_rows = F.embedding(indices, self.W_dec)  # (batch, k, d_in)
        dpre = torch.bmm(kept_rows, grad_out.unsqueeze(2)).squeeze(2).mul_(values > 0)
        g_W_dec, g_W_enc_t = self.W_dec.grad, self.W_enc_t.grad
        g_W_dec.zero_().index_add_(0, rows, (values.unsqueeze(2) * grad_out.unsqueeze(1)).view(-1, d_in))
        project_decoder_grad(g_W_dec, self.W_dec)
        g_W_enc_t.zero_().index_add_(0, rows, (dpre.unsqueeze(2) * centered.unsqueeze(1)).view(-1, d_in))
        self.b_enc.grad.zero_().index_add_(0, rows, dpre.view(-1))
        # b_dec enters the decoder (+) and the encoder (-): grad_out summed, minus W_enc @ db_enc
        torch.sub(grad_out.sum(0), self.b_enc.grad @ self.W_enc_t, out=self.b_dec.grad)
        self.optimizer.step()
        normalize_decoder_rows(self.W_dec)
        return loss

    def weights(self) -> dict[str, np.ndarray]:
        """The parameters in the public shapes, as NumPy arrays (copies)."""
        return {"W_enc": self.W_enc_t.detach().numpy().T.copy(),
                "b_enc": self.b_enc.detach().numpy().copy(),
                "W_dec": self.W_dec.detach().numpy().copy(),
                "b_dec": self.b_dec.detach().numpy().copy()}


MODELS = {"torch_idiomatic": IdiomaticTopKSAE, "torch_sparse": SparseTopKSAE}
