// Per-row top-k selection with deterministic tie-breaking.
#pragma once

#include "common.hpp"

#include <algorithm>
#include <vector>

namespace ksae {

template <class T>
struct Candidate {
  T key;  // the value compared; NaN is mapped to -inf so the order stays strict-weak
  LatentIndex index;
};

// "a is preferred to b": larger value first, the lower index on ties (for any entry type
// with a key and an index). A function object rather than a function, so that
// std::nth_element and std::sort inline it: passed as a function pointer it was not, and
// the selection's calls through it cost 1.3x the comparisons themselves (perf, 256 x 1000).
struct Preferred {
  template <class C>
  bool operator()(const C& a, const C& b) const {
    return a.key > b.key || (a.key == b.key && a.index < b.index);
  }
};
inline constexpr Preferred preferred{};

template <class T>
inline T selection_key(T v) {
  return std::isnan(v) ? -std::numeric_limits<T>::infinity() : v;
}

// Calls f(key) with the selection key of an activation, as a lambda the caller's loops can
// inline: the activation itself for swish and gelu (not monotone, so the top-k ranks
// act(pre)), the identity for every other (monotone) activation.
template <class T, class F>
inline void with_selection_key(Activation act, F f) {
  if (act == Activation::swish) {
    f([](T x) { return activate(Activation::swish, x); });
  } else if (act == Activation::gelu) {
    f([](T x) { return activate(Activation::gelu, x); });
  } else {
    f([](T x) { return x; });
  }
}

// Scratch space for select_topk_row, reused across the rows a thread handles.
template <class T>
struct SelectionScratch {
  std::vector<T> block_max, order;
  std::vector<Candidate<T>> candidates;
};

// Orders `c` by preference, keeps the first k and writes their indices.
template <class T>
inline void finish_selection(std::vector<Candidate<T>>& c, Index k, LatentIndex* out_index) {
  if (static_cast<Index>(c.size()) > k) std::nth_element(c.begin(), c.begin() + (k - 1), c.end(), preferred);
  std::sort(c.begin(), c.begin() + k, preferred);
  for (Index s = 0; s < k; ++s) out_index[s] = c[s].index;
}

// Selects the k largest entries of key(row + bias) and writes their indices to `out_index`,
// ordered by decreasing key, the lower index first on ties. Equals
//     stable_argsort(-key(row + bias))[:k]          (NaN counted as -inf)
// `key` is the identity for monotone activations, the activation itself otherwise.
//
// The row is viewed as `nb` strided blocks of `width` entries (block b holds entries
// b, b + nb, b + 2*nb, ...), so the block maxima are one vectorisable pass of elementwise
// maxima. The k-th largest block maximum t is a lower bound of the k-th largest entry (k
// blocks each hold an entry >= t), so only entries >= t in blocks whose maximum is >= t
// (about k blocks) can be selected; they are gathered and cut to k with std::nth_element.
template <class T, class Key>
void select_topk_row(const T* row, const T* bias, Index n, Index k, LatentIndex* out_index,
                     SelectionScratch<T>& scratch, Key key) {
  auto& cand = scratch.candidates;
  cand.clear();
  Index width = 32;
  while (width > 1 && n / width < 2 * k) width /= 2;
  const Index nb = n / width;
  if (width > 1) {
    constexpr T lowest = -std::numeric_limits<T>::infinity();
    scratch.block_max.assign(static_cast<size_t>(nb), lowest);
    T* M = scratch.block_max.data();
    for (Index t = 0; t < width; ++t) {
      const T* r = row + t * nb;
      const T* b = bias + t * nb;
      for (Index i = 0; i < nb; ++i) {
        const T v = key(r[i] + b[i]);
        M[i] = v > M[i] ? v : M[i];  // NaN never raises a maximum
      }
    }
    scratch.order.assign(M, M + nb);
    std::nth_element(scratch.order.begin(), scratch.order.begin() + (k - 1), scratch.order.end(),
                     [](T a, T b) { return a > b; });
    const T threshold = scratch.order[k - 1];
    // A NaN counts as -inf: it can only matter (and its block only be visited) when the
    // threshold is -inf, and then it ties with -inf entries by index.
    for (Index i = 0; i < nb; ++i) {
      if (!(M[i] >= threshold)) continue;
      for (Index t = 0; t < width; ++t) {
        const Index j = t * nb + i;
        const T v = selection_key(key(row[j] + bias[j]));
        if (v >= threshold) cand.push_back({v, j});
      }
    }
    for (Index j = width * nb; j < n; ++j) {
      const T v = selection_key(key(row[j] + bias[j]));
      if (v >= threshold) cand.push_back({v, j});
    }
    // k blocks reach the threshold, so there are at least k candidates; the full-row path
    // below stays as a guard.
    if (static_cast<Index>(cand.size()) >= k) return finish_selection(cand, k, out_index);
    cand.clear();
  }
  cand.reserve(static_cast<size_t>(n));
  for (Index j = 0; j < n; ++j) cand.push_back({selection_key(key(row[j] + bias[j])), j});
  finish_selection(cand, k, out_index);
}

}  // namespace ksae
