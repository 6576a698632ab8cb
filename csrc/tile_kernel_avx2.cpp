// The tile kernel built for the avx2 instruction set (see tile_kernel_impl.h); CMake sets the flags.
#define GELORA_ISA avx2
#define GELORA_VBYTES 32
#include "tile_kernel_impl.h"
