// Backward pass of a TopK autoencoder: every term after the forward product is sparse.
#pragma once

#include "common.hpp"

#include <vector>

namespace ksae {

// The selected (row, slot) pairs grouped by latent, rows in increasing order within a latent:
// entries[offsets[j] .. offsets[j+1]) are the flat positions r*k+s with indices[r, s] == j.
// Grouping by latent lets each thread own whole gradient rows: no races, no atomics, and
// the same summation order for any thread count.
struct LatentGroups {
  std::vector<Index> offsets;
  std::vector<Index> entries;  // flat positions r*k + s
  std::vector<Index> rows;     // their rows r

  void build(const LatentIndex* indices, Index batch, Index k, Index n_latents) {
    const Index count = batch * k;
    offsets.assign(static_cast<size_t>(n_latents) + 1, 0);
    for (Index p = 0; p < count; ++p) ++offsets[indices[p] + 1];
    for (Index j = 0; j < n_latents; ++j) offsets[j + 1] += offsets[j];
    entries.resize(static_cast<size_t>(count));
    rows.resize(static_cast<size_t>(count));
    std::vector<Index> next(offsets.begin(), offsets.end() - 1);
    for (Index r = 0; r < batch; ++r) {
      for (Index s = 0; s < k; ++s) {
        const Index e = next[indices[r * k + s]]++;
        entries[e] = r * k + s;
        rows[e] = r;
      }
    }
  }
};

// Gradients of a loss L with respect to the parameters, given grad_out = dL/dX_hat:
//     dvalues       = (grad_out @ W_dec.T)[selected] + grad_values     (batch x k)
//     dpre          = dvalues * act'(pre), kept on the selected entries only
//                     (softmax: the Jacobian of the row's softmax over its k entries; swish and
//                     gelu read the kept pre-activations from `selected_pre`)
//     grad_W_dec    = dense(values).T @ grad_out
//     grad_W_enc_t  = dense(dpre).T @ centered           (the transpose of dL/dW_enc)
//     grad_b_enc    = dense(dpre).sum(axis=0)
//     grad_b_dec    = grad_out.sum(axis=0) - grad_b_enc @ W_enc_t
// where dense(.) scatters a (batch x k) array into (batch x n_latents) along `indices`.
// `grad_values` (batch x k, may be null: zero) is a gradient of the loss with respect to the
// code values that does not pass through the decoder: the derivative of a penalty on the code
// (L1, KL-divergence). `grad_values_out` (batch x k, may be null) receives dvalues, the whole
// gradient with respect to the values (a straight-through estimator needs it).
// The output width d_out (W_dec is n_latents x d_out, grad_out batch x d_out) may differ from
// the input width d_in (W_enc_t is n_latents x d_in, centered batch x d_in): a classifier head
// in place of the decoder. grad_b_dec treats b_dec as both the input centering and the output
// bias, which needs d_out == d_in; pass null to leave the centering untrained (the caller sums
// grad_out for an output bias of its own).
// With project_decoder_grad, each grad_W_dec row loses its component along W_dec's row, so a
// step keeps unit-norm decoder rows on the sphere to first order.
// All outputs are overwritten (latents that no row selected get zero rows), or, with
// `accumulate`, added to (latents that no row selected are left as they are): a second code
// of the same batch, such as AuxK's, adds its gradients to the first one's.
template <class T>
void backward_topk(const T* grad_out, const T* centered, const T* values,
                   const LatentIndex* indices, Index batch, Index k, const T* W_enc_t,
                   const T* W_dec, Index n_latents, Index d_in, Index d_out, Activation act,
                   bool project_decoder_grad, int n_threads, T* grad_W_enc_t, T* grad_b_enc,
                   T* grad_W_dec, T* grad_b_dec, bool accumulate = false,
                   const T* selected_pre = nullptr, const T* grad_values = nullptr,
                   T* grad_values_out = nullptr) {
  using RowVec = Eigen::Matrix<T, 1, Eigen::Dynamic>;
  using ConstRow = Eigen::Map<const RowVec>;
  using Row = Eigen::Map<RowVec>;
  const double work = double(batch) * double(k) * double(d_in + d_out) / 2 +
                      double(n_latents) * double(d_in + d_out) / 2;
  const int nt = threads_for(n_threads, work, 1 << 16);
  const Index count = batch * k;
  std::vector<T> dpre(static_cast<size_t>(count));
  std::vector<T> db_enc(static_cast<size_t>(n_latents), T(0));  // this call's part of grad_b_enc
  LatentGroups groups;
  groups.build(indices, batch, k, n_latents);

#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
#pragma omp for schedule(static)
    for (Index r = 0; r < batch; ++r) {
      ConstRow g(grad_out + r * d_out, d_out);
      T* dp = dpre.data() + r * k;
      const T* a = values + r * k;
      for (Index s = 0; s < k; ++s) dp[s] = g.dot(ConstRow(W_dec + indices[r * k + s] * d_out, d_out));
      if (grad_values) {
        for (Index s = 0; s < k; ++s) dp[s] += grad_values[r * k + s];
      }
      if (grad_values_out) std::copy(dp, dp + k, grad_values_out + r * k);
      if (act == Activation::softmax) {  // d a_s / d x_t = a_s (delta_st - a_t)
        T weighted = T(0);
        for (Index s = 0; s < k; ++s) weighted += a[s] * dp[s];
        for (Index s = 0; s < k; ++s) dp[s] = a[s] * (dp[s] - weighted);
      } else {
        for (Index s = 0; s < k; ++s) {
          const T x = selected_pre ? selected_pre[r * k + s] : T(0);
          dp[s] *= activation_derivative(act, a[s], x);
        }
      }
    }

    std::vector<T> decoder_row;  // per thread: this call's decoder row when accumulating
#pragma omp for schedule(dynamic, 64)
    for (Index j = 0; j < n_latents; ++j) {
      Row gd(grad_W_dec + j * d_out, d_out);
      Row ge(grad_W_enc_t + j * d_in, d_in);
      const Index begin = groups.offsets[j], end = groups.offsets[j + 1];
      if (begin == end) {
        if (!accumulate) {
          gd.setZero();
          ge.setZero();
          grad_b_enc[j] = T(0);
        }
        continue;
      }
      const Index* entries = groups.entries.data() + begin;
      const Index* rows = groups.rows.data() + begin;
      const Index count = end - begin;
      // With accumulate and no projection, the rows start from (and so add to) what they
      // hold. With projection, this call's decoder row is formed and projected on its own
      // first, so a buffer's earlier content is added to, never projected again.
      const bool separate_decoder_row = accumulate && project_decoder_grad;
      if (separate_decoder_row) decoder_row.resize(static_cast<size_t>(d_out));
      T* gd_out = separate_decoder_row ? decoder_row.data() : gd.data();
      weighted_row_sum(gd_out, d_out, count, [&](Index e) {
        return std::make_pair(values[entries[e]], grad_out + rows[e] * d_out);
      }, accumulate && !separate_decoder_row ? gd.data() : nullptr);
      weighted_row_sum(ge.data(), d_in, count, [&](Index e) {
        return std::make_pair(dpre[entries[e]], centered + rows[e] * d_in);
      }, accumulate ? ge.data() : nullptr);
      T gb = T(0);
      for (Index e = 0; e < count; ++e) gb += dpre[entries[e]];
      db_enc[j] = gb;
      grad_b_enc[j] = accumulate ? grad_b_enc[j] + gb : gb;
      if (project_decoder_grad) {
        Row part(gd_out, d_out);
        ConstRow w(W_dec + j * d_out, d_out);
        const T ww = w.squaredNorm();
        if (ww > T(0)) part.noalias() -= (part.dot(w) / ww) * w;
        if (separate_decoder_row) gd.noalias() += part;
      }
    }
    // implicit barrier: db_enc is complete.

    // grad_b_dec (d_out == d_in), split by feature columns so each thread owns its outputs.
    Index c0 = 0, c1 = 0;
    if (grad_b_dec) this_thread_range(d_in, &c0, &c1, 16);
    if (c1 > c0) {
      const Index w = c1 - c0;
      Row acc(grad_b_dec + c0, w);
      if (!accumulate) acc.setZero();
      for (Index r = 0; r < batch; ++r) acc.noalias() += ConstRow(grad_out + r * d_out + c0, w);
      for (Index j = 0; j < n_latents; ++j) {
        if (groups.offsets[j] == groups.offsets[j + 1]) continue;
        acc.noalias() -= db_enc[j] * ConstRow(W_enc_t + j * d_in + c0, w);
      }
    }
  }
}

}  // namespace ksae
