// The LoRA weight-gradient kernel built for the avx2 instruction set (see lora_grad_impl.h).
#define GELORA_ISA avx2
#define GELORA_VBYTES 32
#include "lora_grad_impl.h"
