// The encoder product's register-blocked kernel: P = C * W^T for row-major C (rows x depth)
// and W (cols x depth), in blocks of P that stay in registers for a whole depth block.
#pragma once

#include "common.hpp"

KSAE_PACKET_CODE_BEGIN

namespace ksae {

// P[r, j] = sum over t of C[r, t] * W[j, t] in register blocks of up to MR columns of P
// (consecutive j, in packet lanes: W is packed depth-major, pack_w) by NR rows (consecutive
// r, broadcast: C is packed depth-major in NR-row panels).
//
// Every entry of P is one fused multiply-add chain over t in increasing order, started at
// zero in each depth block (depth_block: kc depends on the depth alone) and added to the
// entry after each block. An entry's rounding therefore depends on the depth only: not on
// its place in a register block, the batch, a tile's bounds or the thread count.
//
// It replaces Eigen's GEBP kernel (3 packets by 4 columns with AVX-512). Measured on this
// project's 2-vCPU Zen 4, one thread, the (256 x 784) x (784 x 1000) product: with the
// package's -march=x86-64-v4, Eigen's product, this kernel and OpenBLAS all take 3.8-4.0 ms;
// with -march=native (GCC 12 tuning for znver4) Eigen's took 4.7-5.2 ms, most multiply-adds
// reading their W packet from memory again, and this kernel 3.9-4.2 ms.
template <class T>
struct GemmKernel {
  using Packet = typename Eigen::internal::packet_traits<T>::type;
  static constexpr int kPacket = Eigen::internal::unpacket_traits<Packet>::size;
  static constexpr int kMaxPackets = 3;
  static constexpr Index MR = kMaxPackets * kPacket;
  // 3 x 8 accumulators, 3 W packets and a broadcast need 28 registers (AVX-512 has 32);
  // with 16 (AVX2, SSE) the block is 3 x 4, as Eigen's.
  static constexpr Index NR = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 8 : 4;

  // Depth block: the depth cut into equal blocks (multiples of 8) of at most 512 values, so
  // a block's NR-row panel of C (kc x NR, 16 KiB at most for float32 with NR 8) stays in L1
  // while the W panels stream through.
  static Index depth_block(Index depth) {
    constexpr Index kMax = 512;
    if (depth < 1) return 1;
    const Index blocks = (depth + kMax - 1) / kMax;
    const Index kc = (depth + blocks - 1) / blocks;
    return std::max<Index>(1, std::min(depth, (kc + 7) / 8 * 8));
  }

  // Packet count of the panel holding `rows` (1..MR) rows of W.
  static int packets_for(Index rows) { return int((rows + kPacket - 1) / kPacket); }

  // Packs W[0:rows, 0:kc] (row-major, rows `ldw` apart) as panels of MR rows, each
  // depth-major (MR values per depth step; kc * MR values a panel). A last partial panel
  // holds packets_for(rest) packets per depth step, its rows past `rows` zero.
  static void pack_w(const T* W, Index ldw, Index rows, Index kc, T* out) {
    using namespace Eigen::internal;
    Index p = 0;
    if constexpr (kPacket > 1) {
      // A group of kPacket rows at a time, along the whole depth (kPacket x kPacket
      // transposes), with the next group's rows asked for a line a row per transpose, so
      // that they arrive while this group is packed. The rows come from L3 or memory (the
      // backward has just written them, and its optimizer streams have pushed them out of
      // L2); reading the whole panel at once (3 x kPacket rows, each asked for two lines
      // ahead of its loads) kept too few lines in flight. Measured in the step harness at
      // (256, 784, 1000, 25), 2 threads, versions alternated every 40 steps in one process:
      // pack_w took 0.24-0.26 ms a thread per step that way and 0.18-0.19 ms with the next
      // group's rows asked for all at once (two runs); asking for them a line at a time
      // took 10-17% less again (five runs). From L2 the same packing takes 0.06-0.08 ms.
      auto ask = [](const T* line) {
#if defined(__GNUC__)
        __builtin_prefetch(line);
#else
        (void)line;
#endif
      };
      auto prefetch_group = [&](Index g) {  // all of group g's rows at once
        for (Index i = 0; i < kPacket; ++i) {
          for (Index t = 0; t < kc; t += 64 / Index(sizeof(T))) ask(W + (g + i) * ldw + t);
          ask(W + (g + i) * ldw + kc - 1);
        }
      };
      if (p + MR <= rows) prefetch_group(p);
      for (; p + MR <= rows; p += MR) {
        T* panel = out + p * kc;
        for (int m = 0; m < kMaxPackets; ++m) {
          const T* group = W + (p + m * kPacket) * ldw;
          const T* next = group + kPacket * ldw;  // the next group (of this panel or the next)
          const bool has_next = p + (m + 2) * kPacket <= rows;
          Index t = 0;
          for (; t + kPacket <= kc; t += kPacket) {
            if (has_next) {  // the lines of next[.., t], and on the last step those up to kc
              for (Index i = 0; i < kPacket; ++i) ask(next + i * ldw + t);
              if (t + 2 * kPacket > kc) {
                for (Index i = 0; i < kPacket; ++i) {
                  ask(next + i * ldw + t + kPacket);
                  ask(next + i * ldw + kc - 1);
                }
              }
            }
            PacketBlock<Packet, kPacket> block;
            for (int i = 0; i < kPacket; ++i) block.packet[i] = ploadu<Packet>(group + i * ldw + t);
            ptranspose(block);
            for (int i = 0; i < kPacket; ++i) {
              pstore(panel + (t + i) * MR + m * kPacket, block.packet[i]);
            }
          }
          for (; t < kc; ++t) {
            for (Index l = 0; l < kPacket; ++l) panel[t * MR + m * kPacket + l] = group[l * ldw + t];
          }
        }
      }
    }
    for (; p < rows; p += MR) {
      const Index n = std::min(MR, rows - p);
      const Index lanes = packets_for(n) * kPacket;
      T* panel = out + p * kc;
      for (Index l = 0; l < n; ++l) {
        const T* w = W + (p + l) * ldw;
        for (Index t = 0; t < kc; ++t) panel[t * lanes + l] = w[t];
      }
      for (Index l = n; l < lanes; ++l) {  // padding lanes: no row of W behind them
        for (Index t = 0; t < kc; ++t) panel[t * lanes + l] = T(0);
      }
    }
  }

  // One register block: P[0:NR rows, 0:kPackets*kPacket cols] (rows `ldp` apart) from a
  // packed W panel (kc x kPackets*kPacket) and a packed C panel (kc x NR). With `add`, the
  // block's sums are added to P; otherwise they are stored. Only rows < nr_valid and
  // columns < mr_valid are written.
  template <int kPackets>
  static void block(Index kc, const T* __restrict A, const T* __restrict B, T* P, Index ldp,
                    bool add, Index mr_valid, Index nr_valid) {
    using namespace Eigen::internal;
    constexpr Index lanes = kPackets * kPacket;
    Packet acc[NR][kPackets];
    // Ask for the block of P now, in a state it can be written in: the stores (and, with
    // `add`, the loads) at the end then find it in L1 instead of waiting on L2 or L3 for
    // each of its NR x kPackets lines. Measured in the step harness at
    // (256, 784, 1000, 25), 2 threads, with and without it alternated every 40 steps: the
    // encode 0.03-0.05 ms faster.
#if defined(__GNUC__)
    for (Index c = 0; c < nr_valid; ++c) {
      const char* row = reinterpret_cast<const char*>(P + c * ldp);
      for (Index b = 0; b < mr_valid * Index(sizeof(T)); b += 64) __builtin_prefetch(row + b, 1, 3);
    }
#endif
#pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) {
#pragma GCC unroll 3
      for (int m = 0; m < kPackets; ++m) acc[c][m] = pset1<Packet>(T(0));
    }
    for (Index t = 0; t < kc; ++t) {
      Packet a[kPackets];
#pragma GCC unroll 3
      for (int m = 0; m < kPackets; ++m) a[m] = pload<Packet>(A + m * kPacket);
#pragma GCC unroll 8
      for (int c = 0; c < NR; ++c) {
        const Packet b = pset1<Packet>(B[c]);
#pragma GCC unroll 3
        for (int m = 0; m < kPackets; ++m) acc[c][m] = pmadd(a[m], b, acc[c][m]);
      }
      A += lanes;
      B += NR;
    }
    if (mr_valid == lanes && nr_valid == NR) {
#pragma GCC unroll 8
      for (int c = 0; c < NR; ++c) {
        T* p = P + c * ldp;
#pragma GCC unroll 3
        for (int m = 0; m < kPackets; ++m) {
          pstoreu(p + m * kPacket, add ? padd(ploadu<Packet>(p + m * kPacket), acc[c][m])
                                       : acc[c][m]);
        }
      }
      return;
    }
    alignas(64) T sums[lanes];
    for (Index c = 0; c < nr_valid; ++c) {
      for (int m = 0; m < kPackets; ++m) pstoreu(sums + m * kPacket, acc[c][m]);
      T* p = P + c * ldp;
      for (Index i = 0; i < mr_valid; ++i) p[i] = add ? p[i] + sums[i] : sums[i];
    }
  }

  // block() for a panel of `rows` (1..MR) rows of W, packed by pack_w.
  static void panel(Index kc, const T* A, const T* B, T* P, Index ldp, bool add, Index rows,
                    Index nr_valid) {
    switch (packets_for(rows)) {
      case 1: return block<1>(kc, A, B, P, ldp, add, rows, nr_valid);
      case 2: return block<2>(kc, A, B, P, ldp, add, rows, nr_valid);
      default: return block<kMaxPackets>(kc, A, B, P, ldp, add, rows, nr_valid);
    }
  }
};

}  // namespace ksae

KSAE_PACKET_CODE_END
