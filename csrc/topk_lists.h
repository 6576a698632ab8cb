// Per-row candidate lists: the kc smallest (squared distance, index) pairs seen so far, kept sorted.
//
// Header-only because both the tile kernels (compiled once per instruction set) and the engine use the
// insertion. Everything with code lives in the namespace GELORA_ISA, which each translation unit sets
// to its instruction set, so an AVX-512 copy of an inline function can never be linked into the
// baseline code path.
#pragma once

#include <cstdint>

#ifndef GELORA_ISA
#define GELORA_ISA base
#endif

namespace gelora {

// Row `r` (absolute index) owns d[(r - base) * kc ... + kc) and idx[...], ascending by distance;
// thr[r - base] mirrors the last (largest) distance, +inf while the list is not full.
template <typename T>
struct TopkLists {
  T* d;
  int64_t* idx;
  T* thr;
  int64_t base;
  int64_t kc;
};

namespace GELORA_ISA {

// Inserts (dv, id) into the list of `row` when dv is strictly below the current kc-th distance.
// Equal distances keep the earlier entry first (stable).
template <typename T>
inline void topk_insert(const TopkLists<T>& L, int64_t row, T dv, int64_t id) {
  const int64_t off = row - L.base;
  if (!(dv < L.thr[off])) return;
  T* d = L.d + off * L.kc;
  int64_t* ix = L.idx + off * L.kc;
  int64_t p = L.kc - 1;
  while (p > 0 && d[p - 1] > dv) {
    d[p] = d[p - 1];
    ix[p] = ix[p - 1];
    --p;
  }
  d[p] = dv;
  ix[p] = id;
  L.thr[off] = d[L.kc - 1];
}

}  // namespace GELORA_ISA
}  // namespace gelora
