#include "direct_dist.h"

#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gelora {

namespace {

constexpr int LANES = 16;
// Candidates of a row that the visiting order follows (see visit_order), and the most rows its stack
// holds (512 KiB; beyond it a row's candidates are not queued and the order only loses some locality,
// so the extra memory does not grow with the number of rows).
constexpr int64_t ORDER_FANOUT = 4;
constexpr size_t ORDER_STACK_MAX = size_t(1) << 16;

// The loop is memory-bound on the candidate rows (each a random row of x) once it is vectorised, so an
// x86 build also gets an AVX2/FMA clone, chosen at load time by the CPU (GCC/Clang function
// multiversioning); the 16 partial sums are the same either way, only FMA contracts their updates.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GELORA_DIST_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GELORA_DIST_CLONES
#endif

template <typename T>
GELORA_DIST_CLONES T sq_dist(const T* a, const T* b, int64_t dim) {
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

template <typename T>
inline void prefetch_row(const T* p, int64_t dim) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < dim * (int64_t)sizeof(T); off += 64) __builtin_prefetch(c + off);
}

// A visiting order of the rows in which consecutive rows are near each other: depth-first along the
// first ORDER_FANOUT candidates of each row (the candidates of a near-neighbour search are near). Rows
// near each other share most candidates, so in this order the candidate rows a thread gathers are
// mostly still in its caches; in index order (random for most data) every gather goes to memory.
// Measured at 20k x 768, 68 candidates: 0.56 -> 0.37 s on one core from the order alone.
std::vector<int64_t> visit_order(const int64_t* cand, int64_t m, int64_t c) {
  std::vector<int64_t> order;
  order.reserve(m);
  std::vector<char> seen(m, 0);
  std::vector<int64_t> stack;
  const int64_t fan = c < ORDER_FANOUT ? c : ORDER_FANOUT;
  for (int64_t s = 0; s < m; ++s) {
    if (seen[s]) continue;
    stack.push_back(s);
    while (!stack.empty()) {
      const int64_t i = stack.back();
      stack.pop_back();
      if (seen[i]) continue;
      seen[i] = 1;
      order.push_back(i);
      for (int64_t j = fan - 1; j >= 0; --j) {  // the nearest candidate is visited next
        const int64_t q = cand[i * c + j];
        if (q < m && !seen[q] && stack.size() < ORDER_STACK_MAX) stack.push_back(q);
      }
    }
  }
  return order;
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
  const std::vector<int64_t> order = visit_order(cand, m, c);
  // static chunks of the order: each thread walks its own coherent region
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < m; ++p) {
    const int64_t i = order[p];
    const int64_t* ci = cand + i * c;
    for (int64_t j = 0; j < c; ++j) {
      if (j + 1 < c) prefetch_row(x + ci[j + 1] * dim, dim);
      out[i * c + j] = sq_dist(x + i * dim, x + ci[j] * dim, dim);
    }
  }
}

template void direct_sq_dist<float>(const float*, int64_t, int64_t, const int64_t*, int64_t, int64_t, int, float*);
template void direct_sq_dist<double>(const double*, int64_t, int64_t, const int64_t*, int64_t, int64_t, int,
                                     double*);

}  // namespace gelora
