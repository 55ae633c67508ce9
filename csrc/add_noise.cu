// add_noise: x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * noise, abar_t gathered per sample (at the
// timesteps tensor's entry, or at the host timestep when the tensor is None).
//
// One pass: reads x_0 and noise once, writes x_t once (16-byte vectors where the streams align).
// Coefficients are fp32 whatever the sample dtype (see diffkern/ops/add_noise.py).
#include "dtype_dispatch.cuh"
#include "elementwise.cuh"
#include "platform.cuh"
#include "step_coefficients.cuh"
#include "tensor_checks.cuh"

namespace diffkern {
namespace {

struct AddNoiseOp {
  const float* table;
  int64_t table_len;
  Timesteps timesteps;

  struct Coef {
    float sqrt_a;
    float sqrt_b;
  };

  __device__ __forceinline__ Coef coef(int64_t b) const {
    const float a = gather_abar(table, table_len, timesteps, b);
    return Coef{sqrtf(a), sqrtf(1.0f - a)};
  }

  __device__ __forceinline__ void apply(const Coef& c, const float (&in)[2], float (&out)[1]) const {
    out[0] = c.sqrt_a * in[0] + c.sqrt_b * in[1];
  }
};

}  // namespace

Tensor add_noise_cuda(const Tensor& original_samples, const Tensor& noise, const Tensor& alphas_cumprod,
                      const std::optional<Tensor>& timesteps, int64_t host_timesteps) {
  check_cuda_tensor(original_samples, "original_samples");
  check_sample_dtype(original_samples, "original_samples");
  STD_TORCH_CHECK(original_samples.dim() >= 1, "diffkern: original_samples must have a batch dimension");
  check_same_device(noise, "noise", original_samples, "original_samples");
  check_dtype(noise, "noise", original_samples.scalar_type());
  STD_TORCH_CHECK(same_sizes(noise, original_samples), "diffkern: noise must have original_samples' shape");
  STD_TORCH_CHECK(is_batch_outer_dense(original_samples) && same_strides(noise, original_samples),
                  "diffkern: original_samples and noise must be laid out alike, dense with the batch outermost");
  const int64_t batch = original_samples.size(0);
  check_table(alphas_cumprod, original_samples);
  check_timesteps(timesteps, "timesteps", original_samples, batch);

  Tensor out = empty_strided_like(original_samples, original_samples.scalar_type());
  if (original_samples.numel() == 0) return out;
  const int64_t n = original_samples.numel() / batch;

  const DeviceGuard guard(original_samples.get_device_index());
  const cudaStream_t stream = current_stream(original_samples.get_device_index());
  const AddNoiseOp op{static_cast<const float*>(alphas_cumprod.const_data_ptr()), alphas_cumprod.numel(),
                      timesteps_arg(timesteps, host_timesteps)};

  dispatch_float_types(original_samples.scalar_type(), "add_noise", [&](auto tag) {
    using T = decltype(tag);
    InStreams<T, 2> in{{static_cast<const T*>(original_samples.const_data_ptr()),
                        static_cast<const T*>(noise.const_data_ptr())},
                       {n, n}};
    OutStreams<T, 1> o{{static_cast<T*>(out.mutable_data_ptr())}, {n}};
    launch_sample_map("add_noise", in, o, n, batch, op, stream);
  });
  return out;
}

}  // namespace diffkern

STABLE_TORCH_LIBRARY_IMPL(diffkern, DIFFKERN_DISPATCH_KEY, m) {
  m.impl("add_noise_cuda", TORCH_BOX(&diffkern::add_noise_cuda));
}
