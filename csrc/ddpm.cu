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
// the DDIM step (`x0_only`, then the step with `threshold_scale`).
#include "common.cuh"

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
  const float* table;
  int64_t table_len;
  const int64_t* timestep;
  int64_t timestep_numel;
  const int64_t* prev_timestep;
  int64_t prev_timestep_numel;
  const float* threshold_scale;  // [B], or null
  float clip_range;
  float guidance_scale;
  int prediction_type;
  int clip_mode;
  int variance_type;
};

// Input streams: model output prediction (unconditional half with guidance), [conditional half], sample,
// [noise], [predicted variance (conditional half with guidance)]. LEARNED implies NOISE: the predicted
// variance only scales the noise.
template <bool GUIDED, bool NOISE, bool LEARNED, bool X0_ONLY>
struct DdpmOp {
  static_assert(!LEARNED || NOISE, "the predicted variance is read only when noise is added");
  static constexpr int kIn = 2 + (GUIDED ? 1 : 0) + (NOISE ? 1 : 0) + (LEARNED ? 1 : 0);
  static constexpr int kOut = X0_ONLY ? 1 : 2;
  static constexpr int kX = GUIDED ? 2 : 1;
  __host__ __device__ static constexpr int noise_index() { return kX + 1; }
  __host__ __device__ static constexpr int var_index() { return kX + 2; }

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
    bool noisy;  // t > 0
  };

  __device__ __forceinline__ Coef coef(int64_t b) const {
    const float a = gather_abar(p.table, p.table_len, p.timestep, p.timestep_numel, b);
    const int64_t tp = timestep_of(p.prev_timestep, p.prev_timestep_numel, b);
    const float a_prev =
        tp >= 0 ? gather_abar(p.table, p.table_len, p.prev_timestep, p.prev_timestep_numel, b) : 1.0f;
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
    c.noisy = timestep_of(p.timestep, p.timestep_numel, b) > 0;
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
    c.threshold = p.clip_mode == kThreshold ? p.threshold_scale[b] : 1.0f;
    return c;
  }

  __device__ __forceinline__ void apply(const Coef& c, const float (&in)[kIn], float (&out)[kOut]) const {
    float m = in[0];
    if constexpr (GUIDED) m = m + p.guidance_scale * (in[1] - m);
    const float x = in[kX];
    float x0;
    float eps;
    predict_x0_eps(p.prediction_type, x, m, c.sqrt_a, c.sqrt_b, x0, eps);
    (void)eps;
    if constexpr (X0_ONLY) {
      out[0] = x0;
    } else {
      x0 = clip_x0(p.clip_mode, x0, p.clip_range, c.threshold);
      float prev = c.x0_coef * x0 + c.x_coef * x;
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
        prev = prev + std_dev * in[noise_index()];
      }
      out[0] = prev;
      out[1] = x0;
    }
  }
};

template <typename T, bool GUIDED, bool NOISE, bool LEARNED, bool X0_ONLY, typename TO>
void run_ddpm(const DdpmScalars& s, const Tensor& model_output, const Tensor& sample,
              const std::optional<Tensor>& noise, TO* out0, TO* out1, int64_t out_bstride, int64_t n,
              int64_t out_n, int64_t batch, cudaStream_t stream) {
  // out_n: elements per sample of model_output (2n with a learned variance, else n).
  using Op = DdpmOp<GUIDED, NOISE, LEARNED, X0_ONLY>;
  const T* mo = static_cast<const T*>(model_output.const_data_ptr());
  InStreams<T, Op::kIn> in{};
  in.ptr[0] = mo;
  in.bstride[0] = out_n;
  if constexpr (GUIDED) {
    in.ptr[1] = mo + batch * out_n;
    in.bstride[1] = out_n;
  }
  in.ptr[Op::kX] = static_cast<const T*>(sample.const_data_ptr());
  in.bstride[Op::kX] = n;
  if constexpr (NOISE) {
    in.ptr[Op::noise_index()] = static_cast<const T*>(noise->const_data_ptr());
    in.bstride[Op::noise_index()] = n;
  }
  if constexpr (LEARNED) {
    // The variance channels follow the prediction channels; with guidance they come from the conditional half.
    in.ptr[Op::var_index()] = mo + (GUIDED ? batch * out_n : 0) + n;
    in.bstride[Op::var_index()] = out_n;
  }
  OutStreams<TO, Op::kOut> o{};
  o.ptr[0] = out0;
  o.bstride[0] = out_bstride;
  if constexpr (!X0_ONLY) {
    o.ptr[1] = out1;
    o.bstride[1] = out_bstride;
  }
  launch_sample_map(X0_ONLY ? "ddpm_step (x0 pass)" : "ddpm_step", in, o, n, batch, Op{s}, stream);
}

}  // namespace

std::tuple<Tensor, Tensor> ddpm_step_cuda(const Tensor& model_output, const Tensor& sample,
                                          const std::optional<Tensor>& noise, const Tensor& alphas_cumprod,
                                          const Tensor& timestep, const Tensor& prev_timestep, int64_t variance_type,
                                          int64_t prediction_type, bool clip_sample, double clip_sample_range,
                                          const std::optional<Tensor>& threshold_scale,
                                          std::optional<double> guidance_scale, bool x0_only) {
  check_cuda_tensor(sample, "sample");
  check_sample_dtype(sample, "sample");
  STD_TORCH_CHECK(sample.dim() >= 2, "diffkern: sample must be [B, C, ...]");
  STD_TORCH_CHECK(variance_type >= kFixedSmall && variance_type <= kLearnedRange,
                  "diffkern: variance_type must be an int code in [0, 5], got ", variance_type);
  STD_TORCH_CHECK(prediction_type >= kEpsilon && prediction_type <= kSample,
                  "diffkern: prediction_type must be 0 (epsilon), 1 (v_prediction) or 2 (sample), got ",
                  prediction_type);
  const int64_t batch = sample.size(0);
  const bool guided = guidance_scale.has_value();
  const bool learned = variance_type == kLearned || variance_type == kLearnedRange;
  check_same_device(model_output, "model_output", sample, "sample");
  check_dtype(model_output, "model_output", sample.scalar_type());
  STD_TORCH_CHECK(model_output.dim() == sample.dim() && model_output.size(0) == (guided ? 2 : 1) * batch &&
                      model_output.size(1) == (learned ? 2 : 1) * sample.size(1),
                  "diffkern: model_output must be [", guided ? "2B" : "B", ", ", learned ? "2C" : "C",
                  ", ...] for sample [B, C, ...]");
  for (int64_t d = 2; d < sample.dim(); ++d) {
    STD_TORCH_CHECK(model_output.size(d) == sample.size(d), "diffkern: model_output must match sample's shape");
  }
  if (learned) {
    STD_TORCH_CHECK(model_output.is_contiguous() && sample.is_contiguous(),
                    "diffkern: with a learned variance, model_output and sample must be contiguous (NCHW)");
  } else {
    STD_TORCH_CHECK(is_batch_outer_dense(sample) && is_batch_outer_dense(model_output) &&
                        same_strides(model_output, sample),
                    "diffkern: model_output and sample must be laid out alike, dense with the batch outermost");
  }
  check_table(alphas_cumprod, sample);
  check_timesteps(timestep, "timestep", sample, batch);
  check_timesteps(prev_timestep, "prev_timestep", sample, batch);

  const bool use_noise = !x0_only && noise.has_value();
  if (use_noise) {
    check_same_device(*noise, "noise", sample, "sample");
    check_dtype(*noise, "noise", sample.scalar_type());
    STD_TORCH_CHECK(same_sizes(*noise, sample) && same_strides(*noise, sample),
                    "diffkern: noise must have sample's shape and layout");
  }
  int clip_mode = clip_sample ? kClip : kNoClip;
  if (!x0_only && threshold_scale.has_value()) {
    check_same_device(*threshold_scale, "threshold_scale", sample, "sample");
    check_dtype(*threshold_scale, "threshold_scale", ScalarType::Float);
    STD_TORCH_CHECK(threshold_scale->dim() == 1 && threshold_scale->numel() == batch && threshold_scale->is_contiguous(),
                    "diffkern: threshold_scale must be a contiguous float32 [B] tensor");
    clip_mode = kThreshold;
  }

  const int64_t n = batch == 0 ? 0 : sample.numel() / batch;
  const int64_t out_n = learned ? 2 * n : n;
  Tensor out0 = x0_only ? empty_float(sample, {batch, n}) : empty_strided_like(sample, sample.scalar_type());
  Tensor out1 = x0_only ? empty_float(sample, {0}) : empty_strided_like(sample, sample.scalar_type());
  if (sample.numel() == 0) return std::make_tuple(out0, out1);

  DdpmScalars s{};
  s.table = static_cast<const float*>(alphas_cumprod.const_data_ptr());
  s.table_len = alphas_cumprod.numel();
  s.timestep = static_cast<const int64_t*>(timestep.const_data_ptr());
  s.timestep_numel = timestep.numel();
  s.prev_timestep = static_cast<const int64_t*>(prev_timestep.const_data_ptr());
  s.prev_timestep_numel = prev_timestep.numel();
  s.threshold_scale = clip_mode == kThreshold ? static_cast<const float*>(threshold_scale->const_data_ptr()) : nullptr;
  s.clip_range = static_cast<float>(clip_sample_range);
  s.guidance_scale = guided ? static_cast<float>(*guidance_scale) : 0.0f;
  s.prediction_type = static_cast<int>(prediction_type);
  s.clip_mode = clip_mode;
  s.variance_type = static_cast<int>(variance_type);

  const DeviceGuard guard(sample.get_device_index());
  const cudaStream_t stream = current_stream(sample.get_device_index());
  dispatch_float_types(sample.scalar_type(), "ddpm_step", [&](auto tag) {
    using T = decltype(tag);
    if (x0_only) {
      float* x0 = static_cast<float*>(out0.mutable_data_ptr());
      if (guided) {
        run_ddpm<T, true, false, false, true, float>(s, model_output, sample, noise, x0, nullptr, n, n, out_n, batch,
                                                     stream);
      } else {
        run_ddpm<T, false, false, false, true, float>(s, model_output, sample, noise, x0, nullptr, n, n, out_n,
                                                      batch, stream);
      }
      return;
    }
    T* prev = static_cast<T*>(out0.mutable_data_ptr());
    T* x0 = static_cast<T*>(out1.mutable_data_ptr());
    auto run = [&](auto guided_c, auto noise_c, auto learned_c) {
      run_ddpm<T, decltype(guided_c)::value, decltype(noise_c)::value, decltype(learned_c)::value, false, T>(
          s, model_output, sample, noise, prev, x0, n, n, out_n, batch, stream);
    };
    using True = std::true_type;
    using False = std::false_type;
    if (guided) {
      if (!use_noise) run(True{}, False{}, False{});
      else if (learned) run(True{}, True{}, True{});
      else run(True{}, True{}, False{});
    } else {
      if (!use_noise) run(False{}, False{}, False{});
      else if (learned) run(False{}, True{}, True{});
      else run(False{}, True{}, False{});
    }
  });
  return std::make_tuple(out0, out1);
}

}  // namespace diffkern
