#include "lora_grad.h"


#include "tile_kernel.h"  // resolve_isa()

namespace gelora {

LoraGradPlan lora_grad(const LoraGradArgs& args, const std::string& isa) {
  const std::string pick = resolve_isa(isa);
#ifdef GELORA_HAVE_AVX512
  if (pick == "avx512") return avx512::lora_grad(args);
#endif
#ifdef GELORA_HAVE_AVX2
  if (pick == "avx2") return avx2::lora_grad(args);
#endif
  return generic::lora_grad(args);
}

LoraGradPlan lora_shrink(const LoraShrinkArgs& args, const std::string& isa) {
  const std::string pick = resolve_isa(isa);
#ifdef GELORA_HAVE_AVX512
  if (pick == "avx512") return avx512::lora_shrink(args);
#endif
#ifdef GELORA_HAVE_AVX2
  if (pick == "avx2") return avx2::lora_shrink(args);
#endif
  return generic::lora_shrink(args);
}

}  // namespace gelora
