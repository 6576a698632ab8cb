// Runtime detection of the instruction sets the tile kernels are compiled for.
#pragma once

namespace gelora {

// True when the CPU and the operating system support AVX2 and FMA (ymm state enabled).
bool cpu_has_avx2_fma();
// True when the CPU and the operating system support AVX-512 F (zmm and mask state enabled).
bool cpu_has_avx512f();

}  // namespace gelora
