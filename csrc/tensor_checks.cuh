// Tensor checks and output allocation (host only), written against torch's stable ABI only.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

#include "dtype_dispatch.cuh"
#include "platform.cuh"

namespace diffkern {

inline void check_same_device(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  check_cuda_tensor(t, name);
  STD_TORCH_CHECK(t.get_device_index() == ref.get_device_index(), "diffkern: ", name, " is on cuda:",
                  t.get_device_index(), " but ", ref_name, " is on cuda:", ref.get_device_index());
}

inline void check_dtype(const Tensor& t, const char* name, ScalarType expected) {
  STD_TORCH_CHECK(t.scalar_type() == expected, "diffkern: ", name, " must be ", dtype_name(expected), ", got ",
                  dtype_name(t.scalar_type()));
}

inline void check_sample_dtype(const Tensor& t, const char* name) {
  const ScalarType s = t.scalar_type();
  STD_TORCH_CHECK(s == ScalarType::Float || s == ScalarType::Half || s == ScalarType::BFloat16, "diffkern: ", name,
                  " must be float32, float16 or bfloat16 for the cuda backend (float64 runs on the reference), got ",
                  dtype_name(s));
}

inline bool same_sizes(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != b.size(d)) return false;
  }
  return true;
}

// Strides equal in every dimension of size > 1 (a size-1 dimension's stride is never used).
inline bool same_strides(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && b.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Dense and non-overlapping with the batch dimension outermost: each of the size(0) samples is one
// contiguous run of numel / size(0) elements (NCHW, channels_last and channels_last_3d all qualify).
inline bool is_batch_outer_dense(const Tensor& t) {
  const int64_t nd = t.dim();
  if (nd == 0 || t.numel() == 0) return true;
  // Dimensions 1.. must tile one sample exactly: visit them from the smallest stride up.
  int64_t order[16];
  int64_t count = 0;
  STD_TORCH_CHECK(nd <= 16, "diffkern: tensors of more than 16 dimensions are not supported");
  for (int64_t d = 1; d < nd; ++d) {
    if (t.size(d) != 1) order[count++] = d;
  }
  for (int64_t i = 1; i < count; ++i) {  // insertion sort by stride (tiny)
    const int64_t d = order[i];
    int64_t j = i;
    while (j > 0 && t.stride(order[j - 1]) > t.stride(d)) {
      order[j] = order[j - 1];
      --j;
    }
    order[j] = d;
  }
  int64_t expected = 1;
  for (int64_t i = 0; i < count; ++i) {
    if (t.stride(order[i]) != expected) return false;
    expected *= t.size(order[i]);
  }
  return t.size(0) == 1 || t.stride(0) == expected;
}

inline void check_timesteps(const Tensor& ts, const char* name, const Tensor& ref, int64_t batch) {
  check_same_device(ts, name, ref, "sample");
  check_dtype(ts, name, ScalarType::Long);
  STD_TORCH_CHECK(ts.dim() == 1 && (ts.numel() == 1 || ts.numel() == batch), "diffkern: ", name,
                  " must be an int64 tensor of shape [1] or [", batch, "]");  // any stride: read in place
}

// A `Tensor? timestep, int host_timestep` pair: the tensor is checked when present; None means the host
// value (range-checked by the public op) for every sample.
inline void check_timesteps(const std::optional<Tensor>& ts, const char* name, const Tensor& ref, int64_t batch) {
  if (ts.has_value()) check_timesteps(*ts, name, ref, batch);
}

inline void check_table(const Tensor& table, const Tensor& ref) {
  check_same_device(table, "alphas_cumprod", ref, "sample");
  check_dtype(table, "alphas_cumprod", ScalarType::Float);
  STD_TORCH_CHECK(table.dim() == 1 && table.numel() > 0 && table.is_contiguous(),
                  "diffkern: alphas_cumprod must be a contiguous, non-empty float32 [T] tensor");
}

// An uninitialised tensor with `like`'s sizes and strides (so NCHW stays NCHW and channels_last stays
// channels_last) and the given dtype, on `like`'s device.
inline Tensor empty_strided_like(const Tensor& like, ScalarType dtype) {
  const auto sizes = like.sizes();
  const auto strides = like.strides();
  int32_t device_type = 0;
  STD_TORCH_CHECK(aoti_torch_get_device_type(like.get(), &device_type) == AOTI_TORCH_SUCCESS,
                  "diffkern: could not read a tensor's device type");
  int32_t dtype_code = aoti_torch_dtype_float32();
  switch (dtype) {
    case ScalarType::Float: dtype_code = aoti_torch_dtype_float32(); break;
    case ScalarType::Half: dtype_code = aoti_torch_dtype_float16(); break;
    case ScalarType::BFloat16: dtype_code = aoti_torch_dtype_bfloat16(); break;
    default: STD_TORCH_CHECK(false, "diffkern: empty_strided_like: unsupported dtype");
  }
  AtenTensorHandle handle = nullptr;
  STD_TORCH_CHECK(aoti_torch_empty_strided(like.dim(), sizes.data(), strides.data(), dtype_code, device_type,
                                           like.get_device_index(), &handle) == AOTI_TORCH_SUCCESS,
                  "diffkern: allocating an output tensor failed");
  return Tensor(handle);
}

// A contiguous float32 tensor of the given sizes on `like`'s device (scratch buffers, statistics).
inline Tensor empty_float(const Tensor& like, std::initializer_list<int64_t> sizes) {
  const std::vector<int64_t> shape(sizes);
  return torch::stable::new_empty(like, torch::headeronly::IntHeaderOnlyArrayRef(shape.data(), shape.size()),
                                  ScalarType::Float);
}

}  // namespace diffkern
