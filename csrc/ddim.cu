// The DDIM step (diffusers' DDIMScheduler.step math; see diffkern/ops/ddim.py), with classifier-free
// guidance fused in.
//
// One kernel per step reads model_output (both halves with guidance), the sample and, for eta > 0, the
// noise once, and writes prev_sample and pred_original_sample once. Per-sample coefficients come from the
// abar table at the sample's timestep (clamped; prev_timestep < 0 selects final_alpha_cumprod), in fp32.
//
// Dynamic thresholding needs a per-sample quantile of |x0| before x0 can be used. The op then runs twice:
// `x0_only=True` writes the unclipped x0 as float32 [B, n] (pass 1: reads model_output + sample, writes x0),
// the caller reduces it to the per-sample scale s (torch's kthvalue), and the full step takes s as
// `threshold_scale` (pass 2). Without thresholding it is a single pass.
//
// Guidance rescale (guidance_rescale != 0 with guidance; see guidance_rescale.cuh) needs q = std(cond) /
// std(guided) per sample first: the stats pass computes it (one more read of the model output, two small launches)
// and the step reads it. With dynamic thresholding the x0 pass computes q, uses it and returns it as its second
// output, and the full step takes it as `rescale_factor`: q is computed once per step.
#include "step.cuh"

namespace diffkern {
namespace {

struct DdimScalars {
  StepScalars step;
  float final_alpha_cumprod;
  float eta;
  bool use_clipped_model_output;
};

// The full step (the x0 pass is X0PassOp); its streams are exactly StepStreams'.
template <bool GUIDED, bool NOISE, bool RESCALE>
struct DdimOp : StepStreams<GUIDED, NOISE, false, RESCALE> {
  using Streams = StepStreams<GUIDED, NOISE, false, RESCALE>;

  DdimScalars p;

  struct Coef {
    float sqrt_a;
    float sqrt_b;
    float sqrt_a_prev;
    float dir;  // sqrt(1 - a_prev - std^2)
    float std_dev;
    float threshold;
    float q;
  };

  __device__ __forceinline__ Coef coef(int64_t b) const {
    const float a = p.step.abar(b);
    const float a_prev = p.step.abar_prev(b, p.final_alpha_cumprod);
    const float beta = 1.0f - a;
    const float variance = ((1.0f - a_prev) / beta) * (1.0f - a / a_prev);
    const float std_dev = p.eta * sqrtf(variance);
    Coef c;
    c.sqrt_a = sqrtf(a);
    c.sqrt_b = sqrtf(beta);
    c.sqrt_a_prev = sqrtf(a_prev);
    c.dir = sqrtf(1.0f - a_prev - std_dev * std_dev);
    c.std_dev = std_dev;
    c.threshold = p.step.threshold(b);
    c.q = p.step.template rescale_q<RESCALE>(b);
    return c;
  }

  __device__ __forceinline__ void apply(const Coef& c, const float (&in)[Streams::kIn], float (&out)[2]) const {
    auto r = Streams::predict(p.step, in, c.sqrt_a, c.sqrt_b, c.threshold, c.q);
    if (p.use_clipped_model_output) r.eps = (in[Streams::kX] - c.sqrt_a * r.x0) / c.sqrt_b;
    float prev = c.sqrt_a_prev * r.x0 + c.dir * r.eps;
    if constexpr (NOISE) prev = prev + c.std_dev * in[Streams::noise_index()];
    out[0] = prev;
    out[1] = r.x0;
  }
};

}  // namespace

std::tuple<Tensor, Tensor> ddim_step_cuda(const Tensor& model_output, const Tensor& sample,
                                          const std::optional<Tensor>& noise, const Tensor& alphas_cumprod,
                                          const std::optional<Tensor>& timestep, int64_t host_timestep,
                                          const std::optional<Tensor>& prev_timestep, int64_t host_prev_timestep,
                                          double final_alpha_cumprod, double eta, int64_t prediction_type,
                                          bool clip_sample, double clip_sample_range,
                                          const std::optional<Tensor>& threshold_scale, bool use_clipped_model_output,
                                          std::optional<double> guidance_scale, bool x0_only,
                                          double guidance_rescale, double keep,
                                          const std::optional<Tensor>& rescale_factor) {
  check_cuda_tensor(sample, "sample");
  check_sample_dtype(sample, "sample");
  STD_TORCH_CHECK(sample.dim() >= 1, "diffkern: sample must have a batch dimension");
  const int64_t batch = sample.size(0);
  const bool guided = guidance_scale.has_value();
  STD_TORCH_CHECK(model_output.dim() == sample.dim() && model_output.size(0) == (guided ? 2 : 1) * batch,
                  "diffkern: model_output must have ", guided ? "2B" : "B", " samples of sample's shape");
  check_model_output(model_output, sample, 1);
  check_alike_batch_outer(model_output, sample);
  const bool use_noise = !x0_only && eta > 0.0;
  STD_TORCH_CHECK(!use_noise || noise.has_value(), "diffkern: ddim_step with eta > 0 needs noise");

  DdimScalars s{};
  s.step = check_step_args(sample, batch, noise, use_noise, alphas_cumprod, timestep, host_timestep, prev_timestep,
                           host_prev_timestep, prediction_type, clip_sample, clip_sample_range, threshold_scale,
                           guidance_scale, x0_only);
  s.final_alpha_cumprod = static_cast<float>(final_alpha_cumprod);
  s.eta = static_cast<float>(eta);
  s.use_clipped_model_output = use_clipped_model_output;
  const bool rescaled = guided && guidance_rescale != 0.0;
  const Tensor factor = setup_guidance_rescale(s.step, model_output, sample, batch, rescaled, guidance_rescale, keep,
                                               rescale_factor);

  auto full_step = [&](auto* prev, auto* x0, int64_t n, int64_t mo_n, cudaStream_t stream) {
    using T = std::remove_pointer_t<decltype(prev)>;
    auto run = [&](auto guided_c, auto noise_c, auto rescale_c) {
      using Op = DdimOp<decltype(guided_c)::value, decltype(noise_c)::value, decltype(rescale_c)::value>;
      launch_step("ddim_step", Op{{}, s}, InStreams<T, Op::kIn>{}, model_output, sample, noise, prev, x0, n, mo_n,
                  batch, stream);
    };
    using True = std::true_type;
    using False = std::false_type;
    if (rescaled) {
      use_noise ? run(True{}, True{}, True{}) : run(True{}, False{}, True{});
    } else if (guided) {
      use_noise ? run(True{}, True{}, False{}) : run(True{}, False{}, False{});
    } else {
      use_noise ? run(False{}, True{}, False{}) : run(False{}, False{}, False{});
    }
  };
  return run_step("ddim_step", s.step, model_output, sample, batch, guided, x0_only, full_step,
                  rescaled ? &factor : nullptr);
}

}  // namespace diffkern

STABLE_TORCH_LIBRARY_IMPL(diffkern, DIFFKERN_DISPATCH_KEY, m) {
  m.impl("ddim_step_cuda", TORCH_BOX(&diffkern::ddim_step_cuda));
}
