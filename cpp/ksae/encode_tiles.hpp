// The encoder product's tiles: how many latents a tile holds, the walk over a thread's
// latent range in tiles, and TileProduct, which packs the centered batch once per encode and
// multiplies each tile against that copy with the register-blocked kernel (gemm.hpp).
#pragma once

#include "common.hpp"
#include "gemm.hpp"

#include <algorithm>
#include <memory>

namespace ksae {

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

}  // namespace ksae
