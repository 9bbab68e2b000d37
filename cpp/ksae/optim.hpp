// Fused optimizer updates: one pass over parameter, gradient and state, memory-bound.
#pragma once

#include "common.hpp"

#include <vector>

namespace ksae {

// Runs fn(begin, end, row) over a (rows x cols) array in parallel: one row at a time when
// `by_row` (so a row can be finished, e.g. renormalised, while it is in cache), otherwise in
// equal flat slices.
template <class F>
void for_each_span(Index rows, Index cols, bool by_row, int n_threads, F fn) {
  const int nt = threads_for(n_threads, double(rows) * double(cols), 1 << 15);
  if (by_row) {
#pragma omp parallel num_threads(nt)
    {
      FlushSubnormals flush;
#pragma omp for schedule(static)
      for (Index r = 0; r < rows; ++r) fn(r * cols, (r + 1) * cols, true);
    }
  } else {
    const Index total = rows * cols;
#pragma omp parallel num_threads(nt)
    {
      FlushSubnormals flush;
      Index b, e;
      this_thread_range(total, &b, &e, 64);
      if (e > b) fn(b, e, false);
    }
  }
}

// Scales param[begin:end] to unit Euclidean norm (left alone if it is all zeros).
template <class T>
inline void normalize_span(T* param, Index begin, Index end) {
  Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>> row(param + begin, end - begin);
  const T ss = row.squaredNorm();  // Eigen's reduction vectorises; a plain loop would not
  if (ss > T(0)) row *= T(1) / std::sqrt(ss);
}

struct AdamSettings {
  double lr, beta1, beta2, eps, weight_decay;  // weight_decay is decoupled (AdamW)
  long long step;                              // 1 on the first update
};

// Adam (PyTorch's formulation), in place:
//     m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
//     p = p*(1 - lr*wd) - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
// With unit_norm_rows, each row of p is then rescaled to unit norm.
// The elementwise Adam update of [begin, end). Raw restrict pointers (not lambda captures,
// which the compiler must assume alias the stores) let the loop vectorise.
// The (1 - beta) factors come in computed in double: 1 - float(0.999) in float32 is off by
// 1.3e-5 relative, which the second moment would carry.
template <class T>
inline void adam_span(T* __restrict param, const T* __restrict grad, T* __restrict m,
                      T* __restrict v, Index begin, Index end, T b1, T one_minus_b1, T b2,
                      T one_minus_b2, T eps, T step_size, T inv_sqrt_bc2, T decay) {
  for (Index i = begin; i < end; ++i) {
    const T g = grad[i];
    const T mi = b1 * m[i] + one_minus_b1 * g;
    const T vi = b2 * v[i] + one_minus_b2 * g * g;
    m[i] = mi;
    v[i] = vi;
    param[i] = param[i] * decay - step_size * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
  }
}

// The constants of one Adam update in the parameters' precision, computed once per step.
template <class T>
struct AdamCoefficients {
  T b1, one_minus_b1, b2, one_minus_b2, eps, step_size, inv_sqrt_bc2, decay;

  explicit AdamCoefficients(const AdamSettings& s)
      : b1(T(s.beta1)), one_minus_b1(T(1.0 - s.beta1)), b2(T(s.beta2)),
        one_minus_b2(T(1.0 - s.beta2)), eps(T(s.eps)),
        step_size(T(s.lr / (1.0 - std::pow(s.beta1, double(s.step))))),
        inv_sqrt_bc2(T(1.0 / std::sqrt(1.0 - std::pow(s.beta2, double(s.step))))),
        decay(T(1.0 - s.lr * s.weight_decay)) {}

  // adam_span of [begin, end) with these constants.
  void apply(T* param, const T* grad, T* m, T* v, Index begin, Index end) const {
    adam_span(param, grad, m, v, begin, end, b1, one_minus_b1, b2, one_minus_b2, eps,
              step_size, inv_sqrt_bc2, decay);
  }
};

//
// Lazy variant: with `only_rows` (n_only increasing row indices), only those rows are read
// and written; the others keep their parameters and moments as they are (no decay, no
// momentum step), as TensorFlow's LazyAdam does. A TopK step touches the rows of the latents
// its batch selected, so for a large dictionary this skips most of the memory traffic.
template <class T>
void adam_update(T* param, const T* grad, T* m, T* v, Index rows, Index cols,
                 const AdamSettings& s, bool unit_norm_rows, int n_threads,
                 const LatentIndex* only_rows = nullptr, Index n_only = 0) {
  const AdamCoefficients<T> c(s);
  auto update = [=](Index begin, Index end, bool row) {
    c.apply(param, grad, m, v, begin, end);
    if (row) normalize_span(param, begin, end);
  };
  if (only_rows == nullptr) {
    for_each_span(rows, cols, unit_norm_rows, n_threads, update);
    return;
  }
  const int nt = threads_for(n_threads, double(n_only) * double(cols), 1 << 15);
#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
#pragma omp for schedule(static)
    for (Index i = 0; i < n_only; ++i) {
      const Index r = Index(only_rows[i]);
      update(r * cols, (r + 1) * cols, unit_norm_rows);
    }
  }
}

struct SgdSettings {
  double lr, momentum, weight_decay;  // weight_decay is added to the gradient (L2), as in torch
  bool nesterov;
};

// SGD with optional (Nesterov) momentum, PyTorch's formulation, in place:
//     g' = g + wd*p;  buf = momentum*buf + g';  d = nesterov ? g' + momentum*buf : buf
//     p  = p - lr*d                     (buf may be null when momentum == 0: d = g')
template <class T>
inline void sgd_span(T* __restrict param, const T* __restrict grad, T* __restrict buf, Index begin,
                     Index end, T lr, T mu, T wd, bool nesterov) {
  if (buf == nullptr) {
    for (Index i = begin; i < end; ++i) param[i] -= lr * (grad[i] + wd * param[i]);
  } else if (nesterov) {
    for (Index i = begin; i < end; ++i) {
      const T d = grad[i] + wd * param[i];
      const T b = mu * buf[i] + d;
      buf[i] = b;
      param[i] -= lr * (d + mu * b);
    }
  } else {
    for (Index i = begin; i < end; ++i) {
      const T b = mu * buf[i] + grad[i] + wd * param[i];
      buf[i] = b;
      param[i] -= lr * b;
    }
  }
}

template <class T>
void sgd_update(T* param, const T* grad, T* buf, Index rows, Index cols, const SgdSettings& s,
                bool unit_norm_rows, int n_threads) {
  const T lr = T(s.lr), mu = T(s.momentum), wd = T(s.weight_decay);
  T* momentum = (buf != nullptr && s.momentum != 0.0) ? buf : nullptr;
  const bool nesterov = s.nesterov;
  for_each_span(rows, cols, unit_norm_rows, n_threads, [=](Index begin, Index end, bool row) {
    sgd_span(param, grad, momentum, begin, end, lr, mu, wd, nesterov);
    if (row) normalize_span(param, begin, end);
  });
}

struct RmspropSettings {
  double lr, alpha, eps, momentum, weight_decay;  // weight_decay is added to the gradient (L2)
};

// RMSprop (PyTorch's formulation, not centered), in place:
//     g' = g + wd*p;  sq = alpha*sq + (1-alpha)*g'^2;  avg = sqrt(sq) + eps
//     momentum > 0:  buf = momentum*buf + g'/avg;  p = p - lr*buf
//     otherwise:     p = p - lr*g'/avg          (buf may be null when momentum == 0)
template <class T>
inline void rmsprop_span(T* __restrict param, const T* __restrict grad, T* __restrict sq,
                         T* __restrict buf, Index begin, Index end, T lr, T alpha,
                         T one_minus_alpha, T eps, T mu, T wd) {
  if (buf == nullptr) {
    for (Index i = begin; i < end; ++i) {
      const T g = grad[i] + wd * param[i];
      const T s = alpha * sq[i] + one_minus_alpha * (g * g);
      sq[i] = s;
      param[i] -= lr * (g / (std::sqrt(s) + eps));
    }
  } else {
    for (Index i = begin; i < end; ++i) {
      const T g = grad[i] + wd * param[i];
      const T s = alpha * sq[i] + one_minus_alpha * (g * g);
      sq[i] = s;
      const T b = mu * buf[i] + g / (std::sqrt(s) + eps);
      buf[i] = b;
      param[i] -= lr * b;
    }
  }
}

template <class T>
void rmsprop_update(T* param, const T* grad, T* square_avg, T* buf, Index rows, Index cols,
                    const RmspropSettings& s, bool unit_norm_rows, int n_threads) {
  const T lr = T(s.lr), alpha = T(s.alpha), eps = T(s.eps), mu = T(s.momentum),
          wd = T(s.weight_decay), one_minus_alpha = T(1.0 - s.alpha);
  T* momentum = (buf != nullptr && s.momentum != 0.0) ? buf : nullptr;
  for_each_span(rows, cols, unit_norm_rows, n_threads, [=](Index begin, Index end, bool row) {
    rmsprop_span(param, grad, square_avg, momentum, begin, end, lr, alpha, one_minus_alpha, eps,
                 mu, wd);
    if (row) normalize_span(param, begin, end);
  });
}

// Elements per chunk of the squared-norm reduction. Fixed, so the chunks (and the order in
// which their sums are added) do not depend on the thread count.
constexpr Index kNormChunk = Index(1) << 14;

// sum(double(x[i])^2) over [0, n) in a fixed order: kLanes independent accumulators (each
// lane a separate sum, so the loop vectorises without reassociating anything), then the
// lanes added pairwise, then the tail.
template <class T>
inline double squared_norm_span(const T* __restrict x, Index n) {
  constexpr int kLanes = 8;
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  Index i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const double v = double(x[i + j]);
      acc[j] += v * v;
    }
  }
  double total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) {
    const double v = double(x[i]);
    total += v * v;
  }
  return total;
}

// Sum of squares of x[0:n], accumulated in double. Each fixed-size chunk is summed by one
// thread and the chunk sums are added in chunk order, so the result is bitwise the same for
// any thread count.
template <class T>
double squared_norm(const T* x, Index n, int n_threads) {
  const Index n_chunks = (n + kNormChunk - 1) / kNormChunk;
  if (n_chunks <= 1) {
    FlushSubnormals flush;
    return squared_norm_span(x, n);
  }
  std::vector<double> partial(static_cast<size_t>(n_chunks));
  double* out = partial.data();
  const int nt = threads_for(n_threads, double(n_chunks), 2);
#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
#pragma omp for schedule(static)
    for (Index c = 0; c < n_chunks; ++c) {
      const Index begin = c * kNormChunk;
      out[c] = squared_norm_span(x + begin, std::min(n, begin + kNormChunk) - begin);
    }
  }
  double total = 0.0;
  for (Index c = 0; c < n_chunks; ++c) total += partial[c];
  return total;
}

// Whether x[0:n] holds no NaN and no infinity: x * 0 is a zero for every finite value and NaN
// for the others, so the sum of those products (kLanes independent lanes, which vectorise) is
// zero exactly when every value is finite. One pass, no temporary array (NumPy's
// np.isfinite(x).all() writes and reads a bool per value: 20-30 us of a 256 x 784 float32
// batch, which partial_fit checks every step).
template <class T>
inline bool all_finite_span(const T* __restrict x, Index n) {
  constexpr int kLanes = 64 / int(sizeof(T));
  T acc[kLanes] = {};
  Index i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] * T(0);
  }
  T total = T(0);
  for (int j = 0; j < kLanes; ++j) total += acc[j];
  for (; i < n; ++i) total += x[i] * T(0);
  return total == T(0);
}

// all_finite_span over fixed-size chunks shared out among the threads.
template <class T>
bool all_finite(const T* x, Index n, int n_threads) {
  const Index n_chunks = (n + kNormChunk - 1) / kNormChunk;
  if (n_chunks <= 1) return all_finite_span(x, n);
  const int nt = threads_for(n_threads, double(n_chunks), 4);
  bool finite = true;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(&& : finite)
  for (Index c = 0; c < n_chunks; ++c) {
    const Index begin = c * kNormChunk;
    finite = all_finite_span(x + begin, std::min(n, begin + kNormChunk) - begin) && finite;
  }
  return finite;
}

}  // namespace ksae
