// The LoRA weight-gradient kernel built for the avx512 instruction set (see lora_grad_impl.h).
#define GELORA_ISA avx512
#define GELORA_VBYTES 64
#include "lora_grad_impl.h"
