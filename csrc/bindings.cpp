// Python bindings of the C++ core (module gelora._C): argument checks and GIL handling live here.
//
// Every function checks shapes, dtypes, contiguity and sizes before touching memory and raises
// TypeError/ValueError with the offending argument named; the compute releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "direct_dist.h"
#include "lora_grad.h"
#include "point_prep.h"
#include "symmetric_knn.h"
#include "tile_kernel.h"

namespace py = pybind11;
using gelora::KnnOptions;
using gelora::KnnPlan;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

void require_c_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + ": expected a C-contiguous array (copy it with "
                          "numpy.ascontiguousarray first)");
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    throw py::value_error(std::string(name) + ": array is not aligned to its dtype");
}

void require_ndim(const py::array& a, int ndim, const char* name, const char* what) {
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + ": expected a " + std::to_string(ndim) + "-D " + what +
                          " array, got shape " + shape_str(a));
}

void require_writeable(const py::array& a, const char* name) {
  if (!a.writeable()) throw py::value_error(std::string(name) + ": output array is read-only");
}

bool overlap(const py::array& a, const py::array& b) {
  const char* a0 = static_cast<const char*>(a.data());
  const char* b0 = static_cast<const char*>(b.data());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// The points argument: 2-D, float32 or float64, C-contiguous.
void check_points(const py::array& x, const char* name = "x") {
  require_ndim(x, 2, name, "(n, dim) points");
  if (!py::isinstance<py::array_t<float>>(x) && !py::isinstance<py::array_t<double>>(x))
    throw py::type_error(std::string(name) + ": dtype must be float32 or float64, got " + dtype_str(x));
  require_c_contiguous(x, name);
  if (x.shape(1) < 1) throw py::value_error(std::string(name) + ": needs at least one column, got shape " + shape_str(x));
}

template <typename T>
py::tuple knn_candidates_t(const py::array& x, int64_t kc, const KnnOptions& opt, py::object out_d2,
                           py::object out_idx) {
  const int64_t n = x.shape(0), dim = x.shape(1);
  py::array_t<T> d2;
  py::array_t<int64_t> idx;
  if (out_d2.is_none()) {
    d2 = py::array_t<T>({n, kc});
  } else {
    py::array o = py::reinterpret_borrow<py::array>(out_d2);
    require_ndim(o, 2, "out_d2", "(n, kc)");
    if (!o.dtype().is(x.dtype()))
      throw py::type_error("out_d2: dtype " + dtype_str(o) + " does not match x's " + dtype_str(x));
    if (o.shape(0) != n || o.shape(1) != kc)
      throw py::value_error("out_d2: shape " + shape_str(o) + " does not match (n, kc) = (" + std::to_string(n) +
                            ", " + std::to_string(kc) + ")");
    require_c_contiguous(o, "out_d2");
    require_writeable(o, "out_d2");
    d2 = py::reinterpret_borrow<py::array_t<T>>(o);
  }
  if (out_idx.is_none()) {
    idx = py::array_t<int64_t>({n, kc});
  } else {
    py::array o = py::reinterpret_borrow<py::array>(out_idx);
    require_ndim(o, 2, "out_idx", "(n, kc)");
    if (!py::isinstance<py::array_t<int64_t>>(o))
      throw py::type_error("out_idx: dtype must be int64, got " + dtype_str(o));
    if (o.shape(0) != n || o.shape(1) != kc)
      throw py::value_error("out_idx: shape " + shape_str(o) + " does not match (n, kc) = (" + std::to_string(n) +
                            ", " + std::to_string(kc) + ")");
    require_c_contiguous(o, "out_idx");
    require_writeable(o, "out_idx");
    idx = py::reinterpret_borrow<py::array_t<int64_t>>(o);
  }
  if (overlap(d2, x) || overlap(idx, x) || overlap(d2, idx))
    throw py::value_error("out_d2, out_idx and x must not share memory");
  py::array_t<T> sq(n);
  const T* xp = static_cast<const T*>(x.data());
  T* dp = d2.mutable_data();
  int64_t* ip = idx.mutable_data();
  T* sp = sq.mutable_data();
  KnnPlan plan;
  {
    py::gil_scoped_release release;
    plan = gelora::symmetric_knn<T>(xp, n, dim, kc, opt, dp, ip, sp);
  }
  py::dict info;
  info["isa"] = plan.isa;
  info["mr"] = plan.mr;
  info["nr"] = plan.nr;
  info["threads"] = plan.threads;
  info["block_rows"] = plan.block_rows;
  info["block_cols"] = plan.block_cols;
  info["depth"] = plan.depth;
  info["prepack"] = plan.prepack;
  info["private_lists"] = plan.private_lists;
  return py::make_tuple(d2, idx, sq, info);
}

py::tuple knn_candidates(const py::array& x, int64_t kc, int n_threads, const std::string& isa, int64_t block_rows,
                         int64_t block_cols, int64_t depth, int prepack, int private_lists, py::object out_d2,
                         py::object out_idx) {
  check_points(x);
  const int64_t n = x.shape(0);
  if (n < 2) throw py::value_error("x: needs at least 2 rows, got shape " + shape_str(x));
  if (kc < 1 || kc > n - 1)
    throw py::value_error("kc=" + std::to_string(kc) + " is out of range: need 1 <= kc <= n - 1 = " +
                          std::to_string(n - 1));
  if (n_threads < 0) throw py::value_error("n_threads must be >= 0 (0: OpenMP default)");
  if (block_rows < 0 || block_cols < 0 || depth < 0)
    throw py::value_error("block_rows, block_cols and depth must be >= 0 (0: default)");
  KnnOptions opt;
  opt.n_threads = n_threads;
  opt.isa = isa;
  opt.block_rows = block_rows;
  opt.block_cols = block_cols;
  opt.depth = depth;
  if (prepack < -1 || prepack > 1) throw py::value_error("prepack must be -1 (auto), 0 or 1");
  opt.prepack = prepack;
  if (private_lists < -1 || private_lists > 1) throw py::value_error("private_lists must be -1 (auto), 0 or 1");
  opt.private_lists = private_lists;
  if (py::isinstance<py::array_t<float>>(x)) return knn_candidates_t<float>(x, kc, opt, out_d2, out_idx);
  return knn_candidates_t<double>(x, kc, opt, out_d2, out_idx);
}

template <typename T>
py::array direct_sq_dist_t(const py::array& x, const py::array& cand, int n_threads) {
  const int64_t n = x.shape(0), dim = x.shape(1), m = cand.shape(0), c = cand.shape(1);
  py::array_t<T> out({m, c});
  const T* xp = static_cast<const T*>(x.data());
  const int64_t* cp = static_cast<const int64_t*>(cand.data());
  T* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    gelora::direct_sq_dist<T>(xp, n, dim, cp, m, c, n_threads, op);
  }
  return out;
}

py::array direct_sq_dist(const py::array& x, const py::array& cand, int n_threads) {
  check_points(x);
  require_ndim(cand, 2, "cand", "(n, c) index");
  if (!py::isinstance<py::array_t<int64_t>>(cand))
    throw py::type_error("cand: dtype must be int64, got " + dtype_str(cand));
  require_c_contiguous(cand, "cand");
  if (cand.shape(0) != x.shape(0))
    throw py::value_error("cand: shape " + shape_str(cand) + " does not match the " + std::to_string(x.shape(0)) +
                          " rows of x");
  if (n_threads < 0) throw py::value_error("n_threads must be >= 0 (0: OpenMP default)");
  if (py::isinstance<py::array_t<float>>(x)) return direct_sq_dist_t<float>(x, cand, n_threads);
  return direct_sq_dist_t<double>(x, cand, n_threads);
}

template <typename T>
py::tuple prepare_points_t(const py::array& x, const int64_t* coef, int n_threads) {
  const int64_t n = x.shape(0), dim = x.shape(1);
  py::object hash = py::none();
  int64_t* hp = nullptr;
  if (coef) {
    py::array_t<int64_t> h(n);
    hp = h.mutable_data();
    hash = h;
  }
  py::array_t<double> mean(dim);
  double* mp = mean.mutable_data();
  const T* xp = static_cast<const T*>(x.data());
  int64_t bad = 0;
  {
    py::gil_scoped_release release;
    gelora::prepare_points<T>(xp, n, dim, coef, n_threads, hp, mp, &bad);
  }
  return py::make_tuple(hash, mean, bad);
}

py::tuple prepare_points(const py::array& x, py::object coef, int n_threads) {
  check_points(x);
  if (x.shape(0) < 1) throw py::value_error("x: needs at least 1 row, got shape " + shape_str(x));
  if (n_threads < 0) throw py::value_error("n_threads must be >= 0 (0: OpenMP default)");
  const int64_t* cp = nullptr;
  py::array c;
  if (!coef.is_none()) {
    c = py::reinterpret_borrow<py::array>(coef);
    require_ndim(c, 1, "coef", "(dim,)");
    if (!py::isinstance<py::array_t<int64_t>>(c)) throw py::type_error("coef: dtype must be int64, got " + dtype_str(c));
    if (c.shape(0) != x.shape(1))
      throw py::value_error("coef: shape " + shape_str(c) + " does not match the " + std::to_string(x.shape(1)) +
                            " columns of x");
    require_c_contiguous(c, "coef");
    cp = static_cast<const int64_t*>(c.data());
  }
  if (py::isinstance<py::array_t<float>>(x)) return prepare_points_t<float>(x, cp, n_threads);
  return prepare_points_t<double>(x, cp, n_threads);
}

template <typename T>
py::array centre_t(const py::array& x, const py::array& mean, int n_threads, py::object out) {
  const int64_t n = x.shape(0), dim = x.shape(1);
  py::array_t<T> o;
  if (out.is_none()) {
    o = py::array_t<T>({n, dim});
  } else {
    py::array a = py::reinterpret_borrow<py::array>(out);
    require_ndim(a, 2, "out", "(n, dim)");
    if (!a.dtype().is(x.dtype())) throw py::type_error("out: dtype " + dtype_str(a) + " does not match x's " + dtype_str(x));
    if (a.shape(0) != n || a.shape(1) != dim)
      throw py::value_error("out: shape " + shape_str(a) + " does not match x's " + shape_str(x));
    require_c_contiguous(a, "out");
    require_writeable(a, "out");
    if (overlap(a, x) && a.data() != x.data())
      throw py::value_error("out: overlaps x without being x itself");
    o = py::reinterpret_borrow<py::array_t<T>>(a);
  }
  const T* xp = static_cast<const T*>(x.data());
  const double* mp = static_cast<const double*>(mean.data());
  T* op = o.mutable_data();
  {
    py::gil_scoped_release release;
    gelora::centre_points<T>(xp, n, dim, mp, n_threads, op);
  }
  return o;
}

py::array centre(const py::array& x, const py::array& mean, int n_threads, py::object out) {
  check_points(x);
  require_ndim(mean, 1, "mean", "(dim,)");
  if (!py::isinstance<py::array_t<double>>(mean)) throw py::type_error("mean: dtype must be float64, got " + dtype_str(mean));
  if (mean.shape(0) != x.shape(1))
    throw py::value_error("mean: shape " + shape_str(mean) + " does not match the " + std::to_string(x.shape(1)) +
                          " columns of x");
  require_c_contiguous(mean, "mean");
  if (n_threads < 0) throw py::value_error("n_threads must be >= 0 (0: OpenMP default)");
  if (py::isinstance<py::array_t<float>>(x)) return centre_t<float>(x, mean, n_threads, out);
  return centre_t<double>(x, mean, n_threads, out);
}

// A float32, 2-D, C-contiguous, aligned operand of lora_grad.
void check_f32_matrix(const py::array& a, const char* name, const char* what) {
  require_ndim(a, 2, name, what);
  if (!py::isinstance<py::array_t<float>>(a))
    throw py::type_error(std::string(name) + ": dtype must be float32, got " + dtype_str(a));
  require_c_contiguous(a, name);
}

// lora_A of a layer whose input has k features: (r, k) with r >= 1.
void check_lora_a(const py::array& a, int64_t k) {
  if (a.shape(0) < 1) throw py::value_error("a: LoRA rank must be >= 1, got shape " + shape_str(a));
  if (a.shape(1) != k)
    throw py::value_error("a: shape " + shape_str(a) + " does not match (r, k) with k = " + std::to_string(k));
}

py::dict lora_plan_info(const gelora::LoraGradPlan& plan) {
  py::dict info;
  info["isa"] = plan.isa;
  info["threads"] = plan.threads;
  info["block_rows"] = plan.block_rows;
  info["rank_pad"] = plan.rank_pad;
  return info;
}

py::tuple lora_grad(const py::array& x, const py::array& dy, const py::array& a, const py::array& b, double scaling,
                    bool want_t, int n_threads, const std::string& isa, int64_t block_rows) {
  check_f32_matrix(x, "x", "(m, k) input");
  check_f32_matrix(dy, "dy", "(m, n) output gradient");
  check_f32_matrix(a, "a", "(r, k) lora_A");
  check_f32_matrix(b, "b", "(n, r) lora_B");
  const int64_t m = x.shape(0), k = x.shape(1), n = dy.shape(1), r = a.shape(0);
  if (dy.shape(0) != m)
    throw py::value_error("dy: shape " + shape_str(dy) + " has " + std::to_string(dy.shape(0)) + " rows but x " +
                          shape_str(x) + " has " + std::to_string(m));
  if (k < 1 || n < 1) throw py::value_error("x and dy need at least one column, got " + shape_str(x) + " and " + shape_str(dy));
  check_lora_a(a, k);
  if (b.shape(0) != n || b.shape(1) != r)
    throw py::value_error("b: shape " + shape_str(b) + " does not match (n, r) = (" + std::to_string(n) + ", " +
                          std::to_string(r) + ")");
  if (!std::isfinite(scaling)) throw py::value_error("scaling must be finite");
  if (n_threads < 0) throw py::value_error("n_threads must be >= 0 (0: OpenMP default)");
  if (block_rows < 0) throw py::value_error("block_rows must be >= 0 (0: from the cache size)");
  py::array_t<float> da({r, k}), db({n, r});
  py::object t_obj = py::none();
  float* tp = nullptr;
  if (want_t) {
    py::array_t<float> t({m, r});
    tp = t.mutable_data();
    t_obj = t;
  }
  gelora::LoraGradArgs args;
  args.x = static_cast<const float*>(x.data());
  args.dy = static_cast<const float*>(dy.data());
  args.a = static_cast<const float*>(a.data());
  args.b = static_cast<const float*>(b.data());
  args.m = m;
  args.k = k;
  args.n = n;
  args.r = r;
  args.scaling = static_cast<float>(scaling);
  args.da = da.mutable_data();
  args.db = db.mutable_data();
  args.t = tp;
  args.n_threads = n_threads;
  args.block_rows = block_rows;
  gelora::LoraGradPlan plan;
  {
    py::gil_scoped_release release;
    plan = gelora::lora_grad(args, isa);
  }
  return py::make_tuple(da, db, t_obj, lora_plan_info(plan));
}

py::tuple lora_shrink(const py::array& x, const py::array& a, const py::array& scale, int n_threads,
                      const std::string& isa) {
  check_f32_matrix(x, "x", "(m, k) input");
  check_f32_matrix(a, "a", "(r, k) lora_A");
  require_ndim(scale, 1, "scale", "(r,) per-rank scale");
  if (!py::isinstance<py::array_t<float>>(scale))
    throw py::type_error("scale: dtype must be float32, got " + dtype_str(scale));
  require_c_contiguous(scale, "scale");
  const int64_t m = x.shape(0), k = x.shape(1), r = a.shape(0);
  if (k < 1) throw py::value_error("x needs at least one column, got " + shape_str(x));
  check_lora_a(a, k);
  if (scale.shape(0) != r)
    throw py::value_error("scale: shape " + shape_str(scale) + " does not match the rank r = " + std::to_string(r));
  const float* sp = static_cast<const float*>(scale.data());
  for (int64_t j = 0; j < r; ++j)
    if (!std::isfinite(sp[j])) throw py::value_error("scale must be finite");
  if (n_threads < 0) throw py::value_error("n_threads must be >= 0 (0: OpenMP default)");
  py::array_t<float> out({m, r});
  gelora::LoraShrinkArgs args;
  args.x = static_cast<const float*>(x.data());
  args.a = static_cast<const float*>(a.data());
  args.scale = sp;
  args.m = m;
  args.k = k;
  args.r = r;
  args.out = out.mutable_data();
  args.n_threads = n_threads;
  gelora::LoraGradPlan plan;
  {
    py::gil_scoped_release release;
    plan = gelora::lora_shrink(args, isa);
  }
  return py::make_tuple(out, lora_plan_info(plan));
}

py::dict info() {
  py::dict d;
  d["isas"] = gelora::available_isas();
#ifdef _OPENMP
  d["openmp"] = true;
  d["max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["max_threads"] = 1;
#endif
  py::dict tiles;
  for (const auto& isa : gelora::available_isas()) {
    const auto& k32 = gelora::tile_kernel_f32(isa);
    const auto& k64 = gelora::tile_kernel_f64(isa);
    tiles[py::str(isa)] = py::make_tuple(py::make_tuple(k32.mr, k32.nr), py::make_tuple(k64.mr, k64.nr));
  }
  d["tiles"] = tiles;
#ifdef GELORA_ASAN_BUILD
  d["asan"] = true;
#else
  d["asan"] = false;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gelora C++ core: exact kNN candidates on symmetric distance tiles (OpenMP).";
  m.def("knn_candidates", &knn_candidates, py::arg("x"), py::arg("kc"), py::kw_only(), py::arg("n_threads") = 0,
        py::arg("isa") = "auto", py::arg("block_rows") = 0, py::arg("block_cols") = 0, py::arg("depth") = 0,
        py::arg("prepack") = -1, py::arg("private_lists") = -1, py::arg("out_d2") = py::none(), py::arg("out_idx") = py::none(),
        R"doc(kc nearest-neighbour candidates of every row of x among the other rows.

Args:
    x: (n, dim) float32 or float64 C-contiguous array, n >= 2.
    kc: candidates per row, 1 <= kc <= n - 1.
    n_threads: OpenMP threads (0: OpenMP's default).
    isa: tile kernel, "auto" (best available), "avx512", "avx2" or "generic".
    block_rows, block_cols, depth: blocking overrides (0: defaults from the cache sizes).
    prepack: pack all rows for the column side once (1), per task (0), or when the copy is < 1 GiB (-1).
    private_lists: per-thread candidate lists of all rows and no phases (1), phased (0), or when the
        extra lists take < 512 MiB (-1).
    out_d2, out_idx: optional preallocated (n, kc) outputs (dtype of x, and int64).

Returns:
    (d2, idx, sq, plan): d2 (n, kc) approximate squared distances |x_i|^2 + |x_j|^2 - 2<x_i, x_j>
    (dtype of x, ascending per row; the dot products are sequential sums in the dtype of x, FMA where the
    CPU has it); idx (n, kc) int64,
    never the row itself (excluded by index, so a duplicate row is a candidate at distance ~0);
    sq (n,) the squared norms used; plan, a dict of the kernel and blocking used.

Raises:
    TypeError: wrong dtype. ValueError: wrong ndim/shape, non-contiguous input, kc out of range,
    mismatched output buffers, an unknown isa, or a non-finite or overflowing squared norm.
)doc");
  m.def("direct_sq_dist", &direct_sq_dist, py::arg("x"), py::arg("cand"), py::kw_only(), py::arg("n_threads") = 0,
        R"doc(Squared distances sum_k (x[i, k] - x[cand[i, j], k])^2 computed directly (no norm shortcut).

Args:
    x: (n, dim) float32/float64 C-contiguous. cand: (n, c) int64 C-contiguous, entries in [0, n).

Returns:
    (n, c) array of the dtype of x (exactly 0 for duplicate rows).

Raises:
    TypeError/ValueError on bad arguments, IndexError for an index outside [0, n).
)doc");
  m.def("prepare_points", &prepare_points, py::arg("x"), py::arg("coef") = py::none(), py::kw_only(),
        py::arg("n_threads") = 0,
        R"doc(One pass over the points: non-finite rows, a row hash for duplicate detection, the column mean.

Args:
    x: (n, dim) float32/float64 C-contiguous, n >= 1.
    coef: optional (dim,) int64 C-contiguous hash coefficients (odd random integers).

Returns:
    (hash, mean, n_nonfinite): hash (n,) int64 with hash[i] = sum_k bits(x[i, k] + 0) * coef[k] modulo
    2^64 (bits: the IEEE pattern as a signed int32/int64, so -0.0 hashes like 0.0; equal rows, equal
    hashes), or None without coef; mean (dim,) float64 column means accumulated in float64;
    n_nonfinite: the number of rows holding a NaN or an Inf.
)doc");
  m.def("centre", &centre, py::arg("x"), py::arg("mean"), py::kw_only(), py::arg("n_threads") = 0,
        py::arg("out") = py::none(),
        R"doc(x - mean with the mean rounded to the dtype of x first (as torch's x - mean.to(x.dtype)).

Args:
    x: (n, dim) float32/float64 C-contiguous. mean: (dim,) float64.
    out: optional (n, dim) output of x's dtype; may be x itself (in place).

Returns:
    (n, dim) array of the dtype of x.
)doc");
  m.def("lora_grad", &lora_grad, py::arg("x"), py::arg("dy"), py::arg("a"), py::arg("b"), py::arg("scaling"),
        py::kw_only(), py::arg("want_t") = false, py::arg("n_threads") = 0, py::arg("isa") = "auto",
        py::arg("block_rows") = 0,
        R"doc(Weight gradients of a LoRA projection y = x W^T + s (x A^T) B^T in one pass over x and dy.

Computes S = s x A^T and T = s dy B per block of tokens and accumulates dA = T^T x and dB = dy^T S
(see csrc/lora_grad.h).

Args:
    x: (m, k) float32 C-contiguous input. dy: (m, n) float32 gradient of the output.
    a: (r, k) lora_A. b: (n, r) lora_B. scaling: s.
    want_t: also return T = s dy B (m, r), the input gradient's LoRA factor (dX = dy W + T A).
    n_threads: OpenMP threads (0: OpenMP's default). isa: "auto", "avx512", "avx2" or "generic".
    block_rows: tokens per block (0: from the cache size).

Returns:
    (da, db, t, plan): da (r, k), db (n, r), t (m, r) or None, plan a dict (isa, threads, block_rows,
    rank_pad).

Raises:
    TypeError: a dtype other than float32. ValueError: wrong ndim, non-contiguous operand, mismatched
    shapes, rank 0, non-finite scaling, an unknown isa.
)doc");
  m.def("lora_shrink", &lora_shrink, py::arg("x"), py::arg("a"), py::arg("scale"), py::kw_only(),
        py::arg("n_threads") = 0, py::arg("isa") = "auto",
        R"doc(The LoRA shrink S[:, j] = scale[j] * (x a^T)[:, j] (the forward of an unmerged LoRA layer).

Args:
    x: (m, k) float32 C-contiguous. a: (r, k) float32 (lora_A, or the concatenated A of a group).
    scale: (r,) float32 per-rank scale. n_threads: 0 = automatic. isa: as for lora_grad.

Returns:
    (S, plan): S (m, r) float32; plan a dict (isa, threads, block_rows, rank_pad).

Raises:
    TypeError: a dtype other than float32. ValueError: wrong ndim, non-contiguous operand, mismatched
    shapes, rank 0, non-finite scale, an unknown isa.
)doc");
  m.def("info", &info, "Kernels this build carries and this CPU runs (best first), OpenMP, tile shapes.");
}
