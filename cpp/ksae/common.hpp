// Shared types and helpers for the ksae kernels: plain C++17 + Eigen, no bindings here.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <thread>
#include <utility>

#ifdef KSAE_HAVE_OPENMP
#include <omp.h>
#endif
#if defined(__SSE2__) || defined(_M_X64)
#include <immintrin.h>
#define KSAE_HAVE_MXCSR 1
#endif

// Code on Eigen's packets (Eigen::internal) uses x86 vector types such as __m512 as template
// arguments, which drops their alignment attribute; GCC reports each use (Eigen's own kernels
// do the same). Wrap such code in these.
#if defined(__GNUC__) && !defined(__clang__)
#define KSAE_PACKET_CODE_BEGIN \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wignored-attributes\"")
#define KSAE_PACKET_CODE_END _Pragma("GCC diagnostic pop")
#else
#define KSAE_PACKET_CODE_BEGIN
#define KSAE_PACKET_CODE_END
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

// Encoder activations. The top-k is chosen on act(pre); for the monotone ones that is the
// top-k of pre itself (ties in act, e.g. relu's zeros, then go by pre), so the activation is
// evaluated on the k kept values only. swish and gelu are not monotone: their selection
// evaluates the activation on every entry. softmax keeps the k largest pre-activations and
// normalises over those k (TopK, then softmax), so each row's values sum to 1.
enum class Activation : int {
  relu = 0, linear = 1, sigmoid = 2, tanh = 3, leaky_relu = 4, elu = 5, swish = 6, gelu = 7,
  softmax = 8
};

constexpr double kLeakySlope = 0.01;

inline bool is_monotone(Activation act) {
  return act != Activation::swish && act != Activation::gelu;
}

// Whether activation_derivative needs the pre-activation x (not only the output a).
inline bool derivative_needs_pre(Activation act) {
  return act == Activation::swish || act == Activation::gelu;
}

template <class T>
inline T sigmoid_of(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// act(x) for every activation but softmax (a row operation, see normalize_softmax).
template <class T>
inline T activate(Activation act, T x) {
  switch (act) {
    case Activation::relu: return x > T(0) ? x : T(0);
    case Activation::linear: return x;
    case Activation::sigmoid: return sigmoid_of(x);
    case Activation::tanh: return std::tanh(x);
    case Activation::leaky_relu: return x > T(0) ? x : T(kLeakySlope) * x;
    case Activation::elu: return x > T(0) ? x : std::expm1(x);
    case Activation::swish: return x * sigmoid_of(x);
    case Activation::gelu: return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752440)));
    case Activation::softmax: return x;
  }
  return x;
}

// d act / d pre at pre-activation x with output a = act(x); x is only read for swish and gelu.
// (softmax couples a row and is handled by the backward kernel.)
template <class T>
inline T activation_derivative(Activation act, T a, T x) {
  switch (act) {
    case Activation::relu: return a > T(0) ? T(1) : T(0);
    case Activation::linear: return T(1);
    case Activation::sigmoid: return a * (T(1) - a);
    case Activation::tanh: return T(1) - a * a;
    case Activation::leaky_relu: return a > T(0) ? T(1) : T(kLeakySlope);
    case Activation::elu: return a > T(0) ? T(1) : a + T(1);
    case Activation::swish: {
      const T s = sigmoid_of(x);
      return s + x * s * (T(1) - s);
    }
    case Activation::gelu: {
      const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
      const T pdf = T(0.39894228040143267794) * std::exp(T(-0.5) * x * x);
      return cdf + x * pdf;
    }
    case Activation::softmax: return T(1);
  }
  return T(1);
}

// softmax over one row's k kept pre-activations, in place: values[s] = exp(x_s - max) / sum.
template <class T>
inline void normalize_softmax(T* values, Index k) {
  T top = values[0];
  for (Index s = 1; s < k; ++s) top = std::max(top, values[s]);
  T sum = T(0);
  for (Index s = 0; s < k; ++s) sum += (values[s] = std::exp(values[s] - top));
  for (Index s = 0; s < k; ++s) values[s] /= sum;
}

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

// Threads a kernel uses: exactly n_threads when the caller asks for a number (> 0);
// otherwise (the default) as many as are worth starting for `work` units when one thread
// should get at least `grain` of them, at most all the runtime offers. Waking threads for
// tiny kernels costs more than it saves, and on a loaded machine each extra thread of a short
// parallel region can stall the others at the barrier; measured: a 256-latent training run
// took 2.1 s instead of 0.8 s next to a busy process, and the test suite 95 s instead of 6 s.
// Depends only on the arguments, never on timing, so results stay reproducible.
inline int threads_for(int n_threads, double work, double grain) {
  const int nt = resolve_threads(n_threads);
  if (n_threads > 0) return nt;
  const double useful = work / grain;
  return useful >= nt ? nt : std::max(1, static_cast<int>(useful));
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

// Split [0, n) into `parts` contiguous ranges; part p is [begin, end). Each inner boundary is
// the multiple of `align` nearest to its even share, so the parts differ by at most about
// `align`: rounding every part up to a multiple of align instead gave the encode's two
// threads 512 and 488 of 1000 latents, and the second waited 0.14-0.25 ms of a 2.7 ms encode
// at the barrier.
inline void split_range(Index n, int parts, int p, Index* begin, Index* end, Index align = 1) {
  auto boundary = [&](int q) -> Index {
    if (q <= 0) return 0;
    if (q >= parts) return n;
    const Index share = (n * q + parts / 2) / parts;  // n * q / parts, rounded
    return std::min<Index>(n, (share + align / 2) / align * align);
  };
  *begin = boundary(p);
  *end = std::max(*begin, boundary(p + 1));
}

// Asks for every cache line of row[0:n] in a state it can be written in (PREFETCHW): a copy
// of a line in another core's cache is invalidated ahead of the store, which would otherwise
// wait for it. Between cores that share no cache (AMD CCDs) that wait is hundreds of
// nanoseconds a line. Built where the instruction set has PREFETCHW (KSAE_ARCH x86-64-v4
// adds -mprfchw); elsewhere a no-op: a read prefetch (prefetcht0) in its place bought nothing.
template <class T>
inline void prefetch_row_for_write(const T* row, Index n) {
#ifdef __PRFCHW__
  const char* bytes = reinterpret_cast<const char*>(row);
  for (Index b = 0; b < n * Index(sizeof(T)); b += 64) __builtin_prefetch(bytes + b, 1, 3);
#else
  (void)row;
  (void)n;
#endif
}

// A spin-wait's pause: lets the core's other hardware thread (if any) run, and saves power.
inline void cpu_relax() {
#if defined(KSAE_HAVE_MXCSR)
  _mm_pause();
#elif defined(__aarch64__) || defined(__arm__)
  __asm__ __volatile__("yield");
#endif
}

// The waiting step of a spin-wait on another thread of the team: a pause for the first
// kSpins calls (waits here are short: the other thread is running, a fraction of a
// millisecond behind), then a yield of the CPU. Without the yield, a team with more
// threads than free cores (n_threads above the core count, or another busy process) spun
// away whole scheduler slices while the thread it waited for could not run: at
// (256, 784, 1000, 25) with 8 threads on 2 cores the encode took 12.8 ms instead of 3.4.
class SpinWait {
 public:
  void operator()() {
    if (spins_ < kSpins) {
      ++spins_;
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }

 private:
  static constexpr int kSpins = 1000;
  int spins_ = 0;
};

// Threads split the latents into contiguous ranges that start at multiples of this; the
// backward's ranges are the encode's (up to 16384 latents), so each thread updates the rows
// it multiplied.
constexpr Index kLatentAlign = 16;

// The calling thread's share [begin, end) of [0, n) inside a parallel region (all of it
// outside one, or without OpenMP): for work each thread must own outright.
inline void this_thread_range(Index n, Index* begin, Index* end, Index align = 1) {
  int tid = 0, nth = 1;
#ifdef KSAE_HAVE_OPENMP
  tid = omp_get_thread_num();
  nth = omp_get_num_threads();
#endif
  split_range(n, nth, tid, begin, end, align);
}

// The backward's latents go to threads in chunks of this many (kLatentAlign, more for
// dictionaries over 16384 latents: at most 1024 chunks), so its ranges are the encode's up
// to 16384 latents and at most half a chunk off them beyond.
inline Index latent_chunk(Index n_latents) {
  return kLatentAlign * std::max<Index>(1, (n_latents + kLatentAlign * 1024 - 1) /
                                               (kLatentAlign * 1024));
}

// The first latent of the second of the decode's two fixed latent groups (see
// decode_sparse): where the backward on two threads splits its latents, so on two threads
// each decoder row is read, in the decode, by the core that updates it. The same for any
// thread count, so the decode's rounding never depends on it.
inline Index decoder_split(Index n_latents) {
  Index begin, end;
  split_range(n_latents, 2, 0, &begin, &end, latent_chunk(n_latents));
  return end;
}

}  // namespace ksae
