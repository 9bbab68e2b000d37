// Fused optimizer updates: one pass over parameter, gradient and state, memory-bound.
#pragma once

#include "common.hpp"

namespace ksae {

// Runs fn(begin, end, row) over a (rows x cols) array in parallel: one row at a time when
// `by_row` (so a row can be finished, e.g. renormalised, while it is in cache), otherwise in
// equal flat slices.
template <class F>
void for_each_span(Index rows, Index cols, bool by_row, int n_threads, F fn) {
  const int nt = resolve_threads(n_threads);
  if (by_row) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (Index r = 0; r < rows; ++r) fn(r * cols, (r + 1) * cols, true);
  } else {
    const Index total = rows * cols;
#pragma omp parallel num_threads(nt)
    {
      int tid = 0, nth = 1;
#ifdef KSAE_HAVE_OPENMP
      tid = omp_get_thread_num();
      nth = omp_get_num_threads();
#endif
      Index b, e;
      split_range(total, nth, tid, &b, &e, 64);
      if (e > b) fn(b, e, false);
    }
  }
}

// Scales param[begin:end] to unit Euclidean norm (left alone if it is all zeros).
template <class T>
inline void normalize_span(T* param, Index begin, Index end) {
  T ss = T(0);
  for (Index i = begin; i < end; ++i) ss += param[i] * param[i];
  if (ss > T(0)) {
    const T inv = T(1) / std::sqrt(ss);
    for (Index i = begin; i < end; ++i) param[i] *= inv;
  }
}

struct AdamSettings {
  double lr, beta1, beta2, eps, weight_decay;  // weight_decay is decoupled (AdamW)
  long long step;                              // 1 on the first update
};

// Adam (PyTorch's formulation), in place:
//     m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
//     p = p*(1 - lr*wd) - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
// With unit_norm_rows, each row of p is then rescaled to unit norm.
template <class T>
void adam_update(T* param, const T* grad, T* m, T* v, Index rows, Index cols,
                 const AdamSettings& s, bool unit_norm_rows, int n_threads) {
  const T b1 = T(s.beta1), b2 = T(s.beta2), eps = T(s.eps);
  const T step_size = T(s.lr / (1.0 - std::pow(s.beta1, double(s.step))));
  const T inv_sqrt_bc2 = T(1.0 / std::sqrt(1.0 - std::pow(s.beta2, double(s.step))));
  const T decay = T(1.0 - s.lr * s.weight_decay);
  for_each_span(rows, cols, unit_norm_rows, n_threads, [&](Index begin, Index end, bool row) {
    for (Index i = begin; i < end; ++i) {
      const T g = grad[i];
      const T mi = b1 * m[i] + (T(1) - b1) * g;
      const T vi = b2 * v[i] + (T(1) - b2) * g * g;
      m[i] = mi;
      v[i] = vi;
      param[i] = param[i] * decay - step_size * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
    }
    if (row) normalize_span(param, begin, end);
  });
}

struct SgdSettings {
  double lr, momentum, weight_decay;  // weight_decay is added to the gradient (L2), as in torch
  bool nesterov;
};

// SGD with optional (Nesterov) momentum, PyTorch's formulation, in place:
//     g' = g + wd*p;  buf = momentum*buf + g';  d = nesterov ? g' + momentum*buf : buf
//     p  = p - lr*d                     (buf may be null when momentum == 0: d = g')
template <class T>
void sgd_update(T* param, const T* grad, T* buf, Index rows, Index cols, const SgdSettings& s,
                bool unit_norm_rows, int n_threads) {
  const T lr = T(s.lr), mu = T(s.momentum), wd = T(s.weight_decay);
  const bool use_buf = buf != nullptr && s.momentum != 0.0;
  for_each_span(rows, cols, unit_norm_rows, n_threads, [&](Index begin, Index end, bool row) {
    for (Index i = begin; i < end; ++i) {
      T d = grad[i] + wd * param[i];
      if (use_buf) {
        const T b = mu * buf[i] + d;
        buf[i] = b;
        d = s.nesterov ? d + mu * b : b;
      }
      param[i] -= lr * d;
    }
    if (row) normalize_span(param, begin, end);
  });
}

}  // namespace ksae
