// Body of the symmetric distance-tile kernel, compiled once per instruction set.
//
// Included only by tile_kernel_<isa>.cpp, each of which defines GELORA_ISA (the namespace: generic,
// avx2, avx512) and is compiled with the matching -m flags, so every function here exists once per
// instruction set and the dispatcher in tile_kernel.cpp can never pick up a copy built for a wider one.
//
// What is fused: the norm addition d2 = |x_i|^2 + |x_j|^2 - 2<x_i, x_j> (one FMA per lane), the
// diagonal/self exclusion (by index), and the top-k offers to both the row and the column lists all
// run on the accumulator registers of the last K chunk; the distance tile never goes to memory.
// Only the partial dot products of the earlier K chunks are spilled (c_buf), which costs one load and
// one store per register tile per K chunk of 256 steps.
//
// When fusing stops paying off: the epilogue costs a fixed ~50 instructions per register tile (plus a
// rare scalar insertion), against 2 * MR * NR * dim flops of products. At dim >= 64 that is a few
// percent; at dim of a few units the top-k bookkeeping dominates and a brute-force engine of any kind
// is the wrong tool (a k-d tree is). Measured on one Zen 4 core at 4096 x 768 float32: ~97 GFLOP/s of
// useful (upper-triangle) products with the epilogue, against 88 for MKL's sgemm alone.
#pragma once

#include <cstdint>
#include <cstring>

#include "tile_kernel.h"
#include "topk_lists.h"

#include "simd_impl.h"

namespace gelora {
namespace GELORA_ISA {

// Register tile: MR rows by NV vectors of columns. 6 x 2 keeps 12 accumulators + 2 column vectors
// + 1 broadcast in the 16 vector registers of SSE/AVX2. With AVX-512's 32 registers the tile is
// 12 x 2 (24 accumulators); 8 and 14 rows measured the same on Zen 4. GELORA_TILE_MR overrides MR
// for such experiments.
#if defined(GELORA_TILE_MR)
constexpr int MR = GELORA_TILE_MR;
#elif GELORA_VBYTES == 64
constexpr int MR = 12;
#else
constexpr int MR = 6;
#endif
constexpr int NV = 2;

template <typename T>
inline T inf_of() {
  return (T)__builtin_inf();
}

inline int ctz64(uint64_t v) { return __builtin_ctzll(v); }

// Copies kn values of P rows (rows past `rows` are zero) into out[l][P]: a P x kn transposition
// through a small buffer, so the reads are whole cache lines and the writes contiguous.
template <typename T, int P, int KB>
inline void pack_block(const T* const* src, int64_t rows, int kn, T* __restrict o) {
  alignas(64) T buf[P][KB];
  for (int q = 0; q < P; ++q) {
    if (q < rows) {
      if (kn == KB)
        for (int l = 0; l < KB; ++l) buf[q][l] = src[q][l];
      else
        for (int l = 0; l < kn; ++l) buf[q][l] = src[q][l];
    } else {
      for (int l = 0; l < KB; ++l) buf[q][l] = T(0);
    }
  }
  if (kn == KB) {
    for (int l = 0; l < KB; ++l)
      for (int q = 0; q < P; ++q) o[l * P + q] = buf[q][l];
  } else {
    for (int l = 0; l < kn; ++l)
      for (int q = 0; q < P; ++q) o[l * P + q] = buf[q][l];
  }
}

// Packs rows [r0, r1) of the K range [k0, k0 + klen) into panels of P rows: out[panel][k][P];
// rows past r1 of the last panel are zero. Two cache lines of every row at a time (a row-by-row copy
// with strided stores ran at ~1.5 GB/s, this at ~5-8 on one Zen 4 core).
template <typename T, int P>
void pack_panels(const T* x, int64_t dim, int64_t r0, int64_t r1, int64_t k0, int64_t klen, T* out) {
  constexpr int KB = 128 / (int)sizeof(T);
  const int64_t npanels = (r1 - r0 + P - 1) / P;
  for (int64_t p = 0; p < npanels; ++p) {
    T* o = out + p * P * klen;
    const int64_t rb = r0 + p * P;
    const int64_t rows = (r1 - rb < P) ? (r1 - rb) : P;
    const T* src[P];
    for (int q = 0; q < P; ++q) src[q] = x + (rb + (q < rows ? q : 0)) * dim + k0;
    for (int64_t kb = 0; kb < klen; kb += KB) {
      const int kn = (klen - kb < KB) ? (int)(klen - kb) : KB;
      pack_block<T, P, KB>(src, rows, kn, o + kb * P);
      for (int q = 0; q < P; ++q) src[q] += KB;
    }
  }
}

template <typename T>
void pack_rows(const T* x, int64_t dim, int64_t r0, int64_t r1, int64_t k0, int64_t klen, T* out) {
  pack_panels<T, MR>(x, dim, r0, r1, k0, klen, out);
}

template <typename T>
void pack_cols(const T* x, int64_t dim, int64_t r0, int64_t r1, int64_t k0, int64_t klen, T* out) {
  pack_panels<T, NV * Simd<T>::W>(x, dim, r0, r1, k0, klen, out);
}

// acc[r][v] = sum_k a[k][r] * b[k][v*W .. v*W+W) over one K chunk.
template <typename T>
__attribute__((always_inline)) inline void micro_dot(int64_t klen, const T* __restrict a, const T* __restrict b,
                                                     typename Simd<T>::V (&acc)[MR][NV]) {
  typedef Simd<T> S;
  typedef typename S::V V;
  constexpr int W = S::W;
  constexpr int NR = NV * W;
#pragma GCC unroll 64
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = S::set1(T(0));
#pragma GCC unroll 2
  for (int64_t k = 0; k < klen; ++k) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const V*>(b + k * NR + v * W);
#pragma GCC unroll 64
    for (int r = 0; r < MR; ++r) {
      const V ar = S::set1(a[k * MR + r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = S::fma(ar, bv[v], acc[r][v]);
    }
  }
}

// The fused epilogue of one register tile (rows i0.., columns j0..): distances from the dot products,
// diagonal exclusion, then offers to the row lists and to the column lists.
template <typename T>
__attribute__((always_inline)) inline void epilogue(const TileArgs<T>& t, int64_t i0, int64_t j0,
                                                    typename Simd<T>::V (&acc)[MR][NV]) {
  typedef Simd<T> S;
  typedef typename S::V V;
  typedef typename S::VU VU;
  constexpr int W = S::W;
  constexpr int NR = NV * W;
  alignas(64) T dbuf[MR][NR];
  V sqj[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) sqj[v] = *reinterpret_cast<const VU*>(t.sq + j0 + v * W);
  const V m2 = S::set1(T(-2));
#pragma GCC unroll 64
  for (int r = 0; r < MR; ++r) {
    const V si = S::set1(t.sq[i0 + r]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = S::fma(acc[r][v], m2, si + sqj[v]);
      *reinterpret_cast<V*>(&dbuf[r][v * W]) = acc[r][v];
    }
  }
  if (t.diagonal && j0 < i0 + MR) {
    // the tile straddles the diagonal: keep only j > i (this is also what excludes i == j)
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NR; ++c)
        if (j0 + c <= i0 + r) dbuf[r][c] = inf_of<T>();
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = *reinterpret_cast<const V*>(&dbuf[r][v * W]);
  }
  // row lists: j is a candidate of i
#pragma GCC unroll 64
  for (int r = 0; r < MR; ++r) {
    const V th = S::set1(t.rows.thr[i0 + r - t.rows.base]);
    uint64_t bits = 0;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bits |= S::lt(acc[r][v], th) << (v * W);
    while (bits) {
      const int c = ctz64(bits);
      bits &= bits - 1;
      topk_insert(t.rows, i0 + r, dbuf[r][c], j0 + c);
    }
  }
  // column lists: i is a candidate of j
  V thc[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) thc[v] = *reinterpret_cast<const VU*>(t.cols.thr + (j0 - t.cols.base) + v * W);
  // per-row masks of the columns that row passes, so a column is offered only the rows below its
  // threshold (offering all MR rows of a passing column cost ~3 failed offers per insertion at k = 64,
  // each an unpredictable branch); rows in ascending order, as before, so ties resolve the same way
  uint64_t rbits[MR];
  uint64_t cbits = 0;
#pragma GCC unroll 64
  for (int r = 0; r < MR; ++r) {
    rbits[r] = 0;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) rbits[r] |= S::lt(acc[r][v], thc[v]) << (v * W);
    cbits |= rbits[r];
  }
  while (cbits) {
    const int c = ctz64(cbits);
    cbits &= cbits - 1;
    uint32_t rows = 0;
#pragma GCC unroll 64
    for (int r = 0; r < MR; ++r) rows |= (uint32_t)((rbits[r] >> c) & 1u) << r;
    while (rows) {
      const int r = __builtin_ctz(rows);
      rows &= rows - 1;
      topk_insert(t.cols, j0 + c, dbuf[r][c], i0 + r);
    }
  }
}

template <typename T>
void run_tile(const TileArgs<T>& t) {
  typedef Simd<T> S;
  typedef typename S::V V;
  constexpr int W = S::W;
  constexpr int NR = NV * W;
  const int64_t dim = t.dim, kcb = t.kc_blk;
  const int64_t nk = (dim + kcb - 1) / kcb;
  const int64_t nir = (t.i1 - t.i0 + MR - 1) / MR;
  const int64_t njr = (t.j1 - t.j0 + NR - 1) / NR;
  for (int64_t pc = 0; pc < nk; ++pc) {
    const int64_t k0 = pc * kcb;
    const int64_t klen = (dim - k0 < kcb) ? (dim - k0) : kcb;
    const bool first = pc == 0, last = pc == nk - 1;
    const T* b_chunk;
    if (t.b_pre) {
      b_chunk = t.b_pre + pc * t.b_stride + (t.j0 / NR) * NR * klen;
    } else {
      pack_panels<T, NR>(t.x, dim, t.j0, t.j1, k0, klen, t.b_pack);
      b_chunk = t.b_pack;
    }
    const T* a_chunk = t.a_pack + pc * nir * MR * kcb;
    for (int64_t jr = 0; jr < njr; ++jr) {
      const int64_t jj0 = t.j0 + jr * NR;
      const T* bp = b_chunk + jr * NR * klen;
      int64_t ir_end = nir;
      if (t.diagonal) {
        // register tiles with every j <= i carry no pair: stop before the first of them
        const int64_t lim = (jj0 + NR - 1 - t.i0 + MR - 1) / MR;  // first ir with i0' >= jj0 + NR - 1
        if (lim < ir_end) ir_end = lim;
      }
      for (int64_t ir = 0; ir < ir_end; ++ir) {
        const int64_t ii0 = t.i0 + ir * MR;
        V acc[MR][NV];
        micro_dot<T>(klen, a_chunk + ir * MR * klen, bp, acc);
        T* cb = t.c_buf + (ir * njr + jr) * (MR * NR);
        if (!first) {
#pragma GCC unroll 64
          for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[r][v] += *reinterpret_cast<const V*>(cb + r * NR + v * W);
        }
        if (!last) {
#pragma GCC unroll 64
          for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(cb + r * NR + v * W) = acc[r][v];
        } else {
          epilogue<T>(t, ii0, jj0, acc);
        }
      }
    }
  }
}

const TileKernel<float> kernel_f32 = {GELORA_STR(GELORA_ISA), MR, NV * Simd<float>::W, &pack_rows<float>,
                                      &pack_cols<float>, &run_tile<float>};
const TileKernel<double> kernel_f64 = {GELORA_STR(GELORA_ISA), MR, NV * Simd<double>::W, &pack_rows<double>,
                                       &pack_cols<double>, &run_tile<double>};

}  // namespace GELORA_ISA
}  // namespace gelora
