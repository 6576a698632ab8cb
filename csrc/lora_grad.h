// Weight gradients of a LoRA adapter on the CPU in one pass over the activations.
//
// For one LoRA projection y = x W^T + s (x A^T) B^T with x (m, k), dY (m, n), A (r, k), B (n, r):
//
//     S  = s x A^T     (m, r)        T  = s dY B    (m, r)
//     dA = T^T x       (r, k)        dB = dY^T S    (n, r)
//
// A BLAS computes these as four skinny GEMMs, each one a pass over x or dY (2 m r (k or n) flops on
// 4 m (k or n) bytes) that runs far below the GEMM peak: at m = 2048, k = n = 1024, r = 16 on 2 Zen 4
// cores MKL takes 2.5 ms for the four, ~110 GFLOP/s. Here the rows are cut into blocks of `mb`
// tokens; for each block, while its rows of x and dY sit in L2, one thread computes S and T of the
// block (register tiles of 8 tokens x one vector of ranks) and accumulates dA and dB^T of the block
// into private partial sums (tiles of 8 (AVX-512) or 4 ranks x 3 vectors of columns). The partial
// sums are added at the end. Every product is computed once; nothing of size m x k goes to memory.
//
// Rounding: fp32 FMAs; S and T sum the features in chunks of 128 and then the chunk sums; dA and dB
// sum each token block, then the blocks of a thread, then the threads. Errors match MKL's sgemm at
// m = 2048, k = n = 1024 (max relative error against float64 about 3e-7).
#pragma once

#include <cstdint>
#include <string>

namespace gelora {

struct LoraGradArgs {
  const float* x;   // (m, k) row-major
  const float* dy;  // (m, n) row-major
  const float* a;   // (r, k) lora_A
  const float* b;   // (n, r) lora_B
  int64_t m, k, n, r;
  float scaling;    // s
  float* da;        // (r, k) out: dA = s (dY B)^T x
  float* db;        // (n, r) out: dB = s dY^T (x A^T)
  float* t;         // (m, r) out, or null: T = s dY B (the input gradient needs T A)
  int n_threads;    // <= 0: OpenMP's default
  int64_t block_rows;  // tokens per block, <= 0: from the cache size
};

struct LoraGradPlan {
  std::string isa;
  int threads = 1;
  int64_t block_rows = 0;
  int64_t rank_pad = 0;  // r rounded up to the vector width
};

// The shrink S = x (diag(scale) A)^T alone (the forward of a LoRA layer that is not merged): the rows
// tiles above, a BLAS sgemm with n = r columns runs at ~10 % of its peak (0.32 ms at m = 512,
// k = 1024, r = 4 on 2 Zen 4 cores).
struct LoraShrinkArgs {
  const float* x;      // (m, k)
  const float* a;      // (r, k)
  const float* scale;  // (r,) per-rank scale s_j (a grouped layer's blocks have their own s)
  int64_t m, k, r;
  float* out;          // (m, r)
  int n_threads;
};

// Runs the kernel for `isa` ("auto", "avx512", "avx2", "generic"); throws std::invalid_argument for an
// ISA this build or CPU lacks.
LoraGradPlan lora_grad(const LoraGradArgs& args, const std::string& isa = "auto");
LoraGradPlan lora_shrink(const LoraShrinkArgs& args, const std::string& isa = "auto");

namespace generic {
LoraGradPlan lora_grad(const LoraGradArgs& args);
LoraGradPlan lora_shrink(const LoraShrinkArgs& args);
}
#ifdef GELORA_HAVE_AVX2
namespace avx2 {
LoraGradPlan lora_grad(const LoraGradArgs& args);
LoraGradPlan lora_shrink(const LoraShrinkArgs& args);
}
#endif
#ifdef GELORA_HAVE_AVX512
namespace avx512 {
LoraGradPlan lora_grad(const LoraGradArgs& args);
LoraGradPlan lora_shrink(const LoraShrinkArgs& args);
}
#endif

}  // namespace gelora
