// SIMD vector types and helpers of one instruction-set copy, shared by the kernel bodies that are
// compiled once per instruction set (tile_kernel_impl.h, lora_grad_impl.h).
//
// The including translation unit (<kernel>_<isa>.cpp) defines GELORA_ISA (the namespace: generic,
// avx2, avx512) and GELORA_VBYTES (the vector width in bytes) and is compiled with the matching -m flags.
#pragma once

#include <cstdint>

#if GELORA_VBYTES > 16
#include <immintrin.h>
#endif

#ifndef GELORA_ISA
#error "define GELORA_ISA (generic, avx2 or avx512) before including simd_impl.h"
#endif

// Vector width of this copy (bytes): set by the including file, not taken from the compiler flags, so
// that a -march=native build still has three different kernels behind the three names.
#if !defined(GELORA_VBYTES) || (GELORA_VBYTES != 16 && GELORA_VBYTES != 32 && GELORA_VBYTES != 64)
#error "define GELORA_VBYTES (16, 32 or 64) before including simd_impl.h"
#endif
#if GELORA_VBYTES == 32 && !(defined(__AVX2__) && defined(__FMA__))
#error "the 32-byte kernel needs -mavx2 -mfma"
#endif
#if GELORA_VBYTES == 64 && !defined(__AVX512F__)
#error "the 64-byte kernel needs -mavx512f"
#endif

#define GELORA_STR2(s) #s
#define GELORA_STR(s) GELORA_STR2(s)

namespace gelora {
namespace GELORA_ISA {

template <typename T>
struct Simd;

template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(GELORA_VBYTES)));
  typedef float VU __attribute__((vector_size(GELORA_VBYTES), aligned(4)));
  static constexpr int W = GELORA_VBYTES / 4;
  static inline V set1(float s) {
#if GELORA_VBYTES == 64
    return (V)_mm512_set1_ps(s);
#elif GELORA_VBYTES == 32
    return (V)_mm256_set1_ps(s);
#else
    V v;
    for (int l = 0; l < W; ++l) v[l] = s;
    return v;
#endif
  }
  static inline V fma(V a, V b, V c) {
#if GELORA_VBYTES == 64
    return (V)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif GELORA_VBYTES == 32
    return (V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
  }
  // bit l set when a[l] < b[l] (false for NaN)
  static inline uint64_t lt(V a, V b) {
#if GELORA_VBYTES == 64
    return (uint64_t)_mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_LT_OQ);
#elif GELORA_VBYTES == 32
    return (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps((__m256)a, (__m256)b, _CMP_LT_OQ));
#else
    uint64_t m = 0;
    for (int l = 0; l < W; ++l) m |= (uint64_t)(a[l] < b[l]) << l;
    return m;
#endif
  }
};

template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(GELORA_VBYTES)));
  typedef double VU __attribute__((vector_size(GELORA_VBYTES), aligned(8)));
  static constexpr int W = GELORA_VBYTES / 8;
  static inline V set1(double s) {
#if GELORA_VBYTES == 64
    return (V)_mm512_set1_pd(s);
#elif GELORA_VBYTES == 32
    return (V)_mm256_set1_pd(s);
#else
    V v;
    for (int l = 0; l < W; ++l) v[l] = s;
    return v;
#endif
  }
  static inline V fma(V a, V b, V c) {
#if GELORA_VBYTES == 64
    return (V)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif GELORA_VBYTES == 32
    return (V)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
    return a * b + c;
#endif
  }
  static inline uint64_t lt(V a, V b) {
#if GELORA_VBYTES == 64
    return (uint64_t)_mm512_cmp_pd_mask((__m512d)a, (__m512d)b, _CMP_LT_OQ);
#elif GELORA_VBYTES == 32
    return (uint64_t)(uint32_t)_mm256_movemask_pd(_mm256_cmp_pd((__m256d)a, (__m256d)b, _CMP_LT_OQ));
#else
    uint64_t m = 0;
    for (int l = 0; l < W; ++l) m |= (uint64_t)(a[l] < b[l]) << l;
    return m;
#endif
  }
};

}  // namespace GELORA_ISA
}  // namespace gelora
