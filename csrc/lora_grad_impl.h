// Body of the LoRA weight-gradient kernel (see lora_grad.h), compiled once per instruction set.
//
// Included only by lora_grad_<isa>.cpp, which define GELORA_ISA (the namespace) and GELORA_VBYTES
// (the vector width in bytes) and are compiled with the matching -m flags.
//
// Two register tiles do all the work, both FMA-bound from L1/L2:
//   rows: out(mb, rp) = X(mb, K) P(K, rp): 8 tokens x one vector of ranks; per step one vector load of
//         P and 8 broadcast FMAs (S = X (sA)^T, T = dY (sB)).
//   cols: Acc(rp, K) += T^T(rp, mb) X(mb, K): JB ranks x 3 vectors of features; per token 3 vector
//         loads and 3 JB broadcast FMAs (dA += T^T x, dB^T += S^T dY).
// Measured at m = 2048, k = n = 1024, r = 16, 2 Zen 4 cores, AVX-512: 1.35 ms for S, T, dA and dB
// together (~200 GFLOP/s), against 2.5 ms for the same four products as MKL sgemm calls.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "lora_grad.h"
#include "simd_impl.h"

namespace gelora {
namespace GELORA_ISA {
namespace {

typedef Simd<float>::V V;
typedef Simd<float>::VU VU;
constexpr int W = Simd<float>::W;        // lanes
constexpr int RB = 8;                     // tokens per rows tile
constexpr int JB = GELORA_VBYTES == 64 ? 8 : 4;  // ranks per cols tile (32 vs 16 vector registers)
constexpr int NV = 3;                     // feature vectors per cols tile
static_assert(W % JB == 0, "rank padding must be a multiple of the cols tile");
// Summation depth. Each rows tile sums chunks of KCHUNK features in registers and then adds the
// chunk sums; each cols tile sums one token block from zero and then adds it to the partial sums.
// Two-level sums keep the rounding error near a BLAS's (a plain running sum over 1024 features or
// 2048 tokens was 3x less accurate than MKL at m = 2048, k = n = 1024).
constexpr int64_t KCHUNK = 128;

inline V load(const float* p) { return *reinterpret_cast<const VU*>(p); }
inline void store(float* p, V v) { *reinterpret_cast<VU*>(p) = v; }
inline V set1(float s) { return Simd<float>::set1(s); }
inline V fma(V a, V b, V c) { return Simd<float>::fma(a, b, c); }

// out (mb, rp) = X (mb rows of stride ldx, kk features) @ P (kk, rp); rp a multiple of W.
void rows(const float* X, int64_t ldx, int64_t mb, int64_t kk, const float* P, int64_t rp, float* out) {
  for (int64_t c = 0; c < rp; c += W) {
    int64_t i = 0;
    for (; i + RB <= mb; i += RB) {
      V tot[RB];
      for (int u = 0; u < RB; ++u) tot[u] = set1(0.f);
      const float* xr = X + i * ldx;
      for (int64_t q0 = 0; q0 < kk; q0 += KCHUNK) {
        const int64_t q1 = std::min(kk, q0 + KCHUNK);
        V acc[RB];
        for (int u = 0; u < RB; ++u) acc[u] = set1(0.f);
        for (int64_t q = q0; q < q1; ++q) {
          const V p = load(P + q * rp + c);
#pragma GCC unroll 8
          for (int u = 0; u < RB; ++u) acc[u] = fma(set1(xr[u * ldx + q]), p, acc[u]);
        }
        for (int u = 0; u < RB; ++u) tot[u] += acc[u];
      }
      for (int u = 0; u < RB; ++u) store(out + (i + u) * rp + c, tot[u]);
    }
    for (; i < mb; ++i) {
      V tot = set1(0.f);
      const float* xr = X + i * ldx;
      for (int64_t q0 = 0; q0 < kk; q0 += KCHUNK) {
        const int64_t q1 = std::min(kk, q0 + KCHUNK);
        V acc = set1(0.f);
        for (int64_t q = q0; q < q1; ++q) acc = fma(set1(xr[q]), load(P + q * rp + c), acc);
        tot += acc;
      }
      store(out + i * rp + c, tot);
    }
  }
}

// Acc[j, c..c+NVV*W) += sum_i T[i, j] X[i, c..] for j < jn (jn a multiple of JB); Acc rows of stride ldp.
template <int NVV>
inline void cols_panel(const float* X, int64_t ldx, int64_t mb, const float* T, int64_t rp, int64_t jn,
                       float* acc_mem, int64_t ldp, int64_t c) {
  for (int64_t j = 0; j < jn; j += JB) {
    V acc[JB][NVV];
    for (int u = 0; u < JB; ++u)
      for (int v = 0; v < NVV; ++v) acc[u][v] = set1(0.f);
    for (int64_t i = 0; i < mb; ++i) {
      const float* xr = X + i * ldx + c;
      V xv[NVV];
      for (int v = 0; v < NVV; ++v) xv[v] = load(xr + v * W);
      const float* tr = T + i * rp + j;
#pragma GCC unroll 8
      for (int u = 0; u < JB; ++u) {
        const V t = set1(tr[u]);
        for (int v = 0; v < NVV; ++v) acc[u][v] = fma(t, xv[v], acc[u][v]);
      }
    }
    for (int u = 0; u < JB; ++u)
      for (int v = 0; v < NVV; ++v) {
        float* p = acc_mem + (j + u) * ldp + c + v * W;
        store(p, load(p) + acc[u][v]);
      }
  }
}

void cols(const float* X, int64_t ldx, int64_t mb, int64_t kk, const float* T, int64_t rp, int64_t jn,
          float* acc_mem, int64_t ldp) {
  int64_t c = 0;
  for (; c + NV * W <= kk; c += NV * W) cols_panel<NV>(X, ldx, mb, T, rp, jn, acc_mem, ldp, c);
  for (; c + W <= kk; c += W) cols_panel<1>(X, ldx, mb, T, rp, jn, acc_mem, ldp, c);
  for (; c < kk; ++c)  // fewer than W features left: scalar
    for (int64_t j = 0; j < jn; ++j) {
      float s = 0.f;
      for (int64_t i = 0; i < mb; ++i) s += T[i * rp + j] * X[i * ldx + c];
      acc_mem[j * ldp + c] += s;
    }
}

}  // namespace

LoraGradPlan lora_grad(const LoraGradArgs& g) {
  const int64_t m = g.m, k = g.k, n = g.n, r = g.r;
  const int64_t rp = (r + W - 1) / W * W;    // padded rank of the rows tiles
  const int64_t jn = (r + JB - 1) / JB * JB;  // ranks the cols tiles visit
  // s A^T (k, rp) and s B (n, rp), zero columns past r: the rows tiles read whole vectors of ranks
  std::vector<float> at(static_cast<size_t>(k * rp), 0.f), bs(static_cast<size_t>(n * rp), 0.f);
  for (int64_t j = 0; j < r; ++j)
    for (int64_t q = 0; q < k; ++q) at[q * rp + j] = g.scaling * g.a[j * k + q];
  for (int64_t q = 0; q < n; ++q)
    for (int64_t j = 0; j < r; ++j) bs[q * rp + j] = g.scaling * g.b[q * r + j];

  // Token block: its rows of x and dY (4 (k + n) bytes each) stay in 1 MiB of L2 between the rows pass
  // that reads them and the cols pass that reads them again (k = n = 1024: 128 tokens; 64 to 256
  // measured within 5 % of each other on Zen 4, 16 was 25 % slower).
  int64_t mb = g.block_rows;
  if (mb <= 0) mb = std::min<int64_t>(256, std::max<int64_t>(16, ((1 << 20) / (4 * (k + n))) / RB * RB));
  const int64_t nblocks = m > 0 ? (m + mb - 1) / mb : 0;
  int64_t nt = 1;
#ifdef _OPENMP
  nt = g.n_threads > 0 ? g.n_threads : omp_get_max_threads();
  if (g.n_threads <= 0) {
    // automatic: a thread per ~4 MFLOP at least; below that, waking the team costs more than it saves
    // (and on a busy machine every parallel region waits for its slowest, possibly descheduled, thread)
    const double flops = 4.0 * static_cast<double>(m) * static_cast<double>(k + n) * static_cast<double>(jn);
    nt = std::min<int64_t>(nt, static_cast<int64_t>(flops / 4e6) + 1);
  }
#endif
  nt = std::max<int64_t>(1, std::min<int64_t>(nt, nblocks));

  // per-thread partial sums: dA rows (jn, k) then dB^T rows (jn, n)
  const int64_t part_len = jn * (k + n);
  std::vector<float> part(static_cast<size_t>(nt * part_len), 0.f);
  const int nthreads = static_cast<int>(nt);

  // one parallel region: the token blocks, a barrier, then the sum of the partials
  // (dA = sum of the dA partials; dB = (sum of the dB^T partials)^T)
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    float* pa = part.data() + tid * part_len;
    float* pb = pa + jn * k;
    std::vector<float> sbuf(static_cast<size_t>(mb * rp)), tbuf(static_cast<size_t>(mb * rp));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t i0 = blk * mb, cur = std::min(mb, m - i0);
      const float* xb = g.x + i0 * k;
      const float* yb = g.dy + i0 * n;
      rows(xb, k, cur, k, at.data(), rp, sbuf.data());  // S = s x A^T
      rows(yb, n, cur, n, bs.data(), rp, tbuf.data());  // T = s dY B
      if (g.t != nullptr)
        for (int64_t i = 0; i < cur; ++i)
          std::memcpy(g.t + (i0 + i) * r, tbuf.data() + i * rp, sizeof(float) * r);
      cols(xb, k, cur, k, tbuf.data(), rp, jn, pa, k);  // dA += T^T x
      cols(yb, n, cur, n, sbuf.data(), rp, jn, pb, n);  // dB^T += S^T dY
    }  // implicit barrier: every partial is complete
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
#endif
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t q = 0; q < k; ++q) {
        float s = 0.f;
        for (int64_t t = 0; t < nt; ++t) s += part[t * part_len + j * k + q];
        g.da[j * k + q] = s;
      }
    }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t q = 0; q < n; ++q) {
      for (int64_t j = 0; j < r; ++j) {
        float s = 0.f;
        for (int64_t t = 0; t < nt; ++t) s += part[t * part_len + jn * k + j * n + q];
        g.db[q * r + j] = s;
      }
    }
  }

  LoraGradPlan plan;
  plan.isa = GELORA_STR(GELORA_ISA);
  plan.threads = nthreads;
  plan.block_rows = mb;
  plan.rank_pad = rp;
  return plan;
}

LoraGradPlan lora_shrink(const LoraShrinkArgs& g) {
  const int64_t m = g.m, k = g.k, r = g.r;
  const int64_t rp = (r + W - 1) / W * W;
  std::vector<float> at(static_cast<size_t>(k * rp), 0.f);
  for (int64_t j = 0; j < r; ++j)
    for (int64_t q = 0; q < k; ++q) at[q * rp + j] = g.scale[j] * g.a[j * k + q];
  const int64_t mb = 64;
  const int64_t nblocks = m > 0 ? (m + mb - 1) / mb : 0;
  int64_t nt = 1;
#ifdef _OPENMP
  nt = g.n_threads > 0 ? g.n_threads : omp_get_max_threads();
  if (g.n_threads <= 0)  // a thread per ~4 MFLOP at least (see lora_grad)
    nt = std::min<int64_t>(nt, static_cast<int64_t>(2.0 * m * k * rp / 4e6) + 1);
#endif
  nt = std::max<int64_t>(1, std::min<int64_t>(nt, nblocks));
  const int nthreads = static_cast<int>(nt);
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
  {
    std::vector<float> buf(static_cast<size_t>(rp == r ? 0 : mb * rp));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t i0 = blk * mb, cur = std::min(mb, m - i0);
      if (rp == r) {  // no padding: straight into the output
        rows(g.x + i0 * k, k, cur, k, at.data(), rp, g.out + i0 * r);
      } else {
        rows(g.x + i0 * k, k, cur, k, at.data(), rp, buf.data());
        for (int64_t i = 0; i < cur; ++i)
          std::memcpy(g.out + (i0 + i) * r, buf.data() + i * rp, sizeof(float) * r);
      }
    }
  }
  LoraGradPlan plan;
  plan.isa = GELORA_STR(GELORA_ISA);
  plan.threads = nthreads;
  plan.block_rows = mb;
  plan.rank_pad = rp;
  return plan;
}

}  // namespace GELORA_ISA
}  // namespace gelora
