// The encode's selection of each row's k best latents: from a whole row of pre-activations
// (select_rows, select_topk), or, in the fused encode, from a thread's product tiles as they
// are made (fold_tile_row keeps a row's running candidates) and then across the threads
// (merge_row_candidates). Both order the k as select_topk_row (topk.hpp) does.
#pragma once

#include "common.hpp"
#include "topk.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>
#if defined(_MSC_VER)
#include <intrin.h>
#endif

namespace ksae {

// Rows per group of encode_topk_fused's merge (and per publication of a thread's fold).
constexpr Index kMergeRows = 8;

// The position of the lowest set bit of a non-zero mask.
inline Index lowest_set_bit(std::uint32_t mask) {
#if defined(_MSC_VER)
  unsigned long bit;
  _BitScanForward(&bit, mask);
  return Index(bit);
#else
  return Index(__builtin_ctz(mask));
#endif
}

// An entry a thread keeps while it walks its tiles: the selection key, the pre-activation
// (b_enc included) the value is made from, and the latent.
template <class T>
struct KeptEntry {
  T key;
  T pre;
  LatentIndex index;
};

// One row's running candidates within one thread's latent range: every entry of the range
// seen so far that can still be among the row's k best. `threshold` is the k-th best key once
// the set has been cut to k (`full`); a later entry must beat it strictly, because a later
// entry has a higher index and so loses a tie.
template <class T>
struct RowCandidates {
  KeptEntry<T>* entries;
  Index count;
  T threshold;
  bool full;
};

// Strided block maxima of key(p + bias) over a row of `width` entries, as select_topk_row
// takes them: block b holds entries b, b + nb, b + 2*nb, ... (nb blocks of `w` entries; the
// last width - w*nb entries are in no block). Returns the k-th largest block maximum, a lower
// bound of the row's k-th largest key (k blocks each hold an entry reaching it). `M` and
// `order` hold nb values each. NaN never raises a maximum.
template <class T, class Key>
inline T block_bound(const T* p, const T* bias, Index nb, Index w, Index k, Key key, T* M,
                     T* order) {
  std::fill(M, M + nb, -std::numeric_limits<T>::infinity());
  for (Index t = 0; t < w; ++t) {
    const T* r = p + t * nb;
    const T* b = bias + t * nb;
    for (Index i = 0; i < nb; ++i) {
      const T v = key(r[i] + b[i]);
      M[i] = v > M[i] ? v : M[i];
    }
  }
  return kth_largest(M, nb, k, order);
}

// Block width for block_bound on a row of `width` entries: the widest of 32, 16, ..., 2 that
// leaves at least 2k blocks, or 1 when none does (then the bound is not worth taking).
inline Index bound_block_width(Index width, Index k) {
  Index w = 32;
  while (w > 1 && width / w < 2 * k) w /= 2;
  return w;
}

// Calls visit(i), in increasing i from `i` to `width`, for the entries whose key(p + bias)
// reaches bar() (>= when kInclusive, > otherwise; NaN never does). The keys of a chunk are
// compared with the bar in one vectorised pass into a bit mask and only the set bits are
// visited; bar() is read once per chunk, so a visit may raise it for the next chunk (the
// visit itself must check the current bar again).
template <bool kInclusive, class T, class Key, class Bar, class Visit>
inline void scan_row(const T* p, const T* bias, Index i, Index width, Key key, Bar bar,
                     Visit visit) {
  constexpr Index kChunk = 32;  // measured (callgrind): fewer instructions than 8, 16 or 64
  for (; i + kChunk <= width; i += kChunk) {
    const T b = bar();
    std::uint32_t mask = 0;
    for (Index l = 0; l < kChunk; ++l) {
      const T v = key(p[i + l] + bias[i + l]);
      mask |= std::uint32_t(kInclusive ? v >= b : v > b) << l;
    }
    for (; mask != 0; mask &= mask - 1) visit(i + lowest_set_bit(mask));
  }
  for (; i < width; ++i) {
    const T v = key(p[i] + bias[i]);
    if (kInclusive ? v >= bar() : v > bar()) visit(i);
  }
}

// Folds one row of a tile (product values p[0:width) of latents j0.., bias alongside) into
// the row's candidates, which hold at most `capacity` (> k, or >= every entry the range has)
// entries: when full they are cut to the k best with nth_element and the threshold rises.
// Entries arrive in index order, so once the set has a threshold a later entry must beat it
// strictly (it loses a tie).
//
// A row's first tile in a thread's range starts with no threshold. Where the tile row is wide
// enough (bound_block_width > 1), block_bound gives a lower bound of its k-th best key, only
// the entries reaching it (about k to 2k) are visited, and the set is cut to k at once.
// Otherwise every entry enters until the first cut. Measured at (256, 784, 1000, 25), one
// thread: the encode took 5.17 ms without the bound (the cuts' nth_element 12% of it), 4.89
// with it visiting block by block, less with the vectorised scan.
// `scratch` holds at least `width` values. On a thread's `last` tile the bounded first pass
// leaves its entries uncut: the merge after the walk cuts every thread's candidates anyway
// (measured at (256, 784, 1000, 25), one tile per thread: the fold took 0.41 ms a thread
// with the cut, 0.31 without, and the merge 0.03 ms more).
template <class T, class Key>
inline void fold_tile_row(const T* p, const T* bias, Index width, Index j0, Index k,
                          Index capacity, Key key, RowCandidates<T>& rc, T* scratch,
                          bool last) {
  auto cut = [&] {  // count >= k; with count == k too, the k-th best must move to k - 1
    std::nth_element(rc.entries, rc.entries + (k - 1), rc.entries + rc.count, preferred);
    rc.count = k;
    rc.threshold = rc.entries[k - 1].key;
    rc.full = true;
  };
  auto keep = [&](Index i, T x, T v) {
    rc.entries[rc.count++] = {v, x, static_cast<LatentIndex>(j0 + i)};
    if (rc.count == capacity && capacity > k) cut();
  };
  auto beats_threshold = [&](Index i) {
    const T x = p[i] + bias[i];
    const T v = selection_key(key(x));
    if (v > rc.threshold) keep(i, x, v);  // a cut within the chunk may have raised it
  };
  auto threshold = [&] { return rc.threshold; };
  Index i = 0;
  if (rc.count == 0) {
    const Index w = bound_block_width(width, k);
    const Index nb = width / w;
    const T bound = w > 1 ? block_bound(p, bias, nb, w, k, key, scratch, scratch + nb)
                          : -std::numeric_limits<T>::infinity();
    // A -inf bound admits every entry (NaN as -inf too): the plain path below does that.
    if (bound > -std::numeric_limits<T>::infinity()) {
      scan_row<true>(p, bias, 0, width, key, [&] { return bound; }, [&](Index j) {
        if (!rc.full) {
          const T x = p[j] + bias[j];
          keep(j, x, selection_key(key(x)));
        } else {
          beats_threshold(j);
        }
      });
      // k blocks reach the bound, so at least k entries were kept.
      if (!rc.full && !last) cut();
      return;
    }
  }
  for (; i < width && !rc.full; ++i) {  // until the first cut, every entry enters
    const T x = p[i] + bias[i];
    keep(i, x, selection_key(key(x)));
  }
  scan_row<false>(p, bias, i, width, key, threshold, beats_threshold);
}

// The fused encode's merge scratch, one per thread: a row's candidates from every thread,
// their keys and latents, and the positions of the k best.
template <class T>
struct MergeScratch {
  std::vector<KeptEntry<T>> merged;
  std::vector<T> keys;
  std::vector<LatentIndex> latents;
  std::vector<Index> best;
  explicit MergeScratch(Index k) : best(static_cast<size_t>(k)) {}
};

// Row r's code from the candidates each of the `team` threads kept for it (thread t's at
// rows[t * batch + r]): cut to the k best and sorted, exactly as select_topk_row orders
// them; values through the activation, the kept pre-activations into selected_pre (may be
// null).
template <class T>
inline void merge_row_candidates(const RowCandidates<T>* rows, int team, Index batch, Index r,
                                 Index k, Activation act, MergeScratch<T>& scratch, T* values,
                                 LatentIndex* indices, T* selected_pre) {
  std::vector<KeptEntry<T>>& merged = scratch.merged;
  std::vector<T>& keys = scratch.keys;
  std::vector<LatentIndex>& latents = scratch.latents;
  std::vector<Index>& best = scratch.best;
  merged.clear();
  for (int t = 0; t < team; ++t) {
    const RowCandidates<T>& rc = rows[static_cast<size_t>(t) * batch + r];
    merged.insert(merged.end(), rc.entries, rc.entries + rc.count);
  }
  // Every thread kept at least min(k, its range) entries, so there are at least k.
  const Index m = static_cast<Index>(merged.size());
  keys.resize(static_cast<size_t>(m));
  latents.resize(static_cast<size_t>(m));
  for (Index i = 0; i < m; ++i) {
    keys[i] = merged[i].key;
    latents[i] = merged[i].index;
  }
  if (!rank_top_k(keys.data(), latents.data(), m, k, best.data())) {
    if (m > k) {
      std::nth_element(merged.begin(), merged.begin() + (k - 1), merged.end(), preferred);
    }
    std::sort(merged.begin(), merged.begin() + k, preferred);
    for (Index s = 0; s < k; ++s) best[s] = s;
  }
  T* v = values + r * k;
  for (Index s = 0; s < k; ++s) {
    const KeptEntry<T>& e = merged[best[s]];
    const T x = e.pre;
    indices[r * k + s] = e.index;
    if (selected_pre) selected_pre[r * k + s] = x;
    v[s] = act == Activation::softmax ? x : activate(act, x);
  }
  if (act == Activation::softmax) normalize_softmax(v, k);
}

// The per-row selection of encode_topk on given pre-activations (without bias): for each
// row r, indices[r] = the k largest entries of pre[r] + bias, values[r] = act of them. Runs
// as an `omp for` inside the caller's parallel region.
template <class T>
void select_rows(const T* pre, const T* bias, Index batch, Index n_latents, Index k,
                 Activation act, T* values, LatentIndex* indices, T* selected_pre) {
  SelectionScratch<T> scratch;
  // An orphaned `omp for`: every thread of the caller's region takes the same branch.
  auto run = [&](auto key) {
#pragma omp for schedule(static)
    for (Index r = 0; r < batch; ++r) {
      const T* p = pre + r * n_latents;
      LatentIndex* idx = indices + r * k;
      T* v = values + r * k;
      select_topk_row(p, bias, n_latents, k, idx, scratch, key);
      for (Index s = 0; s < k; ++s) {
        const T x = p[idx[s]] + bias[idx[s]];
        if (selected_pre) selected_pre[r * k + s] = x;
        v[s] = act == Activation::softmax ? x : activate(act, x);
      }
      if (act == Activation::softmax) normalize_softmax(v, k);
    }
  };
  with_selection_key<T>(act, run);
}

// select_rows as a kernel of its own: picks a second code from the pre-activations an
// encode left behind (AuxK picks among dead latents by giving the others a -inf bias).
template <class T>
void select_topk(const T* pre, const T* bias, Index batch, Index n_latents, Index k,
                 Activation act, int n_threads, T* values, LatentIndex* indices,
                 T* selected_pre = nullptr) {
  const int nt = threads_for(n_threads, double(batch) * double(n_latents), 1 << 15);
#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
    select_rows(pre, bias, batch, n_latents, k, act, values, indices, selected_pre);
  }
}

}  // namespace ksae
