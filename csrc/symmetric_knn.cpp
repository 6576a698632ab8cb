#include "symmetric_knn.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "tile_kernel.h"
#include "topk_lists.h"

namespace gelora {

namespace {

// Cache budgets of the blocking (bytes). Measured on a 2-core AMD EPYC (Zen 4, 32 KiB L1d, 1 MiB L2):
// the column panel (nr x depth) takes half of L1, the packed row block (block_rows x depth) half of L2.
constexpr int64_t L1_PANEL_BYTES = 16 << 10;
constexpr int64_t L2_BLOCK_BYTES = 512 << 10;
constexpr int64_t DEFAULT_BLOCK_COLS = 512;
// Largest extra copy of x that the automatic column prepacking may allocate.
constexpr int64_t PREPACK_MAX_BYTES = int64_t(1) << 30;
// Largest extra memory for per-thread candidate lists of all rows (beyond the shared ones).
constexpr int64_t PRIVATE_LISTS_MAX_BYTES = int64_t(512) << 20;
// Extra rows after n in the norm and threshold arrays, so that a register tile never reads past them.
constexpr int64_t PAD = 64;

int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }
int64_t gcd(int64_t a, int64_t b) { return b ? gcd(b, a % b) : a; }

template <typename T>
const TileKernel<T>& kernel_for(const std::string& isa);
template <>
const TileKernel<float>& kernel_for<float>(const std::string& isa) { return tile_kernel_f32(isa); }
template <>
const TileKernel<double>& kernel_for<double>(const std::string& isa) { return tile_kernel_f64(isa); }

// 64-byte aligned, uninitialised storage
template <typename T>
struct Buffer {
  std::unique_ptr<T[], void (*)(T*)> p{nullptr, [](T*) {}};
  explicit Buffer(int64_t count = 0) { reset(count); }
  void reset(int64_t count) {
    if (count <= 0) count = 1;
    void* raw = nullptr;
    if (posix_memalign(&raw, 64, sizeof(T) * (size_t)count) != 0) throw std::bad_alloc();
    p = std::unique_ptr<T[], void (*)(T*)>(static_cast<T*>(raw), [](T* q) { free(q); });
  }
  T* get() const { return p.get(); }
};

template <typename T>
void init_lists(T* d, int64_t* idx, T* thr, int64_t rows, int64_t kc) {
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    thr[r] = inf;
    for (int64_t s = 0; s < kc; ++s) {
      d[r * kc + s] = inf;
      idx[r * kc + s] = -1;
    }
  }
}

}  // namespace

template <typename T>
KnnPlan symmetric_knn(const T* x, int64_t n, int64_t dim, int64_t kc, const KnnOptions& opt, T* out_d2,
                      int64_t* out_idx, T* sq_out) {
  if (n < 2) throw std::invalid_argument("need at least 2 points");
  if (dim < 1) throw std::invalid_argument("need at least 1 column");
  if (kc < 1 || kc > n - 1) throw std::invalid_argument("kc must be in [1, n - 1]");
  const TileKernel<T>& K = kernel_for<T>(opt.isa);
  const int64_t mr = K.mr, nr = K.nr;
  const int64_t lcm = mr / gcd(mr, nr) * nr;
  const T inf = std::numeric_limits<T>::infinity();

  KnnPlan plan;
  plan.isa = K.isa;
  plan.mr = K.mr;
  plan.nr = K.nr;
  int64_t depth = opt.depth > 0 ? opt.depth : std::max<int64_t>(16, L1_PANEL_BYTES / (nr * (int64_t)sizeof(T)));
  const int64_t nk = (dim + depth - 1) / depth;
  const int64_t kcb = (dim + nk - 1) / nk;  // equal chunks
  int64_t block_rows = opt.block_rows > 0 ? opt.block_rows : L2_BLOCK_BYTES / (kcb * (int64_t)sizeof(T));
  block_rows = round_up(std::max<int64_t>(block_rows, 1), lcm);
  block_rows = std::min(block_rows, round_up(n, lcm));
  const int64_t block_cols =
      round_up(std::max<int64_t>(opt.block_cols > 0 ? opt.block_cols : DEFAULT_BLOCK_COLS, 1), nr);
  int threads = opt.n_threads;
#ifdef _OPENMP
  if (threads <= 0) threads = omp_get_max_threads();
#else
  threads = 1;
#endif
  if (threads < 1) threads = 1;
  const int64_t b_panels = (n + nr - 1) / nr;
  const int64_t b_stride = b_panels * nr * kcb;
  const bool prepack =
      opt.prepack > 0 || (opt.prepack < 0 && nk * b_stride * (int64_t)sizeof(T) <= PREPACK_MAX_BYTES);
  const int64_t grows = n + PAD;
  const int64_t list_bytes = grows * (kc * (int64_t)(sizeof(T) + sizeof(int64_t)) + (int64_t)sizeof(T));
  const bool private_lists =
      opt.private_lists > 0 || (opt.private_lists < 0 && (threads - 1) * list_bytes <= PRIVATE_LISTS_MAX_BYTES);
  plan.threads = threads;
  plan.block_rows = block_rows;
  plan.block_cols = block_cols;
  plan.depth = kcb;
  plan.prepack = prepack;
  plan.private_lists = private_lists;

  // squared norms (+inf padding), lists, packing buffers
  Buffer<T> sq(grows);
  for (int64_t i = n; i < grows; ++i) sq.get()[i] = inf;
  const int n_lists = private_lists ? threads : 1;
  std::vector<Buffer<T>> gd, gthr;
  std::vector<Buffer<int64_t>> gidx;
  for (int t = 0; t < n_lists; ++t) {
    gd.emplace_back(grows * kc);
    gthr.emplace_back(grows);
    gidx.emplace_back(grows * kc);
  }
  const int64_t prows = block_rows + PAD;
  const int n_blocks = private_lists ? 0 : 2 * threads;  // phased: per-thread row-block lists x parity
  std::vector<Buffer<T>> pd, pthr;
  std::vector<Buffer<int64_t>> pidx;
  for (int t = 0; t < n_blocks; ++t) {
    pd.emplace_back(prows * kc);
    pthr.emplace_back(prows);
    pidx.emplace_back(prows * kc);
    init_lists(pd.back().get(), pidx.back().get(), pthr.back().get(), prows, kc);
  }
  const int64_t cols_pad = round_up(std::max(block_cols, block_rows), nr);
  const int64_t a_size = nk * (round_up(block_rows, mr) / mr) * mr * kcb;
  std::vector<Buffer<T>> bpack, cbuf, apack;
  for (int t = 0; t < threads; ++t) {
    bpack.emplace_back(prepack ? 1 : cols_pad * kcb);
    cbuf.emplace_back(nk > 1 ? round_up(block_rows, mr) * cols_pad : 1);
    if (private_lists) apack.emplace_back(a_size);  // each thread packs the row blocks it works on
  }
  if (!private_lists) {  // phased: one shared row block per phase parity
    apack.emplace_back(a_size);
    apack.emplace_back(a_size);
  }
  Buffer<T> bpre(prepack ? nk * b_stride : 1);

  const T* sqp = sq.get();
  const int64_t nblocks = (n + block_rows - 1) / block_rows;
  auto block_range = [&](int64_t blk, int64_t& i0, int64_t& i1) {
    i0 = blk * block_rows;
    i1 = std::min(n, i0 + block_rows);
  };
  // strips of the columns after row block blk: block_cols wide, or, by default, narrow enough that every
  // thread gets several per block (with a prepacked column side a narrow strip costs nothing)
  auto strip_width = [&](int64_t blk) -> int64_t {
    int64_t i0, i1;
    block_range(blk, i0, i1);
    if (opt.block_cols > 0) return block_cols;
    return std::min(block_cols, std::max<int64_t>(4 * nr, round_up((n - i1 + 4 * threads - 1) / (4 * threads), nr)));
  };
  auto n_strips = [&](int64_t blk) -> int64_t {
    int64_t i0, i1;
    block_range(blk, i0, i1);
    const int64_t w = strip_width(blk);
    return (n - i1 + w - 1) / w;
  };
  // packing of a row block, in tasks of PACK_PANELS panels of one K chunk
  constexpr int64_t PACK_PANELS = 8;
  auto pack_tasks = [&](int64_t blk) -> int64_t {
    if (blk >= nblocks) return 0;
    int64_t i0, i1;
    block_range(blk, i0, i1);
    return nk * ((i1 - i0 + mr * PACK_PANELS - 1) / (mr * PACK_PANELS));
  };
  auto pack_task = [&](int64_t blk, int64_t task, T* out) {
    int64_t i0, i1;
    block_range(blk, i0, i1);
    const int64_t npan = (i1 - i0 + mr - 1) / mr;
    const int64_t per_chunk = (npan + PACK_PANELS - 1) / PACK_PANELS;
    const int64_t pc = task / per_chunk, p0 = (task % per_chunk) * PACK_PANELS;
    const int64_t k0 = pc * kcb, klen = std::min(kcb, dim - k0);
    const int64_t r0 = i0 + p0 * mr, r1 = std::min(i1, r0 + PACK_PANELS * mr);
    K.pack_rows(x, dim, r0, r1, k0, klen, out + pc * npan * mr * kcb + p0 * mr * klen);
  };
  auto run_tile = [&](int tid, int64_t blk, int64_t strip, const T* a_pack, const TopkLists<T>& rows,
                      const TopkLists<T>& cols) {
    TileArgs<T> a;
    a.x = x;
    a.n = n;
    a.dim = dim;
    a.sq = sqp;
    a.a_pack = a_pack;
    block_range(blk, a.i0, a.i1);
    a.kc_blk = kcb;
    a.b_pre = prepack ? bpre.get() : nullptr;
    a.b_stride = b_stride;
    a.b_pack = bpack[tid].get();
    a.c_buf = cbuf[tid].get();
    a.rows = rows;
    if (strip < 0) {
      a.j0 = a.i0;
      a.j1 = a.i1;
      a.diagonal = true;
      a.cols = rows;
    } else {
      const int64_t w = strip_width(blk);
      a.j0 = a.i1 + strip * w;
      a.j1 = std::min(n, a.j0 + w);
      a.diagonal = false;
      a.cols = cols;
    }
    K.run(a);
  };
  // phased mode: merge of row block blk's per-thread lists into the shared lists (and reset them)
  constexpr int64_t MERGE_ROWS = 64;
  auto merge_tasks = [&](int64_t blk) -> int64_t {
    if (blk < 0) return 0;
    int64_t i0, i1;
    block_range(blk, i0, i1);
    return (i1 - i0 + MERGE_ROWS - 1) / MERGE_ROWS;
  };
  auto merge_task = [&](int64_t blk, int64_t task, const TopkLists<T>& global) {
    int64_t i0, i1;
    block_range(blk, i0, i1);
    const int64_t r1 = std::min(i1, i0 + (task + 1) * MERGE_ROWS);
    for (int64_t i = i0 + task * MERGE_ROWS; i < r1; ++i) {
      for (int t = 0; t < threads; ++t) {
        const int b = (int)(blk & 1) * threads + t;
        const int64_t off = (i - i0) * kc;
        T* d = pd[b].get() + off;
        int64_t* ix = pidx[b].get() + off;
        // a heap may hold its empty slots anywhere: visit every slot
        for (int64_t s = 0; s < kc; ++s) {
          if (ix[s] >= 0) base::topk_insert(global, i, d[s], ix[s]);
          d[s] = inf;
          ix[s] = -1;
        }
        pthr[b].get()[i - i0] = inf;
      }
    }
  };

  // tasks of the first loop: squared norms, list initialisation and column prepacking
  constexpr int64_t NORM_ROWS = 256;
  const int64_t n_norm = (grows + NORM_ROWS - 1) / NORM_ROWS;
  const int64_t pre_per_chunk = (b_panels + PACK_PANELS - 1) / PACK_PANELS;
  const int64_t n_pre = prepack ? nk * pre_per_chunk : 0;
  // |x_i|^2 + |x_j|^2 - 2<x_i, x_j> <= 4 max|x|^2 must stay finite, or a row could miss candidates
  const T sq_max = std::numeric_limits<T>::max() / 4;
  int64_t bad = -1;
  // private lists: task numbers of the tiles of each row block (its diagonal tile, then its strips)
  std::vector<int64_t> first(nblocks + 1, 0);
  for (int64_t b = 0; b < nblocks; ++b) first[b + 1] = first[b] + 1 + n_strips(b);

#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    int64_t my_bad = -1;
    const int64_t n_first = n_norm + n_pre + (private_lists ? 0 : pack_tasks(0));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_first; ++task) {
      if (task < n_norm) {
        const int64_t r0 = task * NORM_ROWS, r1 = std::min(grows, r0 + NORM_ROWS);
        for (int64_t i = r0; i < std::min(n, r1); ++i) {
          const T* xi = x + i * dim;
          T acc = 0;
          for (int64_t k = 0; k < dim; ++k) acc += xi[k] * xi[k];
          sq.get()[i] = acc;
          if (!(acc <= sq_max)) my_bad = i;  // also NaN
        }
        for (int l = 0; l < n_lists; ++l)
          init_lists(gd[l].get() + r0 * kc, gidx[l].get() + r0 * kc, gthr[l].get() + r0, r1 - r0, kc);
      } else if (task < n_norm + n_pre) {
        const int64_t t2 = task - n_norm;
        const int64_t pc = t2 / pre_per_chunk, p0 = (t2 % pre_per_chunk) * PACK_PANELS;
        const int64_t k0 = pc * kcb, klen = std::min(kcb, dim - k0);
        const int64_t r0 = p0 * nr, r1 = std::min(n, r0 + PACK_PANELS * nr);
        K.pack_cols(x, dim, r0, r1, k0, klen, bpre.get() + pc * b_stride + p0 * nr * klen);
      } else {
        pack_task(0, task - n_norm - n_pre, apack[0].get());
      }
    }
#pragma omp critical(gelora_bad_row)
    bad = std::max(bad, my_bad);
#pragma omp barrier
    if (bad < 0 && private_lists) {
      // every tile of the upper triangle is an independent task; each thread offers pairs to its own
      // lists of all rows, so the only barrier is the one before the final merge
      const TopkLists<T> mine{gd[tid].get(), gidx[tid].get(), gthr[tid].get(), 0, kc};
      int64_t cached = -1;  // the row block packed in this thread's buffer
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < first[nblocks]; ++task) {
        int64_t blk = cached >= 0 && task >= first[cached] ? cached : 0;
        while (task >= first[blk + 1]) ++blk;
        if (blk != cached) {
          for (int64_t p = 0; p < pack_tasks(blk); ++p) pack_task(blk, p, apack[tid].get());
          cached = blk;
        }
        run_tile(tid, blk, task - first[blk] - 1, apack[tid].get(), mine, mine);
      }
      // merge: every thread's list of row i into list 0
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const TopkLists<T> dst{gd[0].get(), gidx[0].get(), gthr[0].get(), 0, kc};
        for (int t = 1; t < threads; ++t) {
          const T* d = gd[t].get() + i * kc;
          const int64_t* ix = gidx[t].get() + i * kc;
          for (int64_t s = 0; s < kc; ++s)
            if (ix[s] >= 0) base::topk_insert(dst, i, d[s], ix[s]);
        }
      }
    } else if (bad < 0) {
      // phased: the loop of block ph runs its tiles, packs block ph + 1 and merges block ph - 1
      const TopkLists<T> global{gd[0].get(), gidx[0].get(), gthr[0].get(), 0, kc};
      for (int64_t ph = 0; ph < nblocks; ++ph) {
        int64_t i0, i1;
        block_range(ph, i0, i1);
        const int64_t n_pack = pack_tasks(ph + 1), n_merge = merge_tasks(ph - 1);
        const int buf = (int)(ph & 1) * threads + tid;
        const TopkLists<T> mine{pd[buf].get(), pidx[buf].get(), pthr[buf].get(), i0, kc};
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n_pack + n_merge + 1 + n_strips(ph); ++task) {
          if (task < n_pack)
            pack_task(ph + 1, task, apack[(ph + 1) & 1].get());
          else if (task < n_pack + n_merge)
            merge_task(ph - 1, task - n_pack, global);
          else
            run_tile(tid, ph, task - n_pack - n_merge - 1, apack[ph & 1].get(), mine, global);
        }
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < merge_tasks(nblocks - 1); ++task) merge_task(nblocks - 1, task, global);
    }
    if (bad < 0 && kc > SORTED_MAX_KC) {
      // heaps -> ascending lists (the sorted lists of small kc are already)
      const TopkLists<T> out{gd[0].get(), gidx[0].get(), gthr[0].get(), 0, kc};
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) base::topk_finish(out, i);
    }
  }
  if (bad >= 0)
    throw std::domain_error("row " + std::to_string(bad) +
                            " has a non-finite squared norm, or one above a quarter of the dtype's "
                            "largest value (NaN/Inf input, or values so large that squared distances "
                            "overflow; rescale the points)");
  if (sq_out)
    for (int64_t i = 0; i < n; ++i) sq_out[i] = sqp[i];
  const T* rd = gd[0].get();
  const int64_t* ri = gidx[0].get();
  for (int64_t i = 0; i < n * kc; ++i) {
    out_d2[i] = rd[i];
    out_idx[i] = ri[i];
    // every row was offered all n - 1 others at finite distances, so every slot is filled
    if (ri[i] < 0)
      throw std::logic_error("internal error: row " + std::to_string(i / kc) + " has fewer than kc candidates");
  }
  return plan;
}

template KnnPlan symmetric_knn<float>(const float*, int64_t, int64_t, int64_t, const KnnOptions&, float*, int64_t*,
                                      float*);
template KnnPlan symmetric_knn<double>(const double*, int64_t, int64_t, int64_t, const KnnOptions&, double*,
                                       int64_t*, double*);

}  // namespace gelora
