// The training loop's passes over its rows (batch gathers, data statistics) and its firing
// counts: plain C++17, no bindings here.
#pragma once

#include "common.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

namespace ksae {

// out[i, :] = X[rows[i], :] for i < m: the rows of an (n x d) C-contiguous X that a shuffled
// batch takes (every rows[i] in [0, n), checked by the caller), each thread copying a
// contiguous range of output rows. The rows lie scattered over a dataset far larger than the
// caches, so a copy waits on memory; two threads keep twice the rows in flight. (NumPy's
// X[rows] took 92-107 us for 256 rows of 784 floats, one thread 96-103 us, two 49-53 us;
// asking for the rows 4 or 8 ahead with prefetches bought nothing.)
template <class T>
void take_rows(const T* X, Index d, const LatentIndex* rows, Index m, int n_threads, T* out) {
  const int nt = threads_for(n_threads, double(m) * double(d), double(1 << 15));
#pragma omp parallel for num_threads(nt) schedule(static)
  for (Index i = 0; i < m; ++i) {
    std::memcpy(out + i * d, X + rows[i] * d, sizeof(T) * size_t(d));
  }
}

// The column sums of an (n x d) C-contiguous X into sums[0:d] and the sum of all its
// squares (returned), in double, in one pass over X: fit's total variance is the squares less
// n |mean|^2. NumPy's X.mean(axis=0, dtype=float64) alone took 21-23 ms of 51200 x 784
// float32 rows, one thread converting each block to float64. Rows are summed in fixed chunks
// of kRows, each by one thread, and the chunks added in order, so the results are bitwise the
// same for any thread count.
template <class T>
double sums_and_squares(const T* X, Index n, Index d, int n_threads, double* sums) {
  constexpr Index kRows = 1024;
  const Index n_chunks = (n + kRows - 1) / kRows;
  // Per chunk: d column sums, then d column sums of squares.
  std::vector<double> partial(static_cast<size_t>(n_chunks * 2 * d), 0.0);
  double* out = partial.data();
  const int nt = threads_for(n_threads, double(n) * double(d), double(1 << 16));
#pragma omp parallel for num_threads(nt) schedule(static)
  for (Index c = 0; c < n_chunks; ++c) {
    double* __restrict acc = out + c * 2 * d;
    double* __restrict acc2 = acc + d;
    for (Index i = c * kRows; i < std::min(n, (c + 1) * kRows); ++i) {
      const T* __restrict row = X + i * d;
      for (Index j = 0; j < d; ++j) {
        const double v = double(row[j]);
        acc[j] += v;
        acc2[j] += v * v;
      }
    }
  }
  std::fill(sums, sums + d, 0.0);
  double squares = 0.0;
  for (Index c = 0; c < n_chunks; ++c) {
    const double* acc = out + c * 2 * d;
    for (Index j = 0; j < d; ++j) {
      sums[j] += acc[j];
      squares += acc[d + j];
    }
  }
  return squares;
}

// mark_fired's update, on checked arrays: counts (n) grow by n_samples, then the latent of
// each of the `entries` code entries whose value is above `bar` (non-zero without a
// threshold) is set to 0.
template <class T>
void advance_counts(LatentIndex* counts, Index n, const T* values, const LatentIndex* indices,
                    Index entries, Index n_samples, bool threshold, T bar) {
  for (Index j = 0; j < n; ++j) counts[j] += n_samples;
  for (Index p = 0; p < entries; ++p) {
    if (threshold ? values[p] > bar : values[p] != T(0)) counts[indices[p]] = 0;
  }
}

}  // namespace ksae
