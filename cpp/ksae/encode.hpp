// Forward pass of a TopK autoencoder: the one dense product, the selection and the sparse decode.
// The product's tiles are in encode_tiles.hpp, the selection in encode_select.hpp.
#pragma once

#include "common.hpp"
#include "encode_select.hpp"
#include "encode_tiles.hpp"

#include <atomic>
#include <memory>
#include <vector>

namespace ksae {

template <class T>
void encode_topk_fused(const T* X, Index batch, Index d_in, const T* W_enc_t, const T* b_enc,
                       const T* b_dec, Index n_latents, Index k, Activation act, int n_threads,
                       T* centered, T* values, LatentIndex* indices, T* selected_pre);

// Encodes a batch and keeps the k largest pre-activations per row:
//     centered = X - b_dec                                       (batch x d_in)
//     pre      = centered @ W_enc + b_enc                       (batch x n_latents)
//     indices  = stable_argsort(-pre, axis=1)[:, :k]           (batch x k)
//     values   = act(take_along_axis(pre, indices, axis=1))     (batch x k)
// W_enc is held transposed (W_enc_t, n_latents x d_in, row-major) so that a latent's encoder
// weights are one contiguous row, as its decoder weights are in W_dec.
// `centered` (batch x d_in) is an output kept for the backward pass. `pre` (batch x n_latents)
// may be null: then the selection is fused with the product (see encode_topk_fused) and no
// batch x n_latents array exists; otherwise it receives the pre-activations without b_enc
// (AuxK selects from them again) and the rows are selected from it afterwards. Both give
// bitwise the same result. `selected_pre` (batch x k, may be null) receives the kept
// pre-activations, which swish's and gelu's derivatives need.
// The selection is on act(pre) (see Activation); softmax normalises each row's k values.
template <class T>
void encode_topk(const T* X, Index batch, Index d_in, const T* W_enc_t, const T* b_enc,
                 const T* b_dec, Index n_latents, Index k, Activation act, int n_threads,
                 T* centered, T* pre, T* values, LatentIndex* indices, T* selected_pre = nullptr) {
  if (pre == nullptr) {
    return encode_topk_fused(X, batch, d_in, W_enc_t, b_enc, b_dec, n_latents, k, act, n_threads,
                             centered, values, indices, selected_pre);
  }
  const int nt = threads_for(n_threads, double(batch) * double(n_latents) * double(d_in), 1 << 20);
  const Index tile = tile_latents<T>(batch);
  TileProduct<T> product(batch, d_in, std::min(n_latents, tile + kTileStep - 1), nt);
#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
    int tid = 0;
#ifdef KSAE_HAVE_OPENMP
    tid = omp_get_thread_num();
#endif
    product.center_and_pack(X, b_dec, centered);
#pragma omp barrier
    // The dense product, split by latent columns: each thread multiplies all rows by its own
    // slice of W_enc, so the large operand is read (and packed) once in all.
    Index c0, c1;
    this_thread_range(n_latents, &c0, &c1, kLatentAlign);
    for_each_tile(c0, c1, tile, [&](Index j0, Index j1) {
      product.multiply(W_enc_t, j0, j1, pre + j0, n_latents, tid);
    });
#pragma omp barrier
    select_rows(pre, b_enc, batch, n_latents, k, act, values, indices, selected_pre);
  }
}

// encode_topk without the pre-activation matrix. Each thread walks its latent range in tiles
// (tile_latents: ~1 MiB of products, in cache, for batches up to ~1000 rows), multiplies a tile into its own buffer and
// folds every row of it into that row's running candidates (fold_tile_row). Then the rows
// are merged in groups of kMergeRows, claimed in order by whichever thread is free, each
// group as soon as every thread has folded its rows for the last time: each row's
// candidates from all threads are cut to the k best and sorted, exactly as select_topk_row
// orders them. (With a barrier before the merge instead, the thread that finished its walk
// first waited there, a median 0.1 ms at (256, 784, 1000, 25) on 2 threads; merging behind
// the other's fold made that encode 0.03-0.08 ms faster, measured in one process against
// the barrier, old and new alternated every 40 steps.) The product tiles are those of the
// materialising encode, so the two agree bitwise. Scratch: per thread one tile (batch x
// (tile + kTileStep - 1)) and batch x capacity candidates, capacity = 2k + 16 (at most
// n_latents).
template <class T>
void encode_topk_fused(const T* X, Index batch, Index d_in, const T* W_enc_t, const T* b_enc,
                       const T* b_dec, Index n_latents, Index k, Activation act, int n_threads,
                       T* centered, T* values, LatentIndex* indices, T* selected_pre) {
  const int nt = threads_for(n_threads, double(batch) * double(n_latents) * double(d_in), 1 << 20);
  const Index tile = tile_latents<T>(batch);
  // Sized for any split (the runtime may start fewer threads than asked for).
  const Index tile_width = std::min(n_latents, tile + kTileStep - 1);
  const Index capacity = std::min(2 * k + 16, n_latents);
  // Allocated here: no exception may leave the parallel region. Left uninitialised (every
  // entry is written before it is read): zeroing megabytes per call showed at small shapes.
  std::unique_ptr<T[]> tiles(new T[static_cast<size_t>(nt) * batch * tile_width]);
  std::unique_ptr<KeptEntry<T>[]> kept(new KeptEntry<T>[static_cast<size_t>(nt) * batch * capacity]);
  std::unique_ptr<T[]> bounds(new T[static_cast<size_t>(nt) * tile_width]);  // fold_tile_row's scratch
  std::vector<RowCandidates<T>> rows(static_cast<size_t>(nt) * batch);
  TileProduct<T> product(batch, d_in, tile_width, nt);
  for (size_t i = 0; i < rows.size(); ++i) {
    rows[i] = {kept.get() + i * capacity, 0, T(0), false};
  }
  // Rows of the batch each thread has folded for the last time (published with release), and
  // the next row group of the merge to be claimed.
  std::unique_ptr<std::atomic<Index>[]> folded(new std::atomic<Index>[static_cast<size_t>(nt)]);
  for (int t = 0; t < nt; ++t) folded[t].store(0, std::memory_order_relaxed);
  std::atomic<Index> next_rows{0};
  int team = 1;
#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
    int tid = 0;
#ifdef KSAE_HAVE_OPENMP
    tid = omp_get_thread_num();
#pragma omp single
    team = omp_get_num_threads();
#endif
    product.center_and_pack(X, b_dec, centered);
#pragma omp barrier
    Index c0, c1;
    this_thread_range(n_latents, &c0, &c1, kLatentAlign);
    T* buffer = tiles.get() + static_cast<size_t>(tid) * batch * tile_width;
    RowCandidates<T>* mine = rows.data() + static_cast<size_t>(tid) * batch;
    T* scratch = bounds.get() + static_cast<size_t>(tid) * tile_width;
    auto walk = [&](auto key) {
      for_each_tile(c0, c1, tile, [&](Index j0, Index j1) {
        const Index width = j1 - j0;
        product.multiply(W_enc_t, j0, j1, buffer, width, tid);
        const bool last = j1 == c1;
        for (Index r = 0; r < batch; ++r) {
          fold_tile_row(buffer + r * width, b_enc + j0, width, j0, k, capacity, key, mine[r],
                        scratch, last);
          if (last && (r % kMergeRows == kMergeRows - 1 || r == batch - 1)) {
            folded[tid].store(r + 1, std::memory_order_release);
          }
        }
      });
    };
    with_selection_key<T>(act, walk);
    if (c0 == c1) folded[tid].store(batch, std::memory_order_release);  // no latents: no tiles
    MergeScratch<T> merge(k);
    // The merge, in groups of kMergeRows rows claimed in order by whichever thread is free;
    // a group waits until every thread has folded its rows, so a thread that finished its
    // walk early merges behind the others' folds instead of waiting at a barrier.
    Index ready = 0;  // rows every thread has folded, as last seen
    SpinWait wait;
    for (;;) {
      const Index r0 = next_rows.fetch_add(kMergeRows, std::memory_order_relaxed);
      if (r0 >= batch) break;
      const Index r1 = std::min(batch, r0 + kMergeRows);
      while (ready < r1) {
        Index least = batch;
        for (int t = 0; t < team; ++t) least = std::min(least, folded[t].load(std::memory_order_acquire));
        ready = least;
        if (ready < r1) wait();
      }
      for (Index r = r0; r < r1; ++r) {
        merge_row_candidates(rows.data(), team, batch, r, k, act, merge, values, indices,
                             selected_pre);
      }
    }
  }
}

// The terms of one decoded row whose latents lie in one of the decode's two fixed groups
// (group 0: latents below `split`, group 1: the rest):
//     out = init + sum of v[s] * W_dec[idx[s]] over those slots s, in slot order
// (init null: zeros; d values each). `slots` holds k indices.
template <class T>
inline void decode_group(const T* v, const LatentIndex* idx, Index k, const T* W_dec,
                         const T* init, Index d, Index split, int group, Index* slots, T* out) {
  Index count = 0;
  for (Index s = 0; s < k; ++s) {
    if ((idx[s] >= split) == (group == 1)) slots[count++] = s;
  }
  weighted_row_sum(out, d, count, [&](Index e) {
    return std::make_pair(v[slots[e]], W_dec + idx[slots[e]] * d);
  }, init);
}

// One row of decode_sparse: out = (b_dec + group 0's terms) + group 1's terms, the second
// sum formed in `scratch` (d values; `slots` k indices).
template <class T>
inline void decode_row(const T* v, const LatentIndex* idx, Index k, const T* W_dec,
                       const T* b_dec, Index d, Index split, Index* slots, T* scratch, T* out) {
  using Row = Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>;
  using ConstRow = Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>;
  decode_group(v, idx, k, W_dec, b_dec, d, split, 0, slots, out);
  decode_group(v, idx, k, W_dec, static_cast<const T*>(nullptr), d, split, 1, slots, scratch);
  Row(out, d) += ConstRow(scratch, d);
}

// Decodes sparse codes: out[r] = b_dec + sum_s values[r, s] * W_dec[indices[r, s]], which
// equals dense(values, indices) @ W_dec + b_dec at batch*k*d_in cost. Indices must lie in
// [0, n_latents) (the binding checks).
//
// Each row is summed as two partial rows, one per fixed group of latents (decoder_split):
// S_0 = b_dec plus the terms of latents below the split, S_1 = the other terms, each in slot
// order, and out[r] = S_0 + S_1. decode_mse sums the same way, with the two groups on
// different threads, so that on two threads each core reads only the decoder rows that it
// updates in the backward; the split depends on n_latents alone, so the rounding never
// depends on the thread count.
template <class T>
void decode_sparse(const T* values, const LatentIndex* indices, Index batch, Index k,
                   const T* W_dec, const T* b_dec, Index d_in, Index n_latents, int n_threads,
                   T* out) {
  const int nt = threads_for(n_threads, double(batch) * double(k + 1) * double(d_in), 1 << 16);
  const Index split = decoder_split(n_latents);
  // Per thread: a partial row and the slots of a group. Allocated here: no exception may
  // leave the parallel region.
  std::unique_ptr<T[]> partial(new T[static_cast<size_t>(nt) * std::max<Index>(d_in, 1)]);
  std::unique_ptr<Index[]> slots(new Index[static_cast<size_t>(nt) * std::max<Index>(k, 1)]);
#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
    int tid = 0;
#ifdef KSAE_HAVE_OPENMP
    tid = omp_get_thread_num();
#endif
    T* scratch = partial.get() + static_cast<size_t>(tid) * std::max<Index>(d_in, 1);
    Index* sl = slots.get() + static_cast<size_t>(tid) * std::max<Index>(k, 1);
#pragma omp for schedule(static)
    for (Index r = 0; r < batch; ++r) {
      decode_row(values + r * k, indices + r * k, k, W_dec, b_dec, d_in, split, sl, scratch,
                 out + r * d_in);
    }
  }
}

// decode_sparse and the mean squared error against targets X (batch x d):
//     x_hat       = decode_sparse(values, indices, W_dec, b_dec)       (bitwise)
//     grad_out[r] = (x_hat[r] - X[r]) * T(2 / (batch * d))        (dL/dX_hat of the mean)
// and returns sum((x_hat - X)^2) / (batch * d), each row's sum in T, the rows' in double and
// in row order (the same for any thread count).
//
// On more than one thread the decode runs by latent group: the 2 * batch partial rows
// (group 0's of every row into grad_out, group 1's into a scratch batch x d) are shared out
// in order, so on two threads each thread forms one group's partial rows and reads only the
// decoder rows of that group, which are the rows it updates in the backward (backward_topk
// forms the decoder products there too). Then each row's two partial rows are added, the
// loss and gradient formed. When the row owner read every decoder row, the backward's
// update of a row had to take its lines from the other core's cache; where the two cores
// share no cache (one L3 per CCD) that was about 1 ms of a 6 ms step at
// (256, 784, 1000, 25). Measured in one process (C++ harness, 2 threads, the old and new
// kernels alternated every 40 steps): the far step 5.6-6.4 -> 4.5-5.4 ms (-15 to -19%), the
// near step 0.02-0.09 ms faster. One thread adds each row's partial rows at once.
template <class T>
double decode_mse(const T* values, const LatentIndex* indices, Index batch, Index k,
                  const T* W_dec, const T* b_dec, const T* X, Index d, Index n_latents,
                  int n_threads, T* grad_out) {
  using Row = Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>;
  using ConstRow = Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>;
  const int nt = threads_for(n_threads, double(batch) * double(k + 3) * double(d), 1 << 16);
  const T scale = T(2.0 / (double(batch) * double(d)));
  const Index split = decoder_split(n_latents);
  std::vector<double> row_sums(static_cast<size_t>(batch));
  // Group 1's partial rows: all of them on several threads, one per thread on one. Allocated
  // here: no exception may leave the parallel region.
  const Index partial_rows = nt > 1 ? batch : 1;
  std::unique_ptr<T[]> partial(new T[static_cast<size_t>(std::max<Index>(partial_rows * d, 1))]);
  std::unique_ptr<Index[]> slots(new Index[static_cast<size_t>(nt) * std::max<Index>(k, 1)]);
#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
    int tid = 0;
#ifdef KSAE_HAVE_OPENMP
    tid = omp_get_thread_num();
#endif
    Index* sl = slots.get() + static_cast<size_t>(tid) * std::max<Index>(k, 1);
    if (nt > 1) {
#pragma omp for schedule(static)
      for (Index u = 0; u < 2 * batch; ++u) {
        const int group = u < batch ? 0 : 1;
        const Index r = group == 0 ? u : u - batch;
        decode_group(values + r * k, indices + r * k, k, W_dec, group == 0 ? b_dec : nullptr, d,
                     split, group, sl, (group == 0 ? grad_out : partial.get()) + r * d);
      }
      // implicit barrier: every partial row is formed.
    }
#pragma omp for schedule(static)
    for (Index r = 0; r < batch; ++r) {
      T* g = grad_out + r * d;
      Row row(g, d);
      if (nt > 1) {
        row += ConstRow(partial.get() + r * d, d);
      } else {
        decode_row(values + r * k, indices + r * k, k, W_dec, b_dec, d, split, sl,
                   partial.get(), g);
      }
      row -= ConstRow(X + r * d, d);
      row_sums[r] = double(row.squaredNorm());  // a vectorised sum within the row
      row *= scale;
    }
  }
  double total = 0;
  for (const double v : row_sums) total += v;
  return total / (double(batch) * double(d));
}

}  // namespace ksae
