// Forward pass of a TopK autoencoder: the one dense product, the selection and the sparse decode.
#pragma once

#include "common.hpp"
#include "gemm.hpp"
#include "topk.hpp"

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>
#if defined(_MSC_VER)
#include <intrin.h>
#endif

namespace ksae {

template <class T>
void select_rows(const T* pre, const T* bias, Index batch, Index n_latents, Index k,
                 Activation act, T* values, LatentIndex* indices, T* selected_pre);

// The encoder product is computed in tiles of latents. A tile's product (batch x tile) is
// sized to stay in a core's cache, so the fused encode selects from it before it is evicted.
constexpr Index kTileBytes = Index(1) << 20;
// Tiles hold a multiple of this many latents, a multiple of the register block's width
// (GemmKernel::MR: 48, 24 or 12 lanes), so only a thread's last tile may end in a partial
// register panel. No rounding depends on the tiles (see GemmKernel): the fused and the
// materialising encode agree bitwise, for any thread count.
constexpr Index kTileStep = 48;

// A tile streams the packed batch (batch x d_in) through the kernel once per W block, so a
// narrow tile reads it again per few latents. Measured at (4096, 768, 4096, 32), one thread
// (C++ harness, x86-64-v4): the fused encode took 284-289 ms with 96-latent tiles, 279-283
// with 240, 274-276 with 528 (with Eigen's product, which repacked the batch for every tile,
// the materialising encode had taken 377 ms with 96-latent tiles and 326-328 with 192-528).
// Large batches therefore get tiles of this many latents even where they exceed kTileBytes
// (they then sit in L3 rather than L2).
constexpr Index kMinTileLatents = 5 * kTileStep;

// Latents per tile for a batch: about kTileBytes of products, a multiple of kTileStep, at
// least kMinTileLatents (1024 float32 rows: 240 latents).
template <class T>
inline Index tile_latents(Index batch) {
  const Index fit = kTileBytes / (std::max<Index>(batch, 1) * Index(sizeof(T)));
  return std::max(kMinTileLatents, (fit + kTileStep / 2) / kTileStep * kTileStep);
}

// Calls f(j0, j1) for consecutive tiles covering [c0, c1): `tile` latents each, the last one
// taking the rest when fewer than kTileStep would remain after a full tile (so no tile is
// tiny: each tile streams the whole packed batch through the kernel, which a few latents
// would not repay; no rounding depends on the tiles). A tile therefore holds at most
// tile + kTileStep - 1 latents.
template <class F>
inline void for_each_tile(Index c0, Index c1, Index tile, F f) {
  for (Index j0 = c0; j0 < c1;) {
    const Index j1 = c1 - j0 < tile + kTileStep ? c1 : j0 + tile;
    f(j0, j1);
    j0 = j1;
  }
}

KSAE_PACKET_CODE_BEGIN
// The tile products of one encode (GemmKernel, gemm.hpp). `centered` is packed once per
// encode, each thread packing a share of its row panels, and shared by every tile; a tile
// packs its W_enc rows in blocks of mc latents (half of L2) by kc depth values and runs the
// register blocks over each, all of centered's panels against the block's W panels.
template <class T>
class TileProduct {
  using Kernel = GemmKernel<T>;
  static constexpr Index MR = Kernel::MR, NR = Kernel::NR;

 public:
  // Latents per tile at most `max_width`; `threads` per-thread W_enc blocks. Allocates, so it
  // is built outside any parallel region.
  TileProduct(Index batch, Index d_in, Index max_width, int threads)
      : batch_(batch), d_in_(d_in), kc_(Kernel::depth_block(d_in)),
        panels_((batch + NR - 1) / NR) {
    // W_enc blocks of mc latents: half of L2 at most, whole register panels, no wider than
    // the widest tile. (mc changes no rounding: only kc does.)
    std::ptrdiff_t l1, l2, l3;
    Eigen::internal::manage_caching_sizes(Eigen::GetAction, &l1, &l2, &l3);
    const Index fit = Index(l2) / 2 / (kc_ * Index(sizeof(T))) / MR * MR;
    mc_ = std::max<Index>(MR, std::min(fit, (std::max<Index>(max_width, 1) + MR - 1) / MR * MR));
    constexpr Index kAlign = 64 / Index(sizeof(T));  // each thread's block on a 64-byte boundary
    lhs_capacity_ = (mc_ * kc_ + kAlign - 1) / kAlign * kAlign;
    rhs_.reset(aligned_new(static_cast<size_t>(panels_ * NR) * d_in));
    lhs_.reset(aligned_new(static_cast<size_t>(threads) * lhs_capacity_));
  }

  // centered = X - b_dec, and the packed copy of it, for this thread's share of the row
  // panels: call inside the parallel region, from every thread, then barrier. Depth block k0
  // (kc values) holds its panels at rhs_ + k0 * panels * NR, panel q's kc x NR values one
  // after the other (depth-major); rows past the batch are zeros. Each row is centered and
  // packed while it is in cache.
  void center_and_pack(const T* X, const T* b_dec, T* centered) {
    Index q0, q1;
    this_thread_range(panels_, &q0, &q1, 1);
    const T* rows[NR];
    for (Index q = q0; q < q1; ++q) {
      for (Index c = 0; c < NR; ++c) {
        const Index r = q * NR + c;
        if (r < batch_) {
          const T* x = X + r * d_in_;
          T* out = centered + r * d_in_;
          for (Index i = 0; i < d_in_; ++i) out[i] = x[i] - b_dec[i];
          rows[c] = out;
        } else {
          rows[c] = nullptr;
        }
      }
      for (Index k0 = 0; k0 < d_in_; k0 += kc_) {
        const Index kc = std::min(k0 + kc_, d_in_) - k0;
        pack_panel(rows, k0, kc, rhs_.get() + k0 * panels_ * NR + q * kc * NR);
      }
    }
  }

  // out[r, j - j0] = centered[r] . W_enc_t[j] for j in [j0, j1), out's rows `stride` apart,
  // on thread `tid` (its W_enc block), from the packed copy of `centered`.
  void multiply(const T* W_enc_t, Index j0, Index j1, T* out, Index stride, int tid) const {
    const Index width = j1 - j0;
    if (d_in_ == 0) {  // empty sums
      for (Index r = 0; r < batch_; ++r) std::fill(out + r * stride, out + r * stride + width, T(0));
      return;
    }
    T* blockA = lhs_.get() + static_cast<size_t>(tid) * lhs_capacity_;
    for (Index k0 = 0; k0 < d_in_; k0 += kc_) {
      const Index kc = std::min(k0 + kc_, d_in_) - k0;
      const T* rhs = rhs_.get() + k0 * panels_ * NR;
      for (Index i2 = 0; i2 < width; i2 += mc_) {
        const Index mc = std::min(i2 + mc_, width) - i2;
        Kernel::pack_w(W_enc_t + (j0 + i2) * d_in_ + k0, d_in_, mc, kc, blockA);
        for (Index q = 0; q < panels_; ++q) {
          const Index nr = std::min(NR, batch_ - q * NR);
          T* P = out + q * NR * stride + i2;
          for (Index p = 0; p < mc; p += MR) {
            Kernel::panel(kc, blockA + p * kc, rhs + q * kc * NR, P + p, stride, k0 > 0,
                          std::min(MR, mc - p), nr);
          }
        }
      }
    }
  }

 private:
  struct AlignedFree {
    void operator()(T* p) const { Eigen::internal::aligned_free(p); }
  };

  static T* aligned_new(size_t n) {
    return static_cast<T*>(Eigen::internal::aligned_malloc(std::max<size_t>(n, 1) * sizeof(T)));
  }

  // Depth values [k0, k0 + kc) of NR rows (null: a row past the batch, zeros) into `out`,
  // depth-major: out[t * NR + c] = rows[c][k0 + t]. NR x NR transposes where a packet holds
  // NR values (AVX-512 float and double, AVX2 and SSE float, AVX2 double).
  static void pack_panel(const T* const* rows, Index k0, Index kc, T* out) {
    using namespace Eigen::internal;
    using PacketNR = typename find_best_packet<T, NR>::type;
    Index t = 0;
    if constexpr (unpacket_traits<PacketNR>::size == NR && NR > 1) {
      bool whole = true;
      for (Index c = 0; c < NR; ++c) whole = whole && rows[c] != nullptr;
      if (whole) {
        for (; t + NR <= kc; t += NR) {
          PacketBlock<PacketNR, int(NR)> block;
          for (Index c = 0; c < NR; ++c) block.packet[c] = ploadu<PacketNR>(rows[c] + k0 + t);
          ptranspose(block);
          for (Index i = 0; i < NR; ++i) pstoreu(out + (t + i) * NR, block.packet[i]);
        }
      }
    }
    for (; t < kc; ++t) {
      for (Index c = 0; c < NR; ++c) out[t * NR + c] = rows[c] ? rows[c][k0 + t] : T(0);
    }
  }

  Index batch_, d_in_, kc_, panels_, mc_ = 0, lhs_capacity_ = 0;
  std::unique_ptr<T[], AlignedFree> rhs_, lhs_;
};
KSAE_PACKET_CODE_END

template <class T>
void encode_topk_fused(const T* X, Index batch, Index d_in, const T* W_enc_t, const T* b_enc,
                       const T* b_dec, Index n_latents, Index k, Activation act, int n_threads,
                       T* centered, T* values, LatentIndex* indices, T* selected_pre);

// Encodes a batch and keeps the k largest pre-activations per row:
//     centered = X - b_dec                                       (batch x d_in)
//     pre      = centered @ W_enc + b_enc                       (batch x n_latents)
//     indices  = stable_argsort(-pre, axis=1)[:, :k]           (batch x k)
//     values   = act(take_along_axis(pre, indices, axis=1))     (batch x k)
// W_enc is held transposed (W_enc_t, n_latents x d_in, row-major) so that a latent's encoder
// weights are one contiguous row, as its decoder weights are in W_dec.
// `centered` (batch x d_in) is an output kept for the backward pass. `pre` (batch x n_latents)
// may be null: then the selection is fused with the product (see encode_topk_fused) and no
// batch x n_latents array exists; otherwise it receives the pre-activations without b_enc
// (AuxK selects from them again) and the rows are selected from it afterwards. Both give
// bitwise the same result. `selected_pre` (batch x k, may be null) receives the kept
// pre-activations, which swish's and gelu's derivatives need.
// The selection is on act(pre) (see Activation); softmax normalises each row's k values.
template <class T>
void encode_topk(const T* X, Index batch, Index d_in, const T* W_enc_t, const T* b_enc,
                 const T* b_dec, Index n_latents, Index k, Activation act, int n_threads,
                 T* centered, T* pre, T* values, LatentIndex* indices, T* selected_pre = nullptr) {
  if (pre == nullptr) {
    return encode_topk_fused(X, batch, d_in, W_enc_t, b_enc, b_dec, n_latents, k, act, n_threads,
                             centered, values, indices, selected_pre);
  }
  const int nt = threads_for(n_threads, double(batch) * double(n_latents) * double(d_in), 1 << 20);
  const Index tile = tile_latents<T>(batch);
  TileProduct<T> product(batch, d_in, std::min(n_latents, tile + kTileStep - 1), nt);
#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
    int tid = 0;
#ifdef KSAE_HAVE_OPENMP
    tid = omp_get_thread_num();
#endif
    product.center_and_pack(X, b_dec, centered);
#pragma omp barrier
    // The dense product, split by latent columns: each thread multiplies all rows by its own
    // slice of W_enc, so the large operand is read (and packed) once in all.
    Index c0, c1;
    this_thread_range(n_latents, &c0, &c1, kLatentAlign);
    for_each_tile(c0, c1, tile, [&](Index j0, Index j1) {
      product.multiply(W_enc_t, j0, j1, pre + j0, n_latents, tid);
    });
#pragma omp barrier
    select_rows(pre, b_enc, batch, n_latents, k, act, values, indices, selected_pre);
  }
}

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

// encode_topk without the pre-activation matrix. Each thread walks its latent range in tiles
// (tile_latents: ~1 MiB of products, in cache, for batches up to ~1000 rows), multiplies a tile into its own buffer and
// folds every row of it into that row's running candidates (fold_tile_row). Then the rows
// are merged in groups of kMergeRows, claimed in order by whichever thread is free, each
// group as soon as every thread has folded its rows for the last time: each row's
// candidates from all threads are cut to the k best and sorted, exactly as select_topk_row
// orders them. (With a barrier before the merge instead, the thread that finished its walk
// first waited there, a median 0.1 ms at (256, 784, 1000, 25) on 2 threads; merging behind
// the other's fold made that encode 0.03-0.08 ms faster, measured in one process against
// the barrier, old and new alternated every 40 steps.) The product tiles are those of the
// materialising encode, so the two agree bitwise. Scratch: per thread one tile (batch x
// (tile + kTileStep - 1)) and batch x capacity candidates, capacity = 2k + 16 (at most
// n_latents).
template <class T>
void encode_topk_fused(const T* X, Index batch, Index d_in, const T* W_enc_t, const T* b_enc,
                       const T* b_dec, Index n_latents, Index k, Activation act, int n_threads,
                       T* centered, T* values, LatentIndex* indices, T* selected_pre) {
  const int nt = threads_for(n_threads, double(batch) * double(n_latents) * double(d_in), 1 << 20);
  const Index tile = tile_latents<T>(batch);
  // Sized for any split (the runtime may start fewer threads than asked for).
  const Index tile_width = std::min(n_latents, tile + kTileStep - 1);
  const Index capacity = std::min(2 * k + 16, n_latents);
  // Allocated here: no exception may leave the parallel region. Left uninitialised (every
  // entry is written before it is read): zeroing megabytes per call showed at small shapes.
  std::unique_ptr<T[]> tiles(new T[static_cast<size_t>(nt) * batch * tile_width]);
  std::unique_ptr<KeptEntry<T>[]> kept(new KeptEntry<T>[static_cast<size_t>(nt) * batch * capacity]);
  std::unique_ptr<T[]> bounds(new T[static_cast<size_t>(nt) * tile_width]);  // fold_tile_row's scratch
  std::vector<RowCandidates<T>> rows(static_cast<size_t>(nt) * batch);
  TileProduct<T> product(batch, d_in, tile_width, nt);
  for (size_t i = 0; i < rows.size(); ++i) {
    rows[i] = {kept.get() + i * capacity, 0, T(0), false};
  }
  // Rows of the batch each thread has folded for the last time (published with release), and
  // the next row group of the merge to be claimed.
  std::unique_ptr<std::atomic<Index>[]> folded(new std::atomic<Index>[static_cast<size_t>(nt)]);
  for (int t = 0; t < nt; ++t) folded[t].store(0, std::memory_order_relaxed);
  std::atomic<Index> next_rows{0};
  int team = 1;
#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
    int tid = 0;
#ifdef KSAE_HAVE_OPENMP
    tid = omp_get_thread_num();
#pragma omp single
    team = omp_get_num_threads();
#endif
    product.center_and_pack(X, b_dec, centered);
#pragma omp barrier
    Index c0, c1;
    this_thread_range(n_latents, &c0, &c1, kLatentAlign);
    T* buffer = tiles.get() + static_cast<size_t>(tid) * batch * tile_width;
    RowCandidates<T>* mine = rows.data() + static_cast<size_t>(tid) * batch;
    T* scratch = bounds.get() + static_cast<size_t>(tid) * tile_width;
    auto walk = [&](auto key) {
      for_each_tile(c0, c1, tile, [&](Index j0, Index j1) {
        const Index width = j1 - j0;
        product.multiply(W_enc_t, j0, j1, buffer, width, tid);
        const bool last = j1 == c1;
        for (Index r = 0; r < batch; ++r) {
          fold_tile_row(buffer + r * width, b_enc + j0, width, j0, k, capacity, key, mine[r],
                        scratch, last);
          if (last && (r % kMergeRows == kMergeRows - 1 || r == batch - 1)) {
            folded[tid].store(r + 1, std::memory_order_release);
          }
        }
      });
    };
    with_selection_key<T>(act, walk);
    if (c0 == c1) folded[tid].store(batch, std::memory_order_release);  // no latents: no tiles
    std::vector<KeptEntry<T>> merged;
    std::vector<T> keys;
    std::vector<LatentIndex> latents;
    std::vector<Index> best(static_cast<size_t>(k));
    // The merge, in groups of kMergeRows rows claimed in order by whichever thread is free;
    // a group waits until every thread has folded its rows, so a thread that finished its
    // walk early merges behind the others' folds instead of waiting at a barrier.
    Index ready = 0;  // rows every thread has folded, as last seen
    SpinWait wait;
    for (;;) {
      const Index r0 = next_rows.fetch_add(kMergeRows, std::memory_order_relaxed);
      if (r0 >= batch) break;
      const Index r1 = std::min(batch, r0 + kMergeRows);
      while (ready < r1) {
        Index least = batch;
        for (int t = 0; t < team; ++t) least = std::min(least, folded[t].load(std::memory_order_acquire));
        ready = least;
        if (ready < r1) wait();
      }
      for (Index r = r0; r < r1; ++r) {
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
    }
  }
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

// The terms of one decoded row whose latents lie in one of the decode's two fixed groups
// (group 0: latents below `split`, group 1: the rest):
//     out = init + sum of v[s] * W_dec[idx[s]] over those slots s, in slot order
// (init null: zeros; d values each). `slots` holds k indices.
template <class T>
inline void decode_group(const T* v, const LatentIndex* idx, Index k, const T* W_dec,
                         const T* init, Index d, Index split, int group, Index* slots, T* out) {
  Index count = 0;
  for (Index s = 0; s < k; ++s) {
    if ((idx[s] >= split) == (group == 1)) slots[count++] = s;
  }
  weighted_row_sum(out, d, count, [&](Index e) {
    return std::make_pair(v[slots[e]], W_dec + idx[slots[e]] * d);
  }, init);
}

// One row of decode_sparse: out = (b_dec + group 0's terms) + group 1's terms, the second
// sum formed in `scratch` (d values; `slots` k indices).
template <class T>
inline void decode_row(const T* v, const LatentIndex* idx, Index k, const T* W_dec,
                       const T* b_dec, Index d, Index split, Index* slots, T* scratch, T* out) {
  using Row = Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>;
  using ConstRow = Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>;
  decode_group(v, idx, k, W_dec, b_dec, d, split, 0, slots, out);
  decode_group(v, idx, k, W_dec, static_cast<const T*>(nullptr), d, split, 1, slots, scratch);
  Row(out, d) += ConstRow(scratch, d);
}

// Decodes sparse codes: out[r] = b_dec + sum_s values[r, s] * W_dec[indices[r, s]], which
// equals dense(values, indices) @ W_dec + b_dec at batch*k*d_in cost. Indices must lie in
// [0, n_latents) (the binding checks).
//
// Each row is summed as two partial rows, one per fixed group of latents (decoder_split):
// S_0 = b_dec plus the terms of latents below the split, S_1 = the other terms, each in slot
// order, and out[r] = S_0 + S_1. decode_mse sums the same way, with the two groups on
// different threads, so that on two threads each core reads only the decoder rows that it
// updates in the backward; the split depends on n_latents alone, so the rounding never
// depends on the thread count.
template <class T>
void decode_sparse(const T* values, const LatentIndex* indices, Index batch, Index k,
                   const T* W_dec, const T* b_dec, Index d_in, Index n_latents, int n_threads,
                   T* out) {
  const int nt = threads_for(n_threads, double(batch) * double(k + 1) * double(d_in), 1 << 16);
  const Index split = decoder_split(n_latents);
  // Per thread: a partial row and the slots of a group. Allocated here: no exception may
  // leave the parallel region.
  std::unique_ptr<T[]> partial(new T[static_cast<size_t>(nt) * std::max<Index>(d_in, 1)]);
  std::unique_ptr<Index[]> slots(new Index[static_cast<size_t>(nt) * std::max<Index>(k, 1)]);
#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
    int tid = 0;
#ifdef KSAE_HAVE_OPENMP
    tid = omp_get_thread_num();
#endif
    T* scratch = partial.get() + static_cast<size_t>(tid) * std::max<Index>(d_in, 1);
    Index* sl = slots.get() + static_cast<size_t>(tid) * std::max<Index>(k, 1);
#pragma omp for schedule(static)
    for (Index r = 0; r < batch; ++r) {
      decode_row(values + r * k, indices + r * k, k, W_dec, b_dec, d_in, split, sl, scratch,
                 out + r * d_in);
    }
  }
}

// decode_sparse and the mean squared error against targets X (batch x d):
//     x_hat       = decode_sparse(values, indices, W_dec, b_dec)       (bitwise)
//     grad_out[r] = (x_hat[r] - X[r]) * T(2 / (batch * d))        (dL/dX_hat of the mean)
// and returns sum((x_hat - X)^2) / (batch * d), each row's sum in T, the rows' in double and
// in row order (the same for any thread count).
//
// On more than one thread the decode runs by latent group: the 2 * batch partial rows
// (group 0's of every row into grad_out, group 1's into a scratch batch x d) are shared out
// in order, so on two threads each thread forms one group's partial rows and reads only the
// decoder rows of that group, which are the rows it updates in the backward (backward_topk
// forms the decoder products there too). Then each row's two partial rows are added, the
// loss and gradient formed. When the row owner read every decoder row, the backward's
// update of a row had to take its lines from the other core's cache; where the two cores
// share no cache (one L3 per CCD) that was about 1 ms of a 6 ms step at
// (256, 784, 1000, 25). Measured in one process (C++ harness, 2 threads, the old and new
// kernels alternated every 40 steps): the far step 5.6-6.4 -> 4.5-5.4 ms (-15 to -19%), the
// near step 0.02-0.09 ms faster. One thread adds each row's partial rows at once.
template <class T>
double decode_mse(const T* values, const LatentIndex* indices, Index batch, Index k,
                  const T* W_dec, const T* b_dec, const T* X, Index d, Index n_latents,
                  int n_threads, T* grad_out) {
  using Row = Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>;
  using ConstRow = Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>;
  const int nt = threads_for(n_threads, double(batch) * double(k + 3) * double(d), 1 << 16);
  const T scale = T(2.0 / (double(batch) * double(d)));
  const Index split = decoder_split(n_latents);
  std::vector<double> row_sums(static_cast<size_t>(batch));
  // Group 1's partial rows: all of them on several threads, one per thread on one. Allocated
  // here: no exception may leave the parallel region.
  const Index partial_rows = nt > 1 ? batch : 1;
  std::unique_ptr<T[]> partial(new T[static_cast<size_t>(std::max<Index>(partial_rows * d, 1))]);
  std::unique_ptr<Index[]> slots(new Index[static_cast<size_t>(nt) * std::max<Index>(k, 1)]);
#pragma omp parallel num_threads(nt)
  {
    FlushSubnormals flush;
    int tid = 0;
#ifdef KSAE_HAVE_OPENMP
    tid = omp_get_thread_num();
#endif
    Index* sl = slots.get() + static_cast<size_t>(tid) * std::max<Index>(k, 1);
    if (nt > 1) {
#pragma omp for schedule(static)
      for (Index u = 0; u < 2 * batch; ++u) {
        const int group = u < batch ? 0 : 1;
        const Index r = group == 0 ? u : u - batch;
        decode_group(values + r * k, indices + r * k, k, W_dec, group == 0 ? b_dec : nullptr, d,
                     split, group, sl, (group == 0 ? grad_out : partial.get()) + r * d);
      }
      // implicit barrier: every partial row is formed.
    }
#pragma omp for schedule(static)
    for (Index r = 0; r < batch; ++r) {
      T* g = grad_out + r * d;
      Row row(g, d);
      if (nt > 1) {
        row += ConstRow(partial.get() + r * d, d);
      } else {
        decode_row(values + r * k, indices + r * k, k, W_dec, b_dec, d, split, sl,
                   partial.get(), g);
      }
      row -= ConstRow(X + r * d, d);
      row_sums[r] = double(row.squaredNorm());  // a vectorised sum within the row
      row *= scale;
    }
  }
  double total = 0;
  for (const double v : row_sums) total += v;
  return total / (double(batch) * double(d));
}

}  // namespace ksae
