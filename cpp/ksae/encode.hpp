// Forward pass of a TopK autoencoder: the one dense product, the selection and the sparse decode.
#pragma once

#include "common.hpp"
#include "topk.hpp"

#include <vector>

namespace ksae {

template <class T>
void select_rows(const T* pre, const T* bias, Index batch, Index n_latents, Index k,
                 Activation act, T* values, LatentIndex* indices, T* selected_pre);

// Encodes a batch and keeps the k largest pre-activations per row:
//     centered = X - b_dec                                       (batch x d_in)
//     pre      = centered @ W_enc + b_enc                       (batch x n_latents)
//     indices  = stable_argsort(-pre, axis=1)[:, :k]           (batch x k)
//     values   = act(take_along_axis(pre, indices, axis=1))     (batch x k)
// W_enc is held transposed (W_enc_t, n_latents x d_in, row-major) so that a latent's encoder
// weights are one contiguous row, as its decoder weights are in W_dec.
// `centered` (batch x d_in) is an output kept for the backward pass; `pre` (batch x n_latents)
// is scratch space holding the pre-activations without b_enc; `selected_pre` (batch x k, may
// be null) receives the kept pre-activations, which swish's and gelu's derivatives need.
// The selection is on act(pre) (see Activation); softmax normalises each row's k values.
template <class T>
void encode_topk(const T* X, Index batch, Index d_in, const T* W_enc_t, const T* b_enc,
                 const T* b_dec, Index n_latents, Index k, Activation act, int n_threads,
                 T* centered, T* pre, T* values, LatentIndex* indices, T* selected_pre = nullptr) {
  const int nt = threads_for(n_threads, double(batch) * double(n_latents) * double(d_in), 1 << 20);
#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
#pragma omp for schedule(static)
    for (Index r = 0; r < batch; ++r) {
      const T* x = X + r * d_in;
      T* c = centered + r * d_in;
      for (Index i = 0; i < d_in; ++i) c[i] = x[i] - b_dec[i];
    }
    // The dense product, split by latent columns: each thread multiplies all rows by its own
    // slice of W_enc, so the large operand is read (and packed) once in all.
    Index c0, c1;
    this_thread_range(n_latents, &c0, &c1, 16);
    if (c1 > c0) {
      ConstMatrixMap<T> C(centered, batch, d_in);
      ConstMatrixMap<T> W(W_enc_t + c0 * d_in, c1 - c0, d_in);
      StridedMatrixMap<T> P(pre + c0, batch, c1 - c0, Eigen::OuterStride<>(n_latents));
      P.noalias() = C * W.transpose();
    }
#pragma omp barrier
    select_rows(pre, b_enc, batch, n_latents, k, act, values, indices, selected_pre);
  }
}

// The per-row selection of encode_topk on given pre-activations (without bias): for each
// row r, indices[r] = the k largest entries of pre[r] + bias, values[r] = act of them. Runs
// as an `omp for` inside the caller's parallel region.
template <class T>
void select_rows(const T* pre, const T* bias, Index batch, Index n_latents, Index k,
                 Activation act, T* values, LatentIndex* indices, T* selected_pre) {
  SelectionScratch<T> scratch;
  // An orphaned `omp for`: every thread of the caller's region takes the same branch.
  auto run = [&](auto key) {
#pragma omp for schedule(static)
    for (Index r = 0; r < batch; ++r) {
      const T* p = pre + r * n_latents;
      LatentIndex* idx = indices + r * k;
      T* v = values + r * k;
      select_topk_row(p, bias, n_latents, k, idx, scratch, key);
      for (Index s = 0; s < k; ++s) {
        const T x = p[idx[s]] + bias[idx[s]];
        if (selected_pre) selected_pre[r * k + s] = x;
        v[s] = act == Activation::softmax ? x : activate(act, x);
      }
      if (act == Activation::softmax) normalize_softmax(v, k);
    }
  };
  if (act == Activation::swish) {
    run([](T x) { return activate(Activation::swish, x); });
  } else if (act == Activation::gelu) {
    run([](T x) { return activate(Activation::gelu, x); });
  } else {
    run([](T x) { return x; });
  }
}

// select_rows as a kernel of its own: picks a second code from the pre-activations an
// encode left behind (AuxK picks among dead latents by giving the others a -inf bias).
template <class T>
void select_topk(const T* pre, const T* bias, Index batch, Index n_latents, Index k,
                 Activation act, int n_threads, T* values, LatentIndex* indices,
                 T* selected_pre = nullptr) {
  const int nt = threads_for(n_threads, double(batch) * double(n_latents), 1 << 15);
#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
    select_rows(pre, bias, batch, n_latents, k, act, values, indices, selected_pre);
  }
}

// Decodes sparse codes: out[r] = b_dec + sum_s values[r, s] * W_dec[indices[r, s]], which
// equals dense(values, indices) @ W_dec + b_dec at batch*k*d_in cost. Indices must lie in
// [0, n_latents) (the binding checks).
template <class T>
void decode_sparse(const T* values, const LatentIndex* indices, Index batch, Index k,
                   const T* W_dec, const T* b_dec, Index d_in, int n_threads, T* out) {
  const int nt = threads_for(n_threads, double(batch) * double(k + 1) * double(d_in), 1 << 16);
#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
#pragma omp for schedule(static)
    for (Index r = 0; r < batch; ++r) {
      const T* v = values + r * k;
      const LatentIndex* idx = indices + r * k;
      weighted_row_sum(out + r * d_in, d_in, k,
                       [&](Index s) { return std::make_pair(v[s], W_dec + idx[s] * d_in); }, b_dec);
    }
  }
}

}  // namespace ksae
