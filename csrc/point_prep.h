// One-pass preparation of a point set on the CPU: finiteness, a row hash for duplicate detection, the
// float64 column mean, and the centring itself (the O(N D) steps around the kNN search).
#pragma once

#include <cstdint>

namespace gelora {

// One pass over x (n, dim), row-major:
//   n_nonfinite: rows with a NaN or Inf;
//   hash_out (n) if not null: h_i = sum_k bits(x[i, k] + 0) * coef[k] wrapping modulo 2^64, where
//     bits() is the IEEE bit pattern as a signed integer of the width of T (+0 makes -0.0 equal to 0.0);
//     equal rows get equal hashes (coef: (dim) odd random integers);
//   mean_out (dim) if not null: the column means, accumulated in double.
template <typename T>
void prepare_points(const T* x, int64_t n, int64_t dim, const int64_t* coef, int n_threads, int64_t* hash_out,
                    double* mean_out, int64_t* n_nonfinite);

// out[i, k] = x[i, k] - T(mean[k]) (the subtraction rounded once, in T; out may be x itself).
template <typename T>
void centre_points(const T* x, int64_t n, int64_t dim, const double* mean, int n_threads, T* out);

}  // namespace gelora
