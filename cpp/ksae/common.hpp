// Shared types and helpers for the ksae kernels: plain C++17 + Eigen, no bindings here.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>

#ifdef KSAE_HAVE_OPENMP
#include <omp.h>
#endif
#if defined(__SSE2__) || defined(_M_X64)
#include <immintrin.h>
#define KSAE_HAVE_MXCSR 1
#endif

namespace ksae {

using Index = std::ptrdiff_t;
using LatentIndex = std::int64_t;  // dtype of the indices handed to Python (numpy int64)

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MatrixMap = Eigen::Map<RowMatrix<T>>;
template <class T>
using ConstMatrixMap = Eigen::Map<const RowMatrix<T>>;
template <class T>
using StridedMatrixMap = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;

// Encoder activations. Every one of these is monotone non-decreasing, so the top-k is chosen
// on the pre-activations and the activation is evaluated on the k kept values only.
enum class Activation : int { relu = 0, linear = 1, sigmoid = 2, tanh = 3 };

inline bool has_openmp() {
#ifdef KSAE_HAVE_OPENMP
  return true;
#else
  return false;
#endif
}

// Within its scope the calling thread flushes subnormal floats to zero (FTZ and DAZ); the
// previous mode is restored on exit, so Python and NumPy never see the change. Adam moments
// of latents that stop firing decay geometrically into the subnormal range after a few
// hundred steps, and arithmetic on subnormals is microcoded: measured, the small benchmark
// step went from 4.5 to 8 ms after ~200 steps without this. Every kernel thread opens one.
class FlushSubnormals {
 public:
#ifdef KSAE_HAVE_MXCSR
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }  // FTZ | DAZ
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// Threads a kernel will use: n_threads <= 0 means "all the OpenMP runtime offers".
inline int resolve_threads(int n_threads) {
#ifdef KSAE_HAVE_OPENMP
  return n_threads > 0 ? n_threads : omp_get_max_threads();
#else
  (void)n_threads;
  return 1;
#endif
}

template <class T>
inline T activate(Activation act, T x) {
  switch (act) {
    case Activation::relu: return x > T(0) ? x : T(0);
    case Activation::linear: return x;
    case Activation::sigmoid: return T(1) / (T(1) + std::exp(-x));
    case Activation::tanh: return std::tanh(x);
  }
  return x;
}

// d act / d pre, written in terms of the activation's output a = act(pre).
template <class T>
inline T activation_derivative(Activation act, T a) {
  switch (act) {
    case Activation::relu: return a > T(0) ? T(1) : T(0);
    case Activation::linear: return T(1);
    case Activation::sigmoid: return a * (T(1) - a);
    case Activation::tanh: return T(1) - a * a;
  }
  return T(1);
}

// out[0:d] = init[0:d] (or 0 when init is null) + sum_e coef_e * row_e[0:d], where
// term(e) returns {coef_e, row_e}. The sum runs over 32-wide column chunks held in
// registers across all the terms, so the accumulator is stored once instead of once per term
// (a row-at-a-time axpy is bound by those loads and stores).
template <class T, class Term>
inline void weighted_row_sum(T* out, Index d, Index count, Term term, const T* init) {
  constexpr Index kChunk = 32;
  using Chunk = Eigen::Array<T, 1, kChunk>;
  Index c0 = 0;
  for (; c0 + kChunk <= d; c0 += kChunk) {
    Chunk acc = init ? Chunk(Eigen::Map<const Chunk>(init + c0)) : Chunk::Zero();
    for (Index e = 0; e < count; ++e) {
      const auto [coef, row] = term(e);
      acc += coef * Eigen::Map<const Chunk>(row + c0);
    }
    Eigen::Map<Chunk>(out + c0) = acc;
  }
  for (Index c = c0; c < d; ++c) {
    T acc = init ? init[c] : T(0);
    for (Index e = 0; e < count; ++e) {
      const auto [coef, row] = term(e);
      acc += coef * row[c];
    }
    out[c] = acc;
  }
}

// Split [0, n) into `parts` contiguous ranges; part p is [begin, end).
inline void split_range(Index n, int parts, int p, Index* begin, Index* end, Index align = 1) {
  Index chunk = (n + parts - 1) / parts;
  chunk = (chunk + align - 1) / align * align;
  *begin = std::min<Index>(n, chunk * p);
  *end = std::min<Index>(n, *begin + chunk);
}

}  // namespace ksae
