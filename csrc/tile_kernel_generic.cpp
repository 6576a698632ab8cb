// The tile kernel built for the generic instruction set (see tile_kernel_impl.h); CMake sets the flags.
#define GELORA_ISA generic
#define GELORA_VBYTES 16
#include "tile_kernel_impl.h"
