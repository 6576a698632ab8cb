// The tile kernel built for the avx512 instruction set (see tile_kernel_impl.h); CMake sets the flags.
#define GELORA_ISA avx512
#define GELORA_VBYTES 64
#include "tile_kernel_impl.h"
