// Per-row candidate lists: the kc smallest (squared distance, index) pairs seen so far.
//
// Two layouts, chosen by kc (the same for every list of a search):
//  * kc <= SORTED_MAX_KC: kept sorted ascending; an insertion shifts the larger entries up. For the
//    few candidates of TwoNN (kc = 4) nothing is cheaper.
//  * kc > SORTED_MAX_KC: a binary max-heap on (distance, index), the root the largest. An insertion
//    replaces the root and sifts it down in O(log kc) instead of shifting O(kc) entries, which at
//    kc = 66 cost 1.6x the whole search on 8000 x 576 and 9x on points offered in descending order
//    (one Zen 4 core). topk_finish sorts a heap ascending (heapsort, in place) once at the end.
// Either way thr[r] mirrors the list's largest distance (+inf while it is not full), which is what the
// tile kernels compare against, and an offer enters only when strictly below it.
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

// Largest kc kept as a sorted list; above it the lists are heaps. At 8000 x 576 (one Zen 4 core) the
// two cost the same at kc = 19 (k = 17), the sorted list ~3% less at kc = 4.
constexpr int64_t SORTED_MAX_KC = 16;

// Row `r` (absolute index) owns d[(r - base) * kc ... + kc) and idx[...]; thr[r - base] mirrors the
// largest distance of the list, +inf while the list is not full. Empty slots hold (+inf, -1).
template <typename T>
struct TopkLists {
  T* d;
  int64_t* idx;
  T* thr;
  int64_t base;
  int64_t kc;
};

namespace GELORA_ISA {

// (da, ia) after (db, ib) in the heap order: by distance, then by index, so that equal distances come
// out ascending by index. Which of several distances equal to a full list's largest stay in it still
// depends on the order of the offers (an offer must be strictly below the threshold), as with the
// sorted lists.
template <typename T>
inline bool heap_after(T da, int64_t ia, T db, int64_t ib) {
  return da > db || (da == db && ia > ib);
}

// Puts (dv, id) at the root of the max-heap d/ix of `size` entries and sifts it down. The larger child
// is chosen by flag arithmetic on the distances (which child is larger is a coin flip the branch
// predictor loses half of the time) and the indices are read only on a tie (rare), so a level costs
// the loads of two distances: at k = 64 the lists do not fit in the caches and the sift-down, with
// branches and index loads, was ~18% of a 20k x 768 search.
template <typename T>
inline void heap_sift_root(T* d, int64_t* ix, int64_t size, T dv, int64_t id) {
  int64_t p = 0;
  const int64_t pairs_end = (size - 1) / 2;  // nodes below it have two children
  for (;;) {
    int64_t c = 2 * p + 1;
    if (p < pairs_end) {
      const T dl = d[c], dr = d[c + 1];
      if (__builtin_expect(dl == dr, 0))
        c += (int64_t)(ix[c + 1] > ix[c]);
      else
        c += (int64_t)(dr > dl);
    } else if (c >= size) {
      break;
    }
    if (!heap_after(d[c], ix[c], dv, id)) break;
    d[p] = d[c];
    ix[p] = ix[c];
    p = c;
  }
  d[p] = dv;
  ix[p] = id;
}

// Inserts (dv, id) into the list of `row` when dv is strictly below the current kc-th distance.
// Sorted lists keep equal distances in the order they came (stable).
template <typename T>
inline void topk_insert(const TopkLists<T>& L, int64_t row, T dv, int64_t id) {
  const int64_t off = row - L.base;
  if (!(dv < L.thr[off])) return;
  T* d = L.d + off * L.kc;
  int64_t* ix = L.idx + off * L.kc;
  if (L.kc > SORTED_MAX_KC) {
    heap_sift_root(d, ix, L.kc, dv, id);
    L.thr[off] = d[0];
    return;
  }
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

// Leaves the list of `row` sorted ascending (by distance, then index), empty slots last; a no-op for
// sorted lists. The list is no longer a heap afterwards: call it once, after the last insertion.
template <typename T>
inline void topk_finish(const TopkLists<T>& L, int64_t row) {
  if (L.kc <= SORTED_MAX_KC) return;
  const int64_t off = row - L.base;
  T* d = L.d + off * L.kc;
  int64_t* ix = L.idx + off * L.kc;
  for (int64_t end = L.kc - 1; end > 0; --end) {
    const T dv = d[end];
    const int64_t id = ix[end];
    d[end] = d[0];
    ix[end] = ix[0];
    heap_sift_root(d, ix, end, dv, id);
  }
}

}  // namespace GELORA_ISA
}  // namespace gelora
