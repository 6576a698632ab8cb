#include "tile_kernel.h"

#include <stdexcept>

#include "cpu_features.h"

namespace gelora {

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
#ifdef GELORA_HAVE_AVX512
  if (cpu_has_avx512f() && cpu_has_avx2_fma()) out.push_back("avx512");
#endif
#ifdef GELORA_HAVE_AVX2
  if (cpu_has_avx2_fma()) out.push_back("avx2");
#endif
  out.push_back("generic");
  return out;
}

std::string resolve_isa(const std::string& isa) {
  const std::vector<std::string> have = available_isas();
  if (isa == "auto") return have.front();
  for (const auto& h : have)
    if (h == isa) return h;
  std::string msg = "isa '" + isa + "' is not available in this build on this CPU; choose one of: auto";
  for (const auto& h : have) msg += ", " + h;
  throw std::invalid_argument(msg);
}

namespace {

template <typename T>
const TileKernel<T>& pick(const std::string& isa, const TileKernel<T>& g
#ifdef GELORA_HAVE_AVX2
                          , const TileKernel<T>& a2
#endif
#ifdef GELORA_HAVE_AVX512
                          , const TileKernel<T>& a5
#endif
) {
  const std::string r = resolve_isa(isa);
#ifdef GELORA_HAVE_AVX512
  if (r == "avx512") return a5;
#endif
#ifdef GELORA_HAVE_AVX2
  if (r == "avx2") return a2;
#endif
  return g;
}

}  // namespace

const TileKernel<float>& tile_kernel_f32(const std::string& isa) {
  return pick<float>(isa, generic::kernel_f32
#ifdef GELORA_HAVE_AVX2
                     , avx2::kernel_f32
#endif
#ifdef GELORA_HAVE_AVX512
                     , avx512::kernel_f32
#endif
  );
}

const TileKernel<double>& tile_kernel_f64(const std::string& isa) {
  return pick<double>(isa, generic::kernel_f64
#ifdef GELORA_HAVE_AVX2
                      , avx2::kernel_f64
#endif
#ifdef GELORA_HAVE_AVX512
                      , avx512::kernel_f64
#endif
  );
}

}  // namespace gelora
