// Backward pass of a TopK autoencoder: every term after the forward product is sparse.
#pragma once

#include "common.hpp"
#include "optim.hpp"

#include <atomic>
#include <cstdint>
#include <memory>
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

// The units [0, count) of one thread's share of backward_topk's encoder pass: its owner takes
// them from the front, and a thread that has finished its own share takes them from the
// back, each unit exactly once (front and back in one 64-bit word, claimed by
// compare-and-swap). `decoder_done` is set (release) once the owner's decoder pass, which
// forms the dpre the encoder pass reads, is complete.
struct alignas(64) StealRange {
  std::atomic<std::uint64_t> state{0};  // front << 32 | back; empty while front >= back
  std::atomic<bool> decoder_done{false};

  // The unit taken from the front (owner) or the back (others), or -1 when none is left.
  Index take_front() { return take(true); }
  Index take_back() { return take(false); }

 private:
  Index take(bool from_front) {
    std::uint64_t s = state.load(std::memory_order_relaxed);
    for (;;) {
      const std::uint64_t front = s >> 32, back = s & 0xffffffffu;
      if (front >= back) return -1;
      const std::uint64_t next = from_front ? ((front + 1) << 32) | back : (front << 32) | (back - 1);
      if (state.compare_exchange_weak(s, next, std::memory_order_relaxed)) {
        return Index(from_front ? front : back - 1);
      }
    }
  }
};

// Latents per block of backward_topk's passes: a block's gradient rows take about 128 KiB
// (they stay in L2 until the block's updates read them), 4 to 32 rows.
inline Index backward_block(Index width, Index scalar_bytes) {
  const Index fit = (Index(128) << 10) / std::max<Index>(1, width * scalar_bytes);
  return std::clamp<Index>(fit, 4, 32);
}

// The fused optimizer step of backward_topk: Adam (optim.hpp's formulation and constants)
// on every parameter of the autoencoder, each latent's rows updated as soon as the gradient
// rows of its block of latents are formed (backward_block), so the whole weight gradients
// are never stored and read back. `m` and `v` are the moments of W_enc_t, b_enc, W_dec and
// b_dec, in that order.
template <class T>
struct FusedAdam {
  T* W_enc_t;
  T* b_enc;
  T* W_dec;
  T* b_dec;
  T* m[4];
  T* v[4];
  AdamCoefficients<T> coefficients;
  bool unit_norm_decoder;  // W_dec's rows are rescaled to unit norm after their update

  // Latent j's decoder update from its gradient row gd (d_out values), and its encoder
  // update from ge (d_in values) and grad_b_enc[j]: element for element what adam_update
  // does to those rows.
  void update_decoder(Index j, const T* gd, Index d_out) const {
    const Index d = j * d_out;
    coefficients.apply(W_dec + d, gd, m[2] + d, v[2] + d, 0, d_out);
    if (unit_norm_decoder) normalize_span(W_dec + d, 0, d_out);
  }
  void update_encoder(Index j, const T* ge, const T* grad_b_enc, Index d_in) const {
    const Index e = j * d_in;
    coefficients.apply(W_enc_t + e, ge, m[0] + e, v[0] + e, 0, d_in);
    coefficients.apply(b_enc + j, grad_b_enc + j, m[1] + j, v[1] + j, 0, 1);
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
// The decoder products grad_out[r] . W_dec[indices[r, s]] are formed in the decoder pass, by
// the thread that owns (and updates) the latent's rows, from the row it is about to update:
// no other core reads a decoder row the backward writes (see decode_sparse), and the rows
// are not gathered a second time.
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
//
// With `adam` (not with accumulate; grad_b_dec and d_out == d_in required), the step's Adam
// update is fused in: grad_b_enc and grad_b_dec are written as above, grad_W_enc_t and
// grad_W_dec are not (they may be null), and every parameter ends as
// adam_update(param, its gradient) would leave it, bitwise, for every latent (those no row
// selected take a zero gradient). W_enc_t and W_dec must be adam->W_enc_t and adam->W_dec.
template <class T>
void backward_topk(const T* grad_out, const T* centered, const T* values,
                   const LatentIndex* indices, Index batch, Index k, const T* W_enc_t,
                   const T* W_dec, Index n_latents, Index d_in, Index d_out, Activation act,
                   bool project_decoder_grad, int n_threads, T* grad_W_enc_t, T* grad_b_enc,
                   T* grad_W_dec, T* grad_b_dec, bool accumulate = false,
                   const T* selected_pre = nullptr, const T* grad_values = nullptr,
                   T* grad_values_out = nullptr, const FusedAdam<T>* adam = nullptr) {
  using RowVec = Eigen::Matrix<T, 1, Eigen::Dynamic>;
  using ConstRow = Eigen::Map<const RowVec>;
  using Row = Eigen::Map<RowVec>;
  const double work = double(batch) * double(k) * double(d_in + d_out) / 2 +
                      double(n_latents) * double(d_in + d_out) / 2;
  const int nt = threads_for(n_threads, work, 1 << 16);
  const Index count = batch * k;
  std::vector<T> dpre(static_cast<size_t>(count));
  // grad_b_dec's W_enc_t term as partial sums over chunks of `chunk` latents (16, more for
  // dictionaries over 16384 latents: at most 1024 chunks). Each is formed by the thread that
  // owns (and updates) the chunk's rows while they are in its cache, and they are added up in
  // chunk order, the same for any thread count. The separate pass over W_enc_t this
  // replaces, split by columns, read half of every row from the other core: leaving it out
  // cut a 7 ms step at (256, 784, 1000, 25) by 1.35 ms where the two cores share no cache.
  // Left uninitialised: each chunk's owner zeroes it.
  const Index chunk = latent_chunk(n_latents);
  const Index n_chunks = grad_b_dec ? (n_latents + chunk - 1) / chunk : 0;
  std::unique_ptr<T[]> bias_partials(new T[static_cast<size_t>(n_chunks * d_in)]);
  LatentGroups groups;
  groups.build(indices, batch, k, n_latents);
  // Latents go through each pass in blocks of `block`: first every gradient row of the block,
  // then their updates (see the passes below). Per thread: the block's gradient rows (with
  // `adam`, or where a decoder row is formed apart from the one it adds to) and a zero row for
  // the latents that no row selected. Allocated here: no exception may leave the parallel
  // region.
  const Index width = std::max(d_in, d_out);
  const Index block = backward_block(width, Index(sizeof(T)));
  const Index per_thread = (block + 1) * width;
  const bool separate_decoder_row = accumulate && project_decoder_grad;
  std::unique_ptr<T[]> block_rows(adam || separate_decoder_row ? new T[static_cast<size_t>(nt * per_thread)]
                                                                : nullptr);
  std::unique_ptr<T[]> block_gb(new T[static_cast<size_t>(nt * block)]);
  // The encoder pass's units: whole chunks, at least a block.
  const Index unit = (block + chunk - 1) / chunk * chunk;
  std::unique_ptr<StealRange[]> shares(new StealRange[static_cast<size_t>(nt)]);

#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
    int tid = 0;
#ifdef KSAE_HAVE_OPENMP
    tid = omp_get_thread_num();
#endif
    T* formed = block_rows ? block_rows.get() + static_cast<size_t>(tid) * per_thread : nullptr;
    T* zero = formed ? formed + block * width : nullptr;  // the gradient of unselected latents
    if (zero) std::fill(zero, zero + width, T(0));
    T* gbs = block_gb.get() + static_cast<size_t>(tid) * block;
    // Each thread owns a fixed range of latents, the encode's (up to 16384 latents; at most
    // half a chunk off it above): the parameter and moment rows a thread updates are the rows
    // it multiplied, so they stay in its core's caches from step to step. Where two cores
    // share no cache (one L3 per CCD), a dynamic schedule handed rows from core to core and
    // cost 0.15 ms of a 7 ms step at (256, 784, 1000, 25). The ranges start on chunk
    // boundaries, so each chunk's partial sum is formed by one thread. (The encoder pass hands
    // the end of a range to a thread that has finished its own: see below.)
    Index j_begin, j_end;
    this_thread_range(n_latents, &j_begin, &j_end, chunk);
    int team = 1;
#ifdef KSAE_HAVE_OPENMP
    team = omp_get_num_threads();
#endif
    StealRange& mine = shares[static_cast<size_t>(tid)];
    // Published by the release store of decoder_done below, before any other thread reads it.
    mine.state.store(std::uint64_t((j_end - j_begin + unit - 1) / unit), std::memory_order_relaxed);
    // Two passes over the range, the decoder's rows and then the encoder's (forming both rows
    // of a latent together streamed grad_out's and centered's rows, and both sets of parameter
    // and moment rows, through the caches at once). Each pass takes `block` latents at a time:
    // it forms their gradient rows, reading the rows of grad_out (or centered) they select,
    // and then updates their parameters. Applying each latent's update at once streamed its
    // parameter and moment rows through L2 between two reads of the same grad_out row, which
    // then came from L3 again. Each latent's arithmetic is the same either way (bitwise the
    // same results). Measured in one process (C++ harness, 2 threads, the two versions
    // alternated every 40 steps): backward_adam 1.22 -> 1.10 and 1.27 -> 1.11 ms at
    // (256, 784, 1000, 25) where the cores share an L3, 2.70 -> 2.54 ms where they do not;
    // 23.9 -> 23.1 ms at (1024, 768, 16384, 32).
    //
    // A decoder row is formed apart from grad_W_dec with `adam` (in the block's rows), and
    // when accumulating with projection: this call's row is then formed and projected on its
    // own, so a buffer's earlier content is added to, never projected again. With accumulate
    // and no projection, the row starts from (and so adds to) what grad_W_dec holds.
    const bool apart = adam || separate_decoder_row;
    for (Index jb = j_begin; jb < j_end; jb += block) {
      const Index je = std::min(j_end, jb + block);
      for (Index j = jb; j < je; ++j) {
        // Ask for the latent's decoder row in a state it can be written in while the block's
        // gradients are formed: another core's decode may hold a copy (every core's did when
        // the decode was split by rows; on more than two threads some still do). Where the
        // cores share no cache this cut the (256, 784, 1000, 25) backward from 2.97 to 2.54 ms
        // with the decode split by rows.
        if (adam) prefetch_row_for_write(adam->W_dec + j * d_out, d_out);
        const Index begin = groups.offsets[j], end = groups.offsets[j + 1];
        if (begin == end) continue;
        const Index* entries = groups.entries.data() + begin;
        const Index* rows = groups.rows.data() + begin;
        // The decoder products of the latent's entries, from its row before the update, and
        // (but for softmax, whose derivative needs the whole row: below) their dpre.
        ConstRow w(W_dec + j * d_out, d_out);
        for (Index e = 0; e < end - begin; ++e) {
          const Index p = entries[e];
          T dp = ConstRow(grad_out + rows[e] * d_out, d_out).dot(w);
          if (grad_values) dp += grad_values[p];
          if (act != Activation::softmax) {
            if (grad_values_out) grad_values_out[p] = dp;
            dp *= activation_derivative(act, values[p], selected_pre ? selected_pre[p] : T(0));
          }
          dpre[p] = dp;
        }
        T* out = apart ? formed + (j - jb) * width : grad_W_dec + j * d_out;
        weighted_row_sum(out, d_out, end - begin, [&](Index e) {
          return std::make_pair(values[entries[e]], grad_out + rows[e] * d_out);
        }, accumulate && !apart ? out : nullptr);
      }
      for (Index j = jb; j < je; ++j) {
        // grad_W_dec's row (empty where grad_W_dec is null, as it may be with adam).
        Row gd(grad_W_dec ? grad_W_dec + j * d_out : nullptr, grad_W_dec ? d_out : 0);
        if (groups.offsets[j] == groups.offsets[j + 1]) {
          if (adam) {
            adam->update_decoder(j, zero, d_out);
          } else if (!accumulate) {
            gd.setZero();
          }
          continue;
        }
        T* row = apart ? formed + (j - jb) * width : gd.data();
        if (project_decoder_grad) {
          Row part(row, d_out);
          ConstRow w(W_dec + j * d_out, d_out);
          const T ww = w.squaredNorm();
          if (ww > T(0)) part.noalias() -= (part.dot(w) / ww) * w;
          if (separate_decoder_row) gd.noalias() += part;
        }
        if (adam) adam->update_decoder(j, row, d_out);
      }
    }
    mine.decoder_done.store(true, std::memory_order_release);
    // Softmax's dpre mixes a row's k entries, which other threads' latents hold: after every
    // product is formed, each row's dpre from its k products. (Every other activation's dpre
    // is formed above, by the thread whose encoder pass reads it: no barrier.)
    if (act == Activation::softmax) {
#pragma omp barrier
#pragma omp for schedule(static)
      for (Index r = 0; r < batch; ++r) {  // d a_s / d x_t = a_s (delta_st - a_t)
        T* dp = dpre.data() + r * k;
        const T* a = values + r * k;
        if (grad_values_out) std::copy(dp, dp + k, grad_values_out + r * k);
        T weighted = T(0);
        for (Index s = 0; s < k; ++s) weighted += a[s] * dp[s];
        for (Index s = 0; s < k; ++s) dp[s] = a[s] * (dp[s] - weighted);
      }
      // implicit barrier: dpre is complete.
    }
    // The encoder pass over latents [lo, hi) (whole chunks), in blocks as the decoder pass.
    auto encoder_pass = [&](Index lo, Index hi) {
      for (Index jb = lo; jb < hi; jb += block) {
        const Index je = std::min(hi, jb + block);
        for (Index j = jb; j < je; ++j) {
          const Index begin = groups.offsets[j], end = groups.offsets[j + 1];
          if (begin == end) {
            if (!accumulate) grad_b_enc[j] = T(0);
            continue;
          }
          const Index* entries = groups.entries.data() + begin;
          const Index* rows = groups.rows.data() + begin;
          const Index count = end - begin;
          T gb = T(0);
          for (Index e = 0; e < count; ++e) gb += dpre[entries[e]];
          gbs[j - jb] = gb;
          grad_b_enc[j] = accumulate ? grad_b_enc[j] + gb : gb;
          T* out = adam ? formed + (j - jb) * width : grad_W_enc_t + j * d_in;
          weighted_row_sum(out, d_in, count, [&](Index e) {
            return std::make_pair(dpre[entries[e]], centered + rows[e] * d_in);
          }, accumulate ? out : nullptr);
        }
        for (Index j = jb; j < je; ++j) {
          T* partial = grad_b_dec ? bias_partials.get() + (j / chunk) * d_in : nullptr;
          if (partial && j % chunk == 0) std::fill(partial, partial + d_in, T(0));
          if (groups.offsets[j] == groups.offsets[j + 1]) {
            if (adam) {
              adam->update_encoder(j, zero, grad_b_enc, d_in);
            } else if (!accumulate) {
              Row(grad_W_enc_t + j * d_in, d_in).setZero();
            }
            continue;
          }
          // grad_b_dec's term of this latent, read from W_enc_t's row before its update.
          if (partial) Row(partial, d_in).noalias() += gbs[j - jb] * ConstRow(W_enc_t + j * d_in, d_in);
          // The row's gradient is complete: update the latent's encoder parameters.
          if (adam) adam->update_encoder(j, formed + (j - jb) * width, grad_b_enc, d_in);
        }
      }
    };
    // The encoder pass, unit by unit: first the thread's own units from the front, then, once
    // they are taken, other threads' units from the back (after their decoder passes). The
    // static ranges keep each latent's rows on the core that multiplied them, but the cores'
    // speeds vary from step to step on a shared host: in the step harness at
    // (256, 784, 1000, 25), 2 threads, one thread reached the barrier below a median 0.15 ms
    // after the other (either one; the gap's 10th-90th percentiles -0.38 to +0.08 ms), and
    // the gap did not follow their shares of the selected entries (3178 +- 38 of 6400).
    // Results are bitwise the same whoever takes a unit: a unit is whole chunks, so each
    // partial sum of grad_b_dec is still formed by one thread in latent order, and every
    // other output is per latent.
    for (Index u; (u = mine.take_front()) >= 0;) {
      encoder_pass(j_begin + u * unit, std::min(j_end, j_begin + (u + 1) * unit));
    }
    SpinWait wait;
    for (bool waiting = team > 1; waiting;) {
      waiting = false;
      for (int o = 1; o < team; ++o) {
        const int other = (tid + o) % team;
        StealRange& theirs = shares[static_cast<size_t>(other)];
        if (!theirs.decoder_done.load(std::memory_order_acquire)) {
          waiting = true;  // its units are not ready to be taken yet
          continue;
        }
        Index lo, hi;
        split_range(n_latents, team, other, &lo, &hi, chunk);
        for (Index u; (u = theirs.take_back()) >= 0;) {
          encoder_pass(lo + u * unit, std::min(hi, lo + (u + 1) * unit));
        }
      }
      if (waiting) wait();
    }

    // grad_b_dec (d_out == d_in), split by feature columns so each thread owns its outputs:
    // the column sums of grad_out less the chunks' terms, added in chunk order.
    if (grad_b_dec) {
#pragma omp barrier
      Index c0 = 0, c1 = 0;
      this_thread_range(d_in, &c0, &c1, 16);
      if (c1 > c0) {
        const Index w = c1 - c0;
        Row acc(grad_b_dec + c0, w);
        if (!accumulate) acc.setZero();
        for (Index r = 0; r < batch; ++r) acc.noalias() += ConstRow(grad_out + r * d_out + c0, w);
        for (Index c = 0; c < n_chunks; ++c) {
          acc.noalias() -= ConstRow(bias_partials.get() + c * d_in + c0, w);
        }
        if (adam) adam->coefficients.apply(adam->b_dec, grad_b_dec, adam->m[3], adam->v[3], c0, c1);
      }
    }
  }
}

}  // namespace ksae
