// Per-row top-k selection with deterministic tie-breaking.
#pragma once

#include "common.hpp"

#include <algorithm>
#include <type_traits>
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

KSAE_PACKET_CODE_BEGIN
// count + (a OP b ? one : 0) per lane, OP one of <=, <, == (kLe, kLt, kEq): the counting
// step of kth_largest and rank_top_k. With AVX-512 the comparison gives a mask register and
// a masked add takes it (2 instructions); Eigen's pcmp_* would widen the mask to a vector
// and mask `one` with it (4), and these loops are nothing but those steps.
enum class CountIf { kLe, kLt, kEq };
template <CountIf kOp, class Packet>
inline Packet count_if(const Packet& count, const Packet& a, const Packet& b, const Packet& one) {
  using namespace Eigen::internal;
#ifdef __AVX512F__
  constexpr int kPredicate = kOp == CountIf::kLe ? _CMP_LE_OQ : kOp == CountIf::kLt ? _CMP_LT_OQ : _CMP_EQ_OQ;
  if constexpr (std::is_same_v<Packet, Packet16f>) {
    return _mm512_mask_add_ps(count, _mm512_cmp_ps_mask(a, b, kPredicate), count, one);
  } else if constexpr (std::is_same_v<Packet, Packet8d>) {
    return _mm512_mask_add_pd(count, _mm512_cmp_pd_mask(a, b, kPredicate), count, one);
  }
#endif
  const Packet hit = kOp == CountIf::kLe ? pcmp_le(a, b) : kOp == CountIf::kLt ? pcmp_lt(a, b) : pcmp_eq(a, b);
  return padd(count, pand(hit, one));
}

// Values per packet and packets per row of the counting selections below (kth_largest,
// rank_top_k): at most kCountPackets packets (128 float32 with AVX-512) are counted.
template <class T>
struct CountLanes {
  using Packet = typename Eigen::internal::packet_traits<T>::type;
  static constexpr Index S = Eigen::internal::unpacket_traits<Packet>::size;
  static constexpr Index kCountPackets = 8;

  // Loads v[0:n) (n <= kCountPackets * S) into packets, the last one padded with -inf;
  // returns the packet count.
  static Index load(const T* v, Index n, Packet* out) {
    using namespace Eigen::internal;
    const Index full = n / S, packets = (n + S - 1) / S;
    for (Index q = 0; q < full; ++q) out[q] = ploadu<Packet>(v + q * S);
    if (full < packets) {
      alignas(64) T tail[S];
      for (Index i = 0; i < S; ++i) {
        tail[i] = full * S + i < n ? v[full * S + i] : -std::numeric_limits<T>::infinity();
      }
      out[full] = pload<Packet>(tail);
    }
    return packets;
  }
};

// The k-th largest of v[0:n) (1 <= k <= n; no NaN), using `order` (n values) as scratch.
// Up to 8 packets of values (128 float32 with AVX-512), branch-free: each value's count of
// values >= it, kept per lane (n^2 / packet-size comparisons), and the largest value whose
// count reaches k. That is the k-th largest: at least k values reach it, and any larger
// value is reached by at most k - 1. Measured for n = 62, k = 25 (this project's Zen 4):
// 108 ns with count_if's masked adds (172 ns before them), against 700-835 ns for
// std::nth_element, whose branches the data decide.
// Longer rows go through std::nth_element.
template <class T>
inline T kth_largest(const T* v, Index n, Index k, T* order) {
  using namespace Eigen::internal;
  using Lanes = CountLanes<T>;
  using Packet = typename Lanes::Packet;
  if constexpr (Lanes::S > 1) {
    if (n <= Lanes::kCountPackets * Lanes::S) {
      Packet m[Lanes::kCountPackets], count[Lanes::kCountPackets];
      const Index packets = Lanes::load(v, n, m);  // -inf pads: their counts do not matter
      const Packet one = pset1<Packet>(T(1));
      for (Index q = 0; q < packets; ++q) count[q] = pset1<Packet>(T(0));
      for (Index j = 0; j < n; ++j) {
        const Packet x = pset1<Packet>(v[j]);
        for (Index q = 0; q < packets; ++q) {
          count[q] = count_if<CountIf::kLe>(count[q], m[q], x, one);  // v[j] >= this lane's value
        }
      }
      const Packet need = pset1<Packet>(T(k));
      const Packet none = pset1<Packet>(-std::numeric_limits<T>::infinity());
      Packet best = none;
      for (Index q = 0; q < packets; ++q) best = pmax(best, pselect(pcmp_le(need, count[q]), m[q], none));
      return predux_max(best);
    }
  }
  std::copy(v, v + n, order);
  std::nth_element(order, order + (k - 1), order + n, [](T a, T b) { return a > b; });
  return order[k - 1];
}

// The k best of m candidates (key[i], index[i]; no NaN key, distinct indices) in preference
// order (larger key first, the lower index on ties): out[s] = the candidate of rank s, for
// s < k <= m. Each candidate's rank is the count of candidates preferred to it, counted by
// key per lane as in kth_largest, plus, for a key that others share, those of lower index;
// no sort. Returns false, writing nothing, when m exceeds 8 packets (128 float32 with
// AVX-512) or packets hold one value: the caller then sorts.
template <class T>
inline bool rank_top_k(const T* key, const LatentIndex* index, Index m, Index k, Index* out) {
  using namespace Eigen::internal;
  using Lanes = CountLanes<T>;
  using Packet = typename Lanes::Packet;
  constexpr Index S = Lanes::S;
  if constexpr (S == 1) {
    return false;
  } else {
    if (m > Lanes::kCountPackets * S) return false;
    Packet keys[Lanes::kCountPackets], above[Lanes::kCountPackets], equal[Lanes::kCountPackets];
    const Index packets = Lanes::load(key, m, keys);  // the pads' ranks are not read
    const Packet one = pset1<Packet>(T(1));
    for (Index q = 0; q < packets; ++q) above[q] = equal[q] = pset1<Packet>(T(0));
    for (Index j = 0; j < m; ++j) {
      const Packet x = pset1<Packet>(key[j]);
      for (Index q = 0; q < packets; ++q) {
        above[q] = count_if<CountIf::kLt>(above[q], keys[q], x, one);
        equal[q] = count_if<CountIf::kEq>(equal[q], keys[q], x, one);
      }
    }
    alignas(64) T ranks[Lanes::kCountPackets * S], shared[Lanes::kCountPackets * S];
    for (Index q = 0; q < packets; ++q) {
      pstore(ranks + q * S, above[q]);
      pstore(shared + q * S, equal[q]);
    }
    for (Index i = 0; i < m; ++i) {
      Index rank = Index(ranks[i]);
      if (shared[i] > T(1)) {  // a tie on the key: the lower indices go first
        for (Index j = 0; j < m; ++j) rank += key[j] == key[i] && index[j] < index[i];
      }
      if (rank < k) out[rank] = i;
    }
    return true;
  }
}
KSAE_PACKET_CODE_END

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
// (kth_largest finds t.)
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
    scratch.order.resize(static_cast<size_t>(nb));
    const T threshold = kth_largest(M, nb, k, scratch.order.data());
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
