// k nearest-neighbour candidates of a point set with itself, on symmetric distance tiles.
#pragma once

#include <cstdint>
#include <string>

namespace gelora {

struct KnnOptions {
  int n_threads = 0;          // 0: OpenMP's default
  std::string isa = "auto";   // tile kernel: "auto", "avx512", "avx2", "generic"
  int64_t block_rows = 0;     // rows per phase (0: from the cache sizes); rounded up to lcm(mr, nr)
  int64_t block_cols = 0;     // columns per task (0: default); rounded up to a multiple of nr
  int64_t depth = 0;          // K chunk length (0: default)
  int prepack = -1;           // pack all rows for the column side once: 1 yes, 0 no (pack per task),
                              // -1 when the packed copy takes at most PREPACK_MAX_BYTES
  int private_lists = -1;     // per-thread lists of all rows, no phases: 1 yes, 0 no (phased),
                              // -1 when the extra lists take at most PRIVATE_LISTS_MAX_BYTES
};

struct KnnPlan {              // what a call actually used (for info and tuning)
  std::string isa;
  int mr = 0, nr = 0, threads = 0;
  int64_t block_rows = 0, block_cols = 0, depth = 0;
  bool prepack = false;
  bool private_lists = false;
};

// For every row i of x (n, dim), row-major, the kc smallest approximate squared distances
// |x_i|^2 + |x_j|^2 - 2<x_i, x_j> over j != i, ascending, and their indices.
//
// Work plan: the rows are cut into blocks of block_rows rows I; the columns j >= i0 of a block into
// tasks, its diagonal block J = I and then strips. A tile offers each pair (i, j), i < j, to the lists
// of both i and j, so the offers of one tile touch rows that other tasks touch too. Two ways to keep
// that free of races, without atomics or locks:
//  * private lists (the default when they fit in PRIVATE_LISTS_MAX_BYTES): every thread has its own
//    lists of all rows, takes any tile task (dynamic schedule) and the lists are merged at the end.
//    One barrier in all, which matters on a shared machine: a thread that waits at a barrier for a
//    descheduled one wastes its time slice.
//  * phased (for many threads times many rows): the blocks are processed one after the other; the
//    lists of the rows of J belong to the one thread that has the task, those of I go to small
//    per-thread (block_rows, kc) buffers that are merged during the next phase, whose loop also packs
//    the next row block (buffers alternate by phase parity): one barrier per phase.
// The column side reads every row once per row block; packing all rows once up front (one extra copy
// of x) instead of once per task saved ~4% at 4096 x 768 on one Zen 4 core, so it is done when the
// copy is not too large.
//
// Args:
//   x: (n, dim) points; sq_out: (n) squared norms (computed here, in T);
//   out_d2: (n, kc) distances; out_idx: (n, kc) indices.
// Throws std::invalid_argument for bad sizes and std::domain_error when a squared norm is not finite
// or above max(T) / 4 (NaN/Inf input, or values so large that squared distances would overflow T).
template <typename T>
KnnPlan symmetric_knn(const T* x, int64_t n, int64_t dim, int64_t kc, const KnnOptions& opt, T* out_d2,
                      int64_t* out_idx, T* sq_out);

}  // namespace gelora
