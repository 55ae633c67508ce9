// Flow matching (diffusers' FlowMatchEulerDiscreteScheduler; see diffkern/ops/flow_match.py and
// flow_add_noise.py): the Euler step, with classifier-free guidance and its std rescale fused in, and the forward
// process.
//
// flow_match_step_cuda: one elementwise-engine kernel reads model_output (both halves with guidance), the sample
// and, stochastic, the noise once, and writes prev_sample and pred_original_sample once. Each of sigma and
// sigma_next is a float32 [1 or B] device tensor, read in the kernel, or a host value shared by the batch (the
// op's `Tensor? sigma, float host_sigma` pair: a python float is a kernel argument, not a fill kernel).
//
// Guidance rescale needs q = std(cond) / std(v) per sample (v the guided velocity, unbiased std over the whole
// sample) before any element is written: the stats pass every step with guidance shares (guidance_rescale.cuh:
// one pass over both halves, a merge), then the step reads q. Two passes over the model output, three launches;
// deterministic (no atomics).
//
// flow_add_noise_cuda: one engine pass, sigma * noise + (1 - sigma) * x0.
#include "guidance_rescale.cuh"
#include "step.cuh"

namespace diffkern {
namespace {

// A sigma argument as the kernels take it: a [1] (shared) or [B] device tensor, or (values == nullptr) the host
// value shared by the batch.
struct SigmaArg {
  const float* values;
  int64_t numel;
  float host;

  __device__ __forceinline__ float of(int64_t b) const {
    return values == nullptr ? host : values[numel == 1 ? 0 : b];
  }
};

struct FlowScalars {
  SigmaArg sigma;
  SigmaArg sigma_next;
  GuidanceRescale rescale;  // q per sample with the rescale (else null), r, and keep = 1 - r rounded once from
                            // float64 (as the pipelines compute it)
  float guidance_scale;
};

// The step; its streams are StepStreams' (the noise stream is the stochastic step's z).
template <bool GUIDED, bool STOCHASTIC, bool RESCALE>
struct FlowStepOp : StepStreams<GUIDED, STOCHASTIC, false> {
  using Streams = StepStreams<GUIDED, STOCHASTIC, false>;

  FlowScalars p;

  struct Coef {
    float s;
    float s_next;
    float dt;         // sigma_next - sigma
    float keep_next;  // 1 - sigma_next
    float q;
  };

  __device__ __forceinline__ Coef coef(int64_t b) const {
    Coef c;
    c.s = p.sigma.of(b);
    c.s_next = p.sigma_next.of(b);
    c.dt = c.s_next - c.s;
    c.keep_next = 1.0f - c.s_next;
    c.q = RESCALE ? p.rescale.q(b) : 1.0f;
    return c;
  }

  __device__ __forceinline__ void apply(const Coef& c, const float (&in)[Streams::kIn], float (&out)[2]) const {
    float v = in[0];
    if constexpr (GUIDED) v = v + p.guidance_scale * (in[1] - v);
    if constexpr (RESCALE) v = p.rescale.apply(v, c.q);
    const float x = in[Streams::kX];
    const float x0 = x - c.s * v;
    if constexpr (STOCHASTIC) {
      out[0] = c.keep_next * x0 + c.s_next * in[Streams::noise_index()];
    } else {
      out[0] = x + c.dt * v;
    }
    out[1] = x0;
  }
};

struct FlowAddNoiseOp {
  SigmaArg sigma;

  struct Coef {
    float s;
    float keep;
  };

  __device__ __forceinline__ Coef coef(int64_t b) const {
    const float s = sigma.of(b);
    return Coef{s, 1.0f - s};
  }

  __device__ __forceinline__ void apply(const Coef& c, const float (&in)[2], float (&out)[1]) const {
    out[0] = c.s * in[1] + c.keep * in[0];
  }
};

// The kernels' view of a `Tensor? sigma, float host_sigma` pair, checked: the host value is taken as float32 (the
// callers round it to float32 first; a cast rounds to nearest either way).
SigmaArg sigma_arg(const std::optional<Tensor>& sigma, double host_sigma, const char* name, const Tensor& sample,
                   int64_t batch) {
  if (!sigma.has_value()) return SigmaArg{nullptr, 1, static_cast<float>(host_sigma)};
  check_same_device(*sigma, name, sample, "sample");
  check_dtype(*sigma, name, ScalarType::Float);
  STD_TORCH_CHECK(sigma->dim() == 1 && (sigma->numel() == 1 || sigma->numel() == batch) && sigma->is_contiguous(),
                  "diffkern: ", name, " must be a contiguous float32 tensor of shape [1] or [", batch, "]");
  return SigmaArg{static_cast<const float*>(sigma->const_data_ptr()), sigma->numel(), 0.0f};
}

}  // namespace

std::tuple<Tensor, Tensor> flow_match_step_cuda(const Tensor& model_output, const Tensor& sample,
                                                const std::optional<Tensor>& noise,
                                                const std::optional<Tensor>& sigma, double host_sigma,
                                                const std::optional<Tensor>& sigma_next, double host_sigma_next,
                                                std::optional<double> guidance_scale,
                                                double guidance_rescale, double keep, bool stochastic) {
  check_cuda_tensor(sample, "sample");
  check_sample_dtype(sample, "sample");
  STD_TORCH_CHECK(sample.dim() >= 1, "diffkern: sample must have a batch dimension");
  const int64_t batch = sample.size(0);
  const bool guided = guidance_scale.has_value();
  STD_TORCH_CHECK(model_output.dim() == sample.dim() && model_output.size(0) == (guided ? 2 : 1) * batch,
                  "diffkern: model_output must have ", guided ? "2B" : "B", " samples of sample's shape");
  check_model_output(model_output, sample, 1);
  check_alike_batch_outer(model_output, sample);
  const SigmaArg sigma_values = sigma_arg(sigma, host_sigma, "sigma", sample, batch);
  const SigmaArg sigma_next_values = sigma_arg(sigma_next, host_sigma_next, "sigma_next", sample, batch);
  STD_TORCH_CHECK(!stochastic || noise.has_value(), "diffkern: the stochastic flow_match_step needs noise");
  if (stochastic) {
    check_same_device(*noise, "noise", sample, "sample");
    check_dtype(*noise, "noise", sample.scalar_type());
    STD_TORCH_CHECK(same_sizes(*noise, sample) && same_strides(*noise, sample),
                    "diffkern: noise must have sample's shape and layout");
  }
  const bool rescaled = guided && guidance_rescale != 0.0;

  FlowScalars s{};
  s.sigma = sigma_values;
  s.sigma_next = sigma_next_values;
  s.guidance_scale = guided ? static_cast<float>(*guidance_scale) : 0.0f;
  s.rescale = GuidanceRescale{nullptr, static_cast<float>(guidance_rescale), static_cast<float>(keep)};
  Tensor factor = empty_float(sample, {0});

  auto full_step = [&](auto* prev, auto* x0, int64_t n, int64_t mo_n, cudaStream_t stream) {
    using T = std::remove_pointer_t<decltype(prev)>;
    if (rescaled) {
      factor = guidance_rescale_factor(model_output, sample, batch, n, n, s.guidance_scale, stream);
      s.rescale.factor = static_cast<const float*>(factor.const_data_ptr());
    }
    auto run = [&](auto guided_c, auto stochastic_c, auto rescale_c) {
      using Op = FlowStepOp<decltype(guided_c)::value, decltype(stochastic_c)::value, decltype(rescale_c)::value>;
      launch_step("flow_match_step", Op{{}, s}, InStreams<T, Op::kIn>{}, model_output, sample, noise, prev, x0, n,
                  mo_n, batch, stream);
    };
    using True = std::true_type;
    using False = std::false_type;
    if (rescaled) {
      stochastic ? run(True{}, True{}, True{}) : run(True{}, False{}, True{});
    } else if (guided) {
      stochastic ? run(True{}, True{}, False{}) : run(True{}, False{}, False{});
    } else {
      stochastic ? run(False{}, True{}, False{}) : run(False{}, False{}, False{});
    }
  };
  // run_step's x0 pass (dynamic thresholding) is not used here: x0_only is false.
  return run_step("flow_match_step", StepScalars{}, model_output, sample, batch, guided, false, full_step);
}

Tensor flow_add_noise_cuda(const Tensor& original_samples, const Tensor& noise, const std::optional<Tensor>& sigma,
                           double host_sigma) {
  check_cuda_tensor(original_samples, "original_samples");
  check_sample_dtype(original_samples, "original_samples");
  STD_TORCH_CHECK(original_samples.dim() >= 1, "diffkern: original_samples must have a batch dimension");
  check_same_device(noise, "noise", original_samples, "original_samples");
  check_dtype(noise, "noise", original_samples.scalar_type());
  STD_TORCH_CHECK(same_sizes(noise, original_samples), "diffkern: noise must have original_samples' shape");
  STD_TORCH_CHECK(is_batch_outer_dense(original_samples) && same_strides(noise, original_samples),
                  "diffkern: original_samples and noise must be laid out alike, dense with the batch outermost");
  const int64_t batch = original_samples.size(0);
  const SigmaArg sigma_values = sigma_arg(sigma, host_sigma, "sigma", original_samples, batch);

  Tensor out = empty_strided_like(original_samples, original_samples.scalar_type());
  if (original_samples.numel() == 0) return out;
  const int64_t n = original_samples.numel() / batch;
  const DeviceGuard guard(original_samples.get_device_index());
  const cudaStream_t stream = current_stream(original_samples.get_device_index());
  const FlowAddNoiseOp op{sigma_values};
  dispatch_float_types(original_samples.scalar_type(), "flow_add_noise", [&](auto tag) {
    using T = decltype(tag);
    InStreams<T, 2> in{{static_cast<const T*>(original_samples.const_data_ptr()),
                        static_cast<const T*>(noise.const_data_ptr())},
                       {n, n}};
    OutStreams<T, 1> o{{static_cast<T*>(out.mutable_data_ptr())}, {n}};
    launch_sample_map("flow_add_noise", in, o, n, batch, op, stream);
  });
  return out;
}

}  // namespace diffkern

STABLE_TORCH_LIBRARY_IMPL(diffkern, DIFFKERN_DISPATCH_KEY, m) {
  m.impl("flow_match_step_cuda", TORCH_BOX(&diffkern::flow_match_step_cuda));
  m.impl("flow_add_noise_cuda", TORCH_BOX(&diffkern::flow_add_noise_cuda));
}
