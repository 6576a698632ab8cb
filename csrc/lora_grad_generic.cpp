// The LoRA weight-gradient kernel built for the generic instruction set (see lora_grad_impl.h).
#define GELORA_ISA generic
#define GELORA_VBYTES 16
#include "lora_grad_impl.h"
