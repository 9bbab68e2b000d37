// Shared types and helpers for the ksae kernels: plain C++17 + Eigen, no bindings here.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#ifdef KSAE_HAVE_OPENMP
#include <omp.h>
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

// Split [0, n) into `parts` contiguous ranges; part p is [begin, end).
inline void split_range(Index n, int parts, int p, Index* begin, Index* end, Index align = 1) {
  Index chunk = (n + parts - 1) / parts;
  chunk = (chunk + align - 1) / align * align;
  *begin = std::min<Index>(n, chunk * p);
  *end = std::min<Index>(n, *begin + chunk);
}

}  // namespace ksae
