#include "lora_grad.h"

#include <stdexcept>

#include "tile_kernel.h"  // available_isas()

namespace gelora {

namespace {

std::string resolve_isa(const std::string& isa) {
  const std::vector<std::string> have = available_isas();
  if (isa == "auto") return have.front();
  for (const auto& h : have)
    if (h == isa) return h;
  std::string msg = "isa '" + isa + "' is not available in this build on this CPU; choose one of: auto";
  for (const auto& h : have) msg += ", " + h;
  throw std::invalid_argument(msg);
}

}  // namespace

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
