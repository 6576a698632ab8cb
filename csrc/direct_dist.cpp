#include "direct_dist.h"

#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gelora {

namespace {

constexpr int LANES = 16;

template <typename T>
T sq_dist(const T* a, const T* b, int64_t dim) {
  T acc[LANES] = {};
  int64_t k = 0;
  for (; k + LANES <= dim; k += LANES)
    for (int l = 0; l < LANES; ++l) {
      const T d = a[k + l] - b[k + l];
      acc[l] += d * d;
    }
  for (int l = 0; k < dim; ++k, ++l) {
    const T d = a[k] - b[k];
    acc[l] += d * d;
  }
  T s = 0;
  for (int l = 0; l < LANES; ++l) s += acc[l];
  return s;
}

}  // namespace

template <typename T>
void direct_sq_dist(const T* x, int64_t n, int64_t dim, const int64_t* cand, int64_t m, int64_t c, int n_threads,
                    T* out) {
  for (int64_t e = 0; e < m * c; ++e)
    if (cand[e] < 0 || cand[e] >= n)
      throw std::out_of_range("cand[" + std::to_string(e / c) + ", " + std::to_string(e % c) + "] = " +
                              std::to_string(cand[e]) + " is not a row of x (n = " + std::to_string(n) + ")");
  int threads = n_threads;
#ifdef _OPENMP
  if (threads <= 0) threads = omp_get_max_threads();
#endif
  // a memory-bound pass: no more threads than 8M elements each (see point_prep.cpp)
  const int64_t useful = (m * c * dim + (int64_t(1) << 23) - 1) >> 23;
  if (useful < threads) threads = (int)useful;
  if (threads < 1) threads = 1;
  (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < c; ++j) out[i * c + j] = sq_dist(x + i * dim, x + cand[i * c + j] * dim, dim);
}

template void direct_sq_dist<float>(const float*, int64_t, int64_t, const int64_t*, int64_t, int64_t, int, float*);
template void direct_sq_dist<double>(const double*, int64_t, int64_t, const int64_t*, int64_t, int64_t, int,
                                     double*);

}  // namespace gelora
