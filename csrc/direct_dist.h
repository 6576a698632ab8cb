// Direct squared distances between rows and their candidates: the exact re-rank step.
#pragma once

#include <cstdint>

namespace gelora {

// out[i, j] = sum_k (x[i, k] - x[cand[i, j], k])^2 for i < m, j < c, accumulated in T with 16 partial
// sums (no |x|^2 + |y|^2 - 2<x, y> shortcut, so equal rows give exactly 0).
// Throws std::out_of_range when a candidate index is outside [0, n).
template <typename T>
void direct_sq_dist(const T* x, int64_t n, int64_t dim, const int64_t* cand, int64_t m, int64_t c, int n_threads,
                    T* out);

}  // namespace gelora
