// The symmetric distance-tile kernel: interface and instruction-set dispatch.
//
// One call of TileKernel::run computes, for a block of rows I = [i0, i1) and a range of columns
// J = [j0, j1) with every j in J after every i in I (or J == I, "diagonal"), the squared distances
//     d2(i, j) = |x_i|^2 + |x_j|^2 - 2 <x_i, x_j>
// with a register-blocked GEMM (packed panels, K split into chunks of kc_blk), and in the epilogue of
// the last K chunk, straight from the registers, offers every pair to BOTH lists: j to row i's top-k
// and i to row j's top-k. The distance matrix is symmetric, so the (i, j) and (j, i) halves are never
// both computed: half the arithmetic of a query/database search. On the diagonal only pairs j > i are
// offered, so a row is excluded from its own list by index, never by distance (duplicates are at 0).
//
// The kernels are compiled once per instruction set (tile_kernel_<isa>.cpp) from tile_kernel_impl.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "topk_lists.h"

namespace gelora {

template <typename T>
struct TileArgs {
  const T* x;          // (n, dim) row-major points
  int64_t n, dim;
  const T* sq;         // (n + pad) squared norms; +inf for the padding rows i >= n
  const T* a_pack;     // rows [i0, i1) packed by pack_rows, all K chunks, chunk after chunk
  int64_t i0, i1;      // the row block
  int64_t j0, j1;      // the columns; j0 a multiple of nr, and j1 == n or (j1 - j0) a multiple of nr
  int64_t kc_blk;      // length of a K chunk (the last one may be shorter)
  bool diagonal;       // J == I: only the pairs j > i
  const T* b_pre;      // all n rows packed by pack_cols (chunk after chunk, chunk stride b_stride), or
  int64_t b_stride;    // null: then the kernel packs the columns into b_pack itself
  T* b_pack;           // scratch: round_up(j1 - j0, nr) * kc_blk
  T* c_buf;            // scratch for partial sums: round_up(i1 - i0, mr) * round_up(j1 - j0, nr)
  TopkLists<T> rows;   // lists of the rows of I
  TopkLists<T> cols;   // lists of the rows of J (the same object as `rows` on the diagonal)
};

template <typename T>
struct TileKernel {
  const char* isa;  // "generic", "avx2" or "avx512"
  int mr, nr;       // register tile: mr rows by nr columns
  // Packs rows [r0, r1) (a multiple of mr of them, or ending at r1 == n) of the K range
  // [k0, k0 + klen) into panels of mr rows: out[panel][k][mr], zero rows past r1.
  void (*pack_rows)(const T* x, int64_t dim, int64_t r0, int64_t r1, int64_t k0, int64_t klen, T* out);
  // The same in panels of nr rows (the column side): out[panel][k][nr].
  void (*pack_cols)(const T* x, int64_t dim, int64_t r0, int64_t r1, int64_t k0, int64_t klen, T* out);
  void (*run)(const TileArgs<T>& args);
};

// The kernels this build carries and this CPU can run, best first.
std::vector<std::string> available_isas();
// The name `isa` stands for ("auto" = the best available); throws std::invalid_argument for an unknown
// or unsupported name. Shared by every kernel family compiled per instruction set.
std::string resolve_isa(const std::string& isa);
// The kernel for `isa` ("auto" = the best available). Throws std::invalid_argument for an unknown or
// unsupported name.
const TileKernel<float>& tile_kernel_f32(const std::string& isa);
const TileKernel<double>& tile_kernel_f64(const std::string& isa);

// Per-ISA entry points (defined in tile_kernel_<isa>.cpp).
namespace generic { extern const TileKernel<float> kernel_f32; extern const TileKernel<double> kernel_f64; }
#ifdef GELORA_HAVE_AVX2
namespace avx2 { extern const TileKernel<float> kernel_f32; extern const TileKernel<double> kernel_f64; }
#endif
#ifdef GELORA_HAVE_AVX512
namespace avx512 { extern const TileKernel<float> kernel_f32; extern const TileKernel<double> kernel_f64; }
#endif

}  // namespace gelora
