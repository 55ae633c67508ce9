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
#include "common.cuh"

namespace diffkern {
namespace {

struct DdimScalars {
  const float* table;
  int64_t table_len;
  const int64_t* timestep;
  int64_t timestep_numel;
  const int64_t* prev_timestep;
  int64_t prev_timestep_numel;
  const float* threshold_scale;  // [B], or null
  float final_alpha_cumprod;
  float eta;
  float clip_range;
  float guidance_scale;
  int prediction_type;
  int clip_mode;
  bool use_clipped_model_output;
};

// Input streams: model output (the unconditional half with guidance), [conditional half], sample, [noise].
// Outputs: prev_sample and pred_original_sample; or, with X0_ONLY, the unclipped x0 in float32.
template <bool GUIDED, bool NOISE, bool X0_ONLY>
struct DdimOp {
  static constexpr int kIn = 2 + (GUIDED ? 1 : 0) + (NOISE ? 1 : 0);
  static constexpr int kOut = X0_ONLY ? 1 : 2;
  static constexpr int kX = GUIDED ? 2 : 1;
  __host__ __device__ static constexpr int noise_index() { return kX + 1; }

  DdimScalars p;

  struct Coef {
    float sqrt_a;
    float sqrt_b;
    float sqrt_a_prev;
    float dir;  // sqrt(1 - a_prev - std^2)
    float std_dev;
    float threshold;
  };

  __device__ __forceinline__ Coef coef(int64_t b) const {
    const float a = gather_abar(p.table, p.table_len, p.timestep, p.timestep_numel, b);
    const int64_t tp = timestep_of(p.prev_timestep, p.prev_timestep_numel, b);
    const float a_prev = tp >= 0 ? gather_abar(p.table, p.table_len, p.prev_timestep, p.prev_timestep_numel, b)
                                 : p.final_alpha_cumprod;
    const float beta = 1.0f - a;
    const float variance = ((1.0f - a_prev) / beta) * (1.0f - a / a_prev);
    const float std_dev = p.eta * sqrtf(variance);
    Coef c;
    c.sqrt_a = sqrtf(a);
    c.sqrt_b = sqrtf(beta);
    c.sqrt_a_prev = sqrtf(a_prev);
    c.dir = sqrtf(1.0f - a_prev - std_dev * std_dev);
    c.std_dev = std_dev;
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
    if constexpr (X0_ONLY) {
      out[0] = x0;
    } else {
      x0 = clip_x0(p.clip_mode, x0, p.clip_range, c.threshold);
      if (p.use_clipped_model_output) eps = (x - c.sqrt_a * x0) / c.sqrt_b;
      float prev = c.sqrt_a_prev * x0 + c.dir * eps;
      if constexpr (NOISE) prev = prev + c.std_dev * in[noise_index()];
      out[0] = prev;
      out[1] = x0;
    }
  }
};

template <typename T, bool GUIDED, bool NOISE, bool X0_ONLY, typename TO>
void run_ddim(const DdimScalars& s, const Tensor& model_output, const Tensor& sample,
              const std::optional<Tensor>& noise, TO* out0, TO* out1, int64_t out_bstride, int64_t n, int64_t batch,
              cudaStream_t stream) {
  using Op = DdimOp<GUIDED, NOISE, X0_ONLY>;
  const T* mo = static_cast<const T*>(model_output.const_data_ptr());
  InStreams<T, Op::kIn> in{};
  in.ptr[0] = mo;
  in.bstride[0] = n;
  if constexpr (GUIDED) {
    in.ptr[1] = mo + batch * n;  // the conditional half: samples B..2B-1
    in.bstride[1] = n;
  }
  in.ptr[Op::kX] = static_cast<const T*>(sample.const_data_ptr());
  in.bstride[Op::kX] = n;
  if constexpr (NOISE) {
    in.ptr[Op::noise_index()] = static_cast<const T*>(noise->const_data_ptr());
    in.bstride[Op::noise_index()] = n;
  }
  OutStreams<TO, Op::kOut> o{};
  o.ptr[0] = out0;
  o.bstride[0] = out_bstride;
  if constexpr (!X0_ONLY) {
    o.ptr[1] = out1;
    o.bstride[1] = out_bstride;
  }
  launch_sample_map(X0_ONLY ? "ddim_step (x0 pass)" : "ddim_step", in, o, n, batch, Op{s}, stream);
}

}  // namespace

std::tuple<Tensor, Tensor> ddim_step_cuda(const Tensor& model_output, const Tensor& sample,
                                          const std::optional<Tensor>& noise, const Tensor& alphas_cumprod,
                                          const Tensor& timestep, const Tensor& prev_timestep,
                                          double final_alpha_cumprod, double eta, int64_t prediction_type,
                                          bool clip_sample, double clip_sample_range,
                                          const std::optional<Tensor>& threshold_scale, bool use_clipped_model_output,
                                          std::optional<double> guidance_scale, bool x0_only) {
  check_cuda_tensor(sample, "sample");
  check_sample_dtype(sample, "sample");
  STD_TORCH_CHECK(sample.dim() >= 1, "diffkern: sample must have a batch dimension");
  const int64_t batch = sample.size(0);
  const bool guided = guidance_scale.has_value();
  check_same_device(model_output, "model_output", sample, "sample");
  check_dtype(model_output, "model_output", sample.scalar_type());
  STD_TORCH_CHECK(model_output.dim() == sample.dim() && model_output.size(0) == (guided ? 2 : 1) * batch,
                  "diffkern: model_output must have ", guided ? "2B" : "B", " samples of sample's shape");
  for (int64_t d = 1; d < sample.dim(); ++d) {
    STD_TORCH_CHECK(model_output.size(d) == sample.size(d), "diffkern: model_output must match sample's shape");
  }
  STD_TORCH_CHECK(is_batch_outer_dense(sample) && is_batch_outer_dense(model_output) &&
                      same_strides(model_output, sample),
                  "diffkern: model_output and sample must be laid out alike, dense with the batch outermost");
  STD_TORCH_CHECK(prediction_type >= kEpsilon && prediction_type <= kSample,
                  "diffkern: prediction_type must be 0 (epsilon), 1 (v_prediction) or 2 (sample), got ",
                  prediction_type);
  check_table(alphas_cumprod, sample);
  check_timesteps(timestep, "timestep", sample, batch);
  check_timesteps(prev_timestep, "prev_timestep", sample, batch);

  const bool use_noise = !x0_only && eta > 0.0;
  if (use_noise) {
    STD_TORCH_CHECK(noise.has_value(), "diffkern: ddim_step with eta > 0 needs noise");
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
    clip_mode = kThreshold;  // dynamic thresholding wins over clipping, as in diffusers
  }

  const int64_t n = batch == 0 ? 0 : sample.numel() / batch;
  Tensor out0 = x0_only ? empty_float(sample, {batch, n}) : empty_strided_like(sample, sample.scalar_type());
  Tensor out1 = x0_only ? empty_float(sample, {0}) : empty_strided_like(sample, sample.scalar_type());
  if (sample.numel() == 0) return std::make_tuple(out0, out1);

  DdimScalars s{};
  s.table = static_cast<const float*>(alphas_cumprod.const_data_ptr());
  s.table_len = alphas_cumprod.numel();
  s.timestep = static_cast<const int64_t*>(timestep.const_data_ptr());
  s.timestep_numel = timestep.numel();
  s.prev_timestep = static_cast<const int64_t*>(prev_timestep.const_data_ptr());
  s.prev_timestep_numel = prev_timestep.numel();
  s.threshold_scale = clip_mode == kThreshold ? static_cast<const float*>(threshold_scale->const_data_ptr()) : nullptr;
  s.final_alpha_cumprod = static_cast<float>(final_alpha_cumprod);
  s.eta = static_cast<float>(eta);
  s.clip_range = static_cast<float>(clip_sample_range);
  s.guidance_scale = guided ? static_cast<float>(*guidance_scale) : 0.0f;
  s.prediction_type = static_cast<int>(prediction_type);
  s.clip_mode = clip_mode;
  s.use_clipped_model_output = use_clipped_model_output;

  const DeviceGuard guard(sample.get_device_index());
  const cudaStream_t stream = current_stream(sample.get_device_index());
  dispatch_float_types(sample.scalar_type(), "ddim_step", [&](auto tag) {
    using T = decltype(tag);
    if (x0_only) {
      float* x0 = static_cast<float*>(out0.mutable_data_ptr());
      if (guided) {
        run_ddim<T, true, false, true, float>(s, model_output, sample, noise, x0, nullptr, n, n, batch, stream);
      } else {
        run_ddim<T, false, false, true, float>(s, model_output, sample, noise, x0, nullptr, n, n, batch, stream);
      }
      return;
    }
    T* prev = static_cast<T*>(out0.mutable_data_ptr());
    T* x0 = static_cast<T*>(out1.mutable_data_ptr());
    if (guided && use_noise) {
      run_ddim<T, true, true, false, T>(s, model_output, sample, noise, prev, x0, n, n, batch, stream);
    } else if (guided) {
      run_ddim<T, true, false, false, T>(s, model_output, sample, noise, prev, x0, n, n, batch, stream);
    } else if (use_noise) {
      run_ddim<T, false, true, false, T>(s, model_output, sample, noise, prev, x0, n, n, batch, stream);
    } else {
      run_ddim<T, false, false, false, T>(s, model_output, sample, noise, prev, x0, n, n, batch, stream);
    }
  });
  return std::make_tuple(out0, out1);
}

}  // namespace diffkern
