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

// One search: the blocking chosen for (n, dim, kc) and the machine, the buffers it needs, and the steps
// of the work plan described in symmetric_knn.h. The steps below are called by every thread of one
// OpenMP parallel region (run()); the ones with an `omp for` inside are worksharing loops that all
// threads must reach.
template <typename T>
class SymmetricKnn {
 public:
  SymmetricKnn(const T* x, int64_t n, int64_t dim, int64_t kc, const KnnOptions& opt);
  const KnnPlan& plan() const { return plan_; }
  // Fills out_d2 / out_idx (n, kc) and, when given, sq_out (n); throws std::domain_error on a bad row.
  void run(T* out_d2, int64_t* out_idx, T* sq_out);

 private:
  // geometry of the work plan
  void block_range(int64_t blk, int64_t& i0, int64_t& i1) const {
    i0 = blk * block_rows_;
    i1 = std::min(n_, i0 + block_rows_);
  }
  int64_t strip_width(int64_t blk) const;
  int64_t n_strips(int64_t blk) const;
  int64_t pack_tasks(int64_t blk) const;
  int64_t merge_tasks(int64_t blk) const;
  // one task of each kind
  void pack_task(int64_t blk, int64_t task, T* out) const;
  void run_tile(int tid, int64_t blk, int64_t strip, const T* a_pack, const TopkLists<T>& rows,
                const TopkLists<T>& cols);
  void merge_task(int64_t blk, int64_t task, const TopkLists<T>& global);
  // the steps of run(), called by every thread of its parallel region
  int64_t prepare();  // norms, lists, prepacking; returns a bad row seen by this thread or -1
  void search_private(int tid);
  void search_phased(int tid);
  void sort_lists();
  TopkLists<T> lists(int l) const { return {gd_[l].get(), gidx_[l].get(), gthr_[l].get(), 0, kc_}; }

  // packing of a row block and the merge of the phased mode go in tasks of this many panels / rows
  static constexpr int64_t PACK_PANELS = 8;
  static constexpr int64_t MERGE_ROWS = 64;
  static constexpr int64_t NORM_ROWS = 256;

  const T* x_;
  int64_t n_, dim_, kc_;
  const KnnOptions& opt_;
  const TileKernel<T>& K_;
  KnnPlan plan_;
  int64_t mr_, nr_, nk_, kcb_, block_rows_, block_cols_, nblocks_, b_panels_, b_stride_, grows_;
  int threads_;
  bool prepack_, private_lists_;
  std::vector<int64_t> first_;  // private lists: task number of each row block's diagonal tile, then its strips

  Buffer<T> sq_;                         // squared norms, +inf padding
  std::vector<Buffer<T>> gd_, gthr_;     // lists of all rows: one set, or one per thread (private lists)
  std::vector<Buffer<int64_t>> gidx_;
  std::vector<Buffer<T>> pd_, pthr_;     // phased: per-thread row-block lists x phase parity
  std::vector<Buffer<int64_t>> pidx_;
  std::vector<Buffer<T>> bpack_, cbuf_, apack_;
  Buffer<T> bpre_;                       // prepacked column side
  int64_t bad_ = -1;
};

template <typename T>
SymmetricKnn<T>::SymmetricKnn(const T* x, int64_t n, int64_t dim, int64_t kc, const KnnOptions& opt)
    : x_(x), n_(n), dim_(dim), kc_(kc), opt_(opt), K_(kernel_for<T>(opt.isa)) {
  mr_ = K_.mr;
  nr_ = K_.nr;
  const int64_t lcm = mr_ / gcd(mr_, nr_) * nr_;
  const T inf = std::numeric_limits<T>::infinity();
  plan_.isa = K_.isa;
  plan_.mr = K_.mr;
  plan_.nr = K_.nr;
  const int64_t depth =
      opt.depth > 0 ? opt.depth : std::max<int64_t>(16, L1_PANEL_BYTES / (nr_ * (int64_t)sizeof(T)));
  nk_ = (dim + depth - 1) / depth;
  kcb_ = (dim + nk_ - 1) / nk_;  // equal chunks
  int64_t block_rows = opt.block_rows > 0 ? opt.block_rows : L2_BLOCK_BYTES / (kcb_ * (int64_t)sizeof(T));
  block_rows = round_up(std::max<int64_t>(block_rows, 1), lcm);
  block_rows_ = std::min(block_rows, round_up(n, lcm));
  block_cols_ = round_up(std::max<int64_t>(opt.block_cols > 0 ? opt.block_cols : DEFAULT_BLOCK_COLS, 1), nr_);
  int threads = opt.n_threads;
#ifdef _OPENMP
  if (threads <= 0) threads = omp_get_max_threads();
#else
  threads = 1;
#endif
  threads_ = threads < 1 ? 1 : threads;
  b_panels_ = (n + nr_ - 1) / nr_;
  b_stride_ = b_panels_ * nr_ * kcb_;
  prepack_ = opt.prepack > 0 || (opt.prepack < 0 && nk_ * b_stride_ * (int64_t)sizeof(T) <= PREPACK_MAX_BYTES);
  grows_ = n + PAD;
  const int64_t list_bytes = grows_ * (kc * (int64_t)(sizeof(T) + sizeof(int64_t)) + (int64_t)sizeof(T));
  private_lists_ = opt.private_lists > 0 ||
                   (opt.private_lists < 0 && (threads_ - 1) * list_bytes <= PRIVATE_LISTS_MAX_BYTES);
  plan_.threads = threads_;
  plan_.block_rows = block_rows_;
  plan_.block_cols = block_cols_;
  plan_.depth = kcb_;
  plan_.prepack = prepack_;
  plan_.private_lists = private_lists_;
  nblocks_ = (n + block_rows_ - 1) / block_rows_;

  sq_.reset(grows_);
  for (int64_t i = n; i < grows_; ++i) sq_.get()[i] = inf;
  const int n_lists = private_lists_ ? threads_ : 1;
  for (int t = 0; t < n_lists; ++t) {
    gd_.emplace_back(grows_ * kc);
    gthr_.emplace_back(grows_);
    gidx_.emplace_back(grows_ * kc);
  }
  const int64_t prows = block_rows_ + PAD;
  const int n_blocks = private_lists_ ? 0 : 2 * threads_;
  for (int t = 0; t < n_blocks; ++t) {
    pd_.emplace_back(prows * kc);
    pthr_.emplace_back(prows);
    pidx_.emplace_back(prows * kc);
    init_lists(pd_.back().get(), pidx_.back().get(), pthr_.back().get(), prows, kc);
  }
  const int64_t cols_pad = round_up(std::max(block_cols_, block_rows_), nr_);
  const int64_t a_size = nk_ * (round_up(block_rows_, mr_) / mr_) * mr_ * kcb_;
  for (int t = 0; t < threads_; ++t) {
    bpack_.emplace_back(prepack_ ? 1 : cols_pad * kcb_);
    cbuf_.emplace_back(nk_ > 1 ? round_up(block_rows_, mr_) * cols_pad : 1);
    if (private_lists_) apack_.emplace_back(a_size);  // each thread packs the row blocks it works on
  }
  if (!private_lists_) {  // phased: one shared row block per phase parity
    apack_.emplace_back(a_size);
    apack_.emplace_back(a_size);
  }
  bpre_.reset(prepack_ ? nk_ * b_stride_ : 1);
  first_.assign(nblocks_ + 1, 0);
  for (int64_t b = 0; b < nblocks_; ++b) first_[b + 1] = first_[b] + 1 + n_strips(b);
}

// strips of the columns after row block blk: block_cols wide, or, by default, narrow enough that every
// thread gets several per block (with a prepacked column side a narrow strip costs nothing)
template <typename T>
int64_t SymmetricKnn<T>::strip_width(int64_t blk) const {
  int64_t i0, i1;
  block_range(blk, i0, i1);
  if (opt_.block_cols > 0) return block_cols_;
  return std::min(block_cols_,
                  std::max<int64_t>(4 * nr_, round_up((n_ - i1 + 4 * threads_ - 1) / (4 * threads_), nr_)));
}

template <typename T>
int64_t SymmetricKnn<T>::n_strips(int64_t blk) const {
  int64_t i0, i1;
  block_range(blk, i0, i1);
  const int64_t w = strip_width(blk);
  return (n_ - i1 + w - 1) / w;
}

// packing of a row block, in tasks of PACK_PANELS panels of one K chunk
template <typename T>
int64_t SymmetricKnn<T>::pack_tasks(int64_t blk) const {
  if (blk >= nblocks_) return 0;
  int64_t i0, i1;
  block_range(blk, i0, i1);
  return nk_ * ((i1 - i0 + mr_ * PACK_PANELS - 1) / (mr_ * PACK_PANELS));
}

template <typename T>
void SymmetricKnn<T>::pack_task(int64_t blk, int64_t task, T* out) const {
  int64_t i0, i1;
  block_range(blk, i0, i1);
  const int64_t npan = (i1 - i0 + mr_ - 1) / mr_;
  const int64_t per_chunk = (npan + PACK_PANELS - 1) / PACK_PANELS;
  const int64_t pc = task / per_chunk, p0 = (task % per_chunk) * PACK_PANELS;
  const int64_t k0 = pc * kcb_, klen = std::min(kcb_, dim_ - k0);
  const int64_t r0 = i0 + p0 * mr_, r1 = std::min(i1, r0 + PACK_PANELS * mr_);
  K_.pack_rows(x_, dim_, r0, r1, k0, klen, out + pc * npan * mr_ * kcb_ + p0 * mr_ * klen);
}

// the diagonal tile of row block blk (strip < 0) or one of its strips
template <typename T>
void SymmetricKnn<T>::run_tile(int tid, int64_t blk, int64_t strip, const T* a_pack, const TopkLists<T>& rows,
                               const TopkLists<T>& cols) {
  TileArgs<T> a;
  a.x = x_;
  a.n = n_;
  a.dim = dim_;
  a.sq = sq_.get();
  a.a_pack = a_pack;
  block_range(blk, a.i0, a.i1);
  a.kc_blk = kcb_;
  a.b_pre = prepack_ ? bpre_.get() : nullptr;
  a.b_stride = b_stride_;
  a.b_pack = bpack_[tid].get();
  a.c_buf = cbuf_[tid].get();
  a.rows = rows;
  if (strip < 0) {
    a.j0 = a.i0;
    a.j1 = a.i1;
    a.diagonal = true;
    a.cols = rows;
  } else {
    const int64_t w = strip_width(blk);
    a.j0 = a.i1 + strip * w;
    a.j1 = std::min(n_, a.j0 + w);
    a.diagonal = false;
    a.cols = cols;
  }
  K_.run(a);
}

// phased mode: merge of row block blk's per-thread lists into the shared lists (and reset them)
template <typename T>
int64_t SymmetricKnn<T>::merge_tasks(int64_t blk) const {
  if (blk < 0) return 0;
  int64_t i0, i1;
  block_range(blk, i0, i1);
  return (i1 - i0 + MERGE_ROWS - 1) / MERGE_ROWS;
}

template <typename T>
void SymmetricKnn<T>::merge_task(int64_t blk, int64_t task, const TopkLists<T>& global) {
  const T inf = std::numeric_limits<T>::infinity();
  int64_t i0, i1;
  block_range(blk, i0, i1);
  const int64_t r1 = std::min(i1, i0 + (task + 1) * MERGE_ROWS);
  for (int64_t i = i0 + task * MERGE_ROWS; i < r1; ++i) {
    for (int t = 0; t < threads_; ++t) {
      const int b = (int)(blk & 1) * threads_ + t;
      const int64_t off = (i - i0) * kc_;
      T* d = pd_[b].get() + off;
      int64_t* ix = pidx_[b].get() + off;
      // a heap may hold its empty slots anywhere: visit every slot
      for (int64_t s = 0; s < kc_; ++s) {
        if (ix[s] >= 0) base::topk_insert(global, i, d[s], ix[s]);
        d[s] = inf;
        ix[s] = -1;
      }
      pthr_[b].get()[i - i0] = inf;
    }
  }
}

// the first loop: squared norms, list initialisation, column prepacking and (phased) the first row block
template <typename T>
int64_t SymmetricKnn<T>::prepare() {
  const int64_t n_norm = (grows_ + NORM_ROWS - 1) / NORM_ROWS;
  const int64_t pre_per_chunk = (b_panels_ + PACK_PANELS - 1) / PACK_PANELS;
  const int64_t n_pre = prepack_ ? nk_ * pre_per_chunk : 0;
  // |x_i|^2 + |x_j|^2 - 2<x_i, x_j> <= 4 max|x|^2 must stay finite, or a row could miss candidates
  const T sq_max = std::numeric_limits<T>::max() / 4;
  const int n_lists = (int)gd_.size();
  int64_t my_bad = -1;
  const int64_t n_first = n_norm + n_pre + (private_lists_ ? 0 : pack_tasks(0));
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < n_first; ++task) {
    if (task < n_norm) {
      const int64_t r0 = task * NORM_ROWS, r1 = std::min(grows_, r0 + NORM_ROWS);
      for (int64_t i = r0; i < std::min(n_, r1); ++i) {
        const T* xi = x_ + i * dim_;
        T acc = 0;
        for (int64_t k = 0; k < dim_; ++k) acc += xi[k] * xi[k];
        sq_.get()[i] = acc;
        if (!(acc <= sq_max)) my_bad = i;  // also NaN
      }
      for (int l = 0; l < n_lists; ++l)
        init_lists(gd_[l].get() + r0 * kc_, gidx_[l].get() + r0 * kc_, gthr_[l].get() + r0, r1 - r0, kc_);
    } else if (task < n_norm + n_pre) {
      const int64_t t2 = task - n_norm;
      const int64_t pc = t2 / pre_per_chunk, p0 = (t2 % pre_per_chunk) * PACK_PANELS;
      const int64_t k0 = pc * kcb_, klen = std::min(kcb_, dim_ - k0);
      const int64_t r0 = p0 * nr_, r1 = std::min(n_, r0 + PACK_PANELS * nr_);
      K_.pack_cols(x_, dim_, r0, r1, k0, klen, bpre_.get() + pc * b_stride_ + p0 * nr_ * klen);
    } else {
      pack_task(0, task - n_norm - n_pre, apack_[0].get());
    }
  }
  return my_bad;
}

// private lists: every tile of the upper triangle is an independent task; each thread offers pairs to
// its own lists of all rows, so the only barrier is the one before the final merge
template <typename T>
void SymmetricKnn<T>::search_private(int tid) {
  const TopkLists<T> mine = lists(tid);
  int64_t cached = -1;  // the row block packed in this thread's buffer
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < first_[nblocks_]; ++task) {
    int64_t blk = cached >= 0 && task >= first_[cached] ? cached : 0;
    while (task >= first_[blk + 1]) ++blk;
    if (blk != cached) {
      for (int64_t p = 0; p < pack_tasks(blk); ++p) pack_task(blk, p, apack_[tid].get());
      cached = blk;
    }
    run_tile(tid, blk, task - first_[blk] - 1, apack_[tid].get(), mine, mine);
  }
  // merge: every thread's list of row i into list 0
  const TopkLists<T> dst = lists(0);
#pragma omp for schedule(static)
  for (int64_t i = 0; i < n_; ++i) {
    for (int t = 1; t < threads_; ++t) {
      const T* d = gd_[t].get() + i * kc_;
      const int64_t* ix = gidx_[t].get() + i * kc_;
      for (int64_t s = 0; s < kc_; ++s)
        if (ix[s] >= 0) base::topk_insert(dst, i, d[s], ix[s]);
    }
  }
}

// phased: the loop of block ph runs its tiles, packs block ph + 1 and merges block ph - 1
template <typename T>
void SymmetricKnn<T>::search_phased(int tid) {
  const TopkLists<T> global = lists(0);
  for (int64_t ph = 0; ph < nblocks_; ++ph) {
    int64_t i0, i1;
    block_range(ph, i0, i1);
    const int64_t n_pack = pack_tasks(ph + 1), n_merge = merge_tasks(ph - 1);
    const int buf = (int)(ph & 1) * threads_ + tid;
    const TopkLists<T> mine{pd_[buf].get(), pidx_[buf].get(), pthr_[buf].get(), i0, kc_};
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_pack + n_merge + 1 + n_strips(ph); ++task) {
      if (task < n_pack)
        pack_task(ph + 1, task, apack_[(ph + 1) & 1].get());
      else if (task < n_pack + n_merge)
        merge_task(ph - 1, task - n_pack, global);
      else
        run_tile(tid, ph, task - n_pack - n_merge - 1, apack_[ph & 1].get(), mine, global);
    }
  }
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < merge_tasks(nblocks_ - 1); ++task) merge_task(nblocks_ - 1, task, global);
}

// heaps -> ascending lists (the sorted lists of small kc are already)
template <typename T>
void SymmetricKnn<T>::sort_lists() {
  if (kc_ <= SORTED_MAX_KC) return;
  const TopkLists<T> out = lists(0);
#pragma omp for schedule(static)
  for (int64_t i = 0; i < n_; ++i) base::topk_finish(out, i);
}

template <typename T>
void SymmetricKnn<T>::run(T* out_d2, int64_t* out_idx, T* sq_out) {
  bad_ = -1;
#pragma omp parallel num_threads(threads_)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    const int64_t my_bad = prepare();
#pragma omp critical(gelora_bad_row)
    bad_ = std::max(bad_, my_bad);
#pragma omp barrier
    if (bad_ < 0) {  // the same answer in every thread after the barrier: all reach the same loops
      if (private_lists_)
        search_private(tid);
      else
        search_phased(tid);
      sort_lists();
    }
  }
  if (bad_ >= 0)
    throw std::domain_error("row " + std::to_string(bad_) +
                            " has a non-finite squared norm, or one above a quarter of the dtype's "
                            "largest value (NaN/Inf input, or values so large that squared distances "
                            "overflow; rescale the points)");
  if (sq_out)
    for (int64_t i = 0; i < n_; ++i) sq_out[i] = sq_.get()[i];
  const T* rd = gd_[0].get();
  const int64_t* ri = gidx_[0].get();
  for (int64_t i = 0; i < n_ * kc_; ++i) {
    out_d2[i] = rd[i];
    out_idx[i] = ri[i];
    // every row was offered all n - 1 others at finite distances, so every slot is filled
    if (ri[i] < 0)
      throw std::logic_error("internal error: row " + std::to_string(i / kc_) + " has fewer than kc candidates");
  }
}

}  // namespace

template <typename T>
KnnPlan symmetric_knn(const T* x, int64_t n, int64_t dim, int64_t kc, const KnnOptions& opt, T* out_d2,
                      int64_t* out_idx, T* sq_out) {
  if (n < 2) throw std::invalid_argument("need at least 2 points");
  if (dim < 1) throw std::invalid_argument("need at least 1 column");
  if (kc < 1 || kc > n - 1) throw std::invalid_argument("kc must be in [1, n - 1]");
  SymmetricKnn<T> search(x, n, dim, kc, opt);
  search.run(out_d2, out_idx, sq_out);
  return search.plan();
}

template KnnPlan symmetric_knn<float>(const float*, int64_t, int64_t, int64_t, const KnnOptions&, float*, int64_t*,
                                      float*);
template KnnPlan symmetric_knn<double>(const double*, int64_t, int64_t, int64_t, const KnnOptions&, double*,
                                       int64_t*, double*);

}  // namespace gelora
