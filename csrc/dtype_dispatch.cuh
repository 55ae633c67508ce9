// The sample dtypes of the CUDA kernels (host only): their names in error messages, and the dispatch from
// a tensor's ScalarType to the CUDA element type a kernel is instantiated for.
#pragma once

#include "platform.cuh"

namespace diffkern {

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Double: return "float64";
    case ScalarType::Long: return "int64";
    default: return "an unsupported dtype";
  }
}

// Calls f(T{}) with T the CUDA element type of `dtype` (float32, float16, bfloat16).
template <typename F>
inline void dispatch_float_types(ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case ScalarType::Float: f(float{}); break;
    case ScalarType::Half: f(__half{}); break;
    case ScalarType::BFloat16: f(__nv_bfloat16{}); break;
    default:
      STD_TORCH_CHECK(false, "diffkern: ", what, " supports float32, float16 and bfloat16 on the cuda backend, got ",
                      dtype_name(dtype));
  }
}

}  // namespace diffkern
