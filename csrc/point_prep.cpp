#include "point_prep.h"

#include <cmath>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gelora {

namespace {

// Elements per thread below which a memory-bound pass stays on fewer threads: at 4096 x 768 one thread
// beat two (1-3 ms against 6-8) on a 2-core Zen 4 box shared with other jobs, where an OpenMP region
// that waits for a descheduled thread costs more than the pass itself.
constexpr int64_t GRAIN = int64_t(1) << 23;

int resolve_threads(int n_threads, int64_t work) {
#ifdef _OPENMP
  if (n_threads <= 0) n_threads = omp_get_max_threads();
#else
  n_threads = 1;
#endif
  const int64_t useful = (work + GRAIN - 1) / GRAIN;
  if (useful < n_threads) n_threads = (int)useful;
  return n_threads < 1 ? 1 : n_threads;
}

template <typename T>
struct Bits;
template <>
struct Bits<float> {
  static int64_t of(float v) {
    int32_t b;
    std::memcpy(&b, &v, sizeof b);
    return b;
  }
};
template <>
struct Bits<double> {
  static int64_t of(double v) {
    int64_t b;
    std::memcpy(&b, &v, sizeof b);
    return b;
  }
};

}  // namespace

template <typename T>
void prepare_points(const T* x, int64_t n, int64_t dim, const int64_t* coef, int n_threads, int64_t* hash_out,
                    double* mean_out, int64_t* n_nonfinite) {
  const int threads = resolve_threads(n_threads, n * dim);
  std::vector<double> sums(mean_out ? (size_t)threads * (size_t)dim : 0, 0.0);
  int64_t bad = 0;
#pragma omp parallel num_threads(threads) reduction(+ : bad)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    double* my = mean_out ? sums.data() + (size_t)tid * (size_t)dim : nullptr;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const T* xi = x + i * dim;
      bool finite = true;
      for (int64_t k = 0; k < dim; ++k) finite &= std::isfinite(xi[k]);
      bad += !finite;
      if (hash_out) {
        uint64_t h = 0;
        for (int64_t k = 0; k < dim; ++k) h += (uint64_t)Bits<T>::of(xi[k] + T(0)) * (uint64_t)coef[k];
        hash_out[i] = (int64_t)h;
      }
      if (my)
        for (int64_t k = 0; k < dim; ++k) my[k] += (double)xi[k];
    }
  }
  if (mean_out) {
    for (int64_t k = 0; k < dim; ++k) {
      double s = 0;
      for (int t = 0; t < threads; ++t) s += sums[(size_t)t * (size_t)dim + (size_t)k];
      mean_out[k] = s / (double)n;
    }
  }
  *n_nonfinite = bad;
}

template <typename T>
void centre_points(const T* x, int64_t n, int64_t dim, const double* mean, int n_threads, T* out) {
  const int threads = resolve_threads(n_threads, n * dim);
  std::vector<T> m(dim);
  for (int64_t k = 0; k < dim; ++k) m[k] = (T)mean[k];
  const T* mp = m.data();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < dim; ++k) out[i * dim + k] = x[i * dim + k] - mp[k];
}

template void prepare_points<float>(const float*, int64_t, int64_t, const int64_t*, int, int64_t*, double*, int64_t*);
template void prepare_points<double>(const double*, int64_t, int64_t, const int64_t*, int, int64_t*, double*,
                                     int64_t*);
template void centre_points<float>(const float*, int64_t, int64_t, const double*, int, float*);
template void centre_points<double>(const double*, int64_t, int64_t, const double*, int, double*);

}  // namespace gelora
