// Row gathers for the training loop's batches: plain C++17, no bindings here.
#pragma once

#include "common.hpp"

#include <cstring>

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

}  // namespace ksae
