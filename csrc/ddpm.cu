// The DDPM ancestral step (diffusers' DDPMScheduler.step math; see diffkern/ops/ddpm.py), with
// classifier-free guidance fused in.
//
// One kernel per step reads model_output (both halves with guidance; with a learned variance also the
// predicted-variance channels, from the conditional half), the sample and the noise once, and writes
// prev_sample and pred_original_sample once. Coefficients are fp32 per sample: abar at the timestep
// (clamped), abar_prev = 1 where prev_timestep < 0, and no noise for samples whose timestep is 0.
//
// Learned variance types take a model output of 2C channels, C-contiguous: per sample, the first n elements
// are the prediction and the next n the predicted variance. Dynamic thresholding runs two passes exactly like
// the DDIM step (`x0_only`, then the step with `threshold_scale`), and so does the guidance rescale (see ddim.cu;
// its statistics cover the prediction channels, the first n elements of each model output sample).
#include "step.cuh"

namespace diffkern {
namespace {

enum VarianceType : int {
  kFixedSmall = 0,
  kFixedSmallLog = 1,
  kFixedLarge = 2,
  kFixedLargeLog = 3,
  kLearned = 4,
  kLearnedRange = 5,
};

struct DdpmScalars {
  StepScalars step;
  int variance_type;
};

// The full step (the x0 pass is X0PassOp). Input streams: StepStreams', then [predicted variance
// (conditional half with guidance)]. LEARNED implies NOISE: the predicted variance only scales the noise.
template <bool GUIDED, bool NOISE, bool LEARNED, bool RESCALE>
struct DdpmOp : StepStreams<GUIDED, NOISE, false, RESCALE> {
  static_assert(!LEARNED || NOISE, "the predicted variance is read only when noise is added");
  using Streams = StepStreams<GUIDED, NOISE, false, RESCALE>;
  static constexpr int kIn = Streams::kIn + (LEARNED ? 1 : 0);
  __host__ __device__ static constexpr int var_index() { return Streams::kX + 2; }

  DdpmScalars p;

  struct Coef {
    float sqrt_a;
    float sqrt_b;  // sqrt(1 - abar_t)
    float x0_coef;
    float x_coef;
    float std_dev;  // fixed variance types; 0 where t == 0
    float log_beta;
    float log_v;
    float threshold;
    float q;
    bool noisy;  // t > 0
  };

  __device__ __forceinline__ Coef coef(int64_t b) const {
    const float a = p.step.abar(b);
    const float a_prev = p.step.abar_prev(b, 1.0f);
    const float alpha = a / a_prev;
    const float beta = 1.0f - alpha;
    const float one_minus_a = 1.0f - a;
    Coef c;
    c.sqrt_a = sqrtf(a);
    c.sqrt_b = sqrtf(one_minus_a);
    c.x0_coef = (sqrtf(a_prev) * beta) / one_minus_a;
    c.x_coef = sqrtf(alpha) * (1.0f - a_prev) / one_minus_a;
    float v = ((1.0f - a_prev) / one_minus_a) * beta;
    v = v < 1e-20f ? 1e-20f : v;  // clamp(min=1e-20), NaN kept
    c.noisy = timestep_of(p.step.timestep, b) > 0;
    c.log_beta = logf(beta);
    c.log_v = logf(v);
    float std_dev = 0.0f;
    switch (p.variance_type) {
      case kFixedSmall: std_dev = sqrtf(v); break;
      case kFixedSmallLog: std_dev = expf(0.5f * logf(v)); break;
      case kFixedLarge:
      case kFixedLargeLog: std_dev = sqrtf(beta); break;
      default: break;  // learned: per element
    }
    c.std_dev = c.noisy ? std_dev : 0.0f;
    c.threshold = p.step.threshold(b);
    c.q = p.step.template rescale_q<RESCALE>(b);
    return c;
  }

  __device__ __forceinline__ void apply(const Coef& c, const float (&in)[kIn], float (&out)[2]) const {
    const float x0 = Streams::predict(p.step, in, c.sqrt_a, c.sqrt_b, c.threshold, c.q).x0;
    float prev = c.x0_coef * x0 + c.x_coef * in[Streams::kX];
    if constexpr (NOISE) {
      float std_dev = c.std_dev;
      if constexpr (LEARNED) {
        const float pv = in[var_index()];
        if (!c.noisy) {
          std_dev = 0.0f;
        } else if (p.variance_type == kLearned) {
          std_dev = sqrtf(pv);
        } else {
          const float frac = (pv + 1.0f) / 2.0f;
          std_dev = expf(0.5f * (frac * c.log_beta + (1.0f - frac) * c.log_v));
        }
      }
      prev = prev + std_dev * in[Streams::noise_index()];
    }
    out[0] = prev;
    out[1] = x0;
  }
};

}  // namespace

std::tuple<Tensor, Tensor> ddpm_step_cuda(const Tensor& model_output, const Tensor& sample,
                                          const std::optional<Tensor>& noise, const Tensor& alphas_cumprod,
                                          const std::optional<Tensor>& timestep, int64_t host_timestep,
                                          const std::optional<Tensor>& prev_timestep, int64_t host_prev_timestep,
                                          int64_t variance_type,
                                          int64_t prediction_type, bool clip_sample, double clip_sample_range,
                                          const std::optional<Tensor>& threshold_scale,
                                          std::optional<double> guidance_scale, bool x0_only,
                                          double guidance_rescale, double keep,
                                          const std::optional<Tensor>& rescale_factor) {
  check_cuda_tensor(sample, "sample");
  check_sample_dtype(sample, "sample");
  STD_TORCH_CHECK(sample.dim() >= 2, "diffkern: sample must be [B, C, ...]");
  STD_TORCH_CHECK(variance_type >= kFixedSmall && variance_type <= kLearnedRange,
                  "diffkern: variance_type must be an int code in [0, 5], got ", variance_type);
  const int64_t batch = sample.size(0);
  const bool guided = guidance_scale.has_value();
  const bool learned = variance_type == kLearned || variance_type == kLearnedRange;
  STD_TORCH_CHECK(model_output.dim() == sample.dim() && model_output.size(0) == (guided ? 2 : 1) * batch &&
                      model_output.size(1) == (learned ? 2 : 1) * sample.size(1),
                  "diffkern: model_output must be [", guided ? "2B" : "B", ", ", learned ? "2C" : "C",
                  ", ...] for sample [B, C, ...]");
  check_model_output(model_output, sample, 2);
  if (learned) {
    STD_TORCH_CHECK(model_output.is_contiguous() && sample.is_contiguous(),
                    "diffkern: with a learned variance, model_output and sample must be contiguous (NCHW)");
  } else {
    check_alike_batch_outer(model_output, sample);
  }
  const bool use_noise = !x0_only && noise.has_value();

  DdpmScalars s{};
  s.step = check_step_args(sample, batch, noise, use_noise, alphas_cumprod, timestep, host_timestep, prev_timestep,
                           host_prev_timestep, prediction_type, clip_sample, clip_sample_range, threshold_scale,
                           guidance_scale, x0_only);
  s.variance_type = static_cast<int>(variance_type);
  const bool rescaled = guided && guidance_rescale != 0.0;
  const Tensor factor = setup_guidance_rescale(s.step, model_output, sample, batch, rescaled, guidance_rescale, keep,
                                               rescale_factor);

  auto full_step = [&](auto* prev, auto* x0, int64_t n, int64_t mo_n, cudaStream_t stream) {
    using T = std::remove_pointer_t<decltype(prev)>;
    auto run = [&](auto guided_c, auto noise_c, auto learned_c, auto rescale_c) {
      constexpr bool kGuided = decltype(guided_c)::value;
      using Op = DdpmOp<kGuided, decltype(noise_c)::value, decltype(learned_c)::value, decltype(rescale_c)::value>;
      InStreams<T, Op::kIn> in{};
      if constexpr (decltype(learned_c)::value) {
        // The variance channels follow the prediction channels; with guidance they come from the conditional
        // half.
        in.ptr[Op::var_index()] =
            static_cast<const T*>(model_output.const_data_ptr()) + (kGuided ? batch * mo_n : 0) + n;
        in.bstride[Op::var_index()] = mo_n;
      }
      launch_step("ddpm_step", Op{{}, s}, in, model_output, sample, noise, prev, x0, n, mo_n, batch, stream);
    };
    using True = std::true_type;
    using False = std::false_type;
    if (rescaled) {
      if (!use_noise) run(True{}, False{}, False{}, True{});
      else if (learned) run(True{}, True{}, True{}, True{});
      else run(True{}, True{}, False{}, True{});
    } else if (guided) {
      if (!use_noise) run(True{}, False{}, False{}, False{});
      else if (learned) run(True{}, True{}, True{}, False{});
      else run(True{}, True{}, False{}, False{});
    } else {
      if (!use_noise) run(False{}, False{}, False{}, False{});
      else if (learned) run(False{}, True{}, True{}, False{});
      else run(False{}, True{}, False{}, False{});
    }
  };
  return run_step("ddpm_step", s.step, model_output, sample, batch, guided, x0_only, full_step,
                  rescaled ? &factor : nullptr);
}

}  // namespace diffkern

STABLE_TORCH_LIBRARY_IMPL(diffkern, DIFFKERN_DISPATCH_KEY, m) {
  m.impl("ddpm_step_cuda", TORCH_BOX(&diffkern::ddpm_step_cuda));
}
