// What the DDIM and DDPM steps share: the per-sample coefficients' inputs, the guided model output and x0
// on the device, and the whole x0 pass of dynamic thresholding; on the host, the checks of the arguments
// both ops take, the input and output streams of the elementwise engine, and the output allocation.
#pragma once

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "dtype_dispatch.cuh"
#include "elementwise.cuh"
#include "guidance_rescale.cuh"
#include "platform.cuh"
#include "step_coefficients.cuh"
#include "tensor_checks.cuh"

namespace diffkern {

// The abar table, the timesteps and the settings both steps read on the device.
struct StepScalars {
  const float* table;
  int64_t table_len;
  Timesteps timestep;
  Timesteps prev_timestep;
  const float* threshold_scale;  // [B], or null
  GuidanceRescale rescale;       // its factor is null without the rescale
  float clip_range;
  float guidance_scale;
  int prediction_type;
  int clip_mode;

  __device__ __forceinline__ float abar(int64_t b) const {
    return gather_abar(table, table_len, timestep, b);
  }

  // abar at prev_timestep[b], or `before_start` where prev_timestep[b] < 0 (the step to the clean sample).
  __device__ __forceinline__ float abar_prev(int64_t b, float before_start) const {
    return timestep_of(prev_timestep, b) >= 0 ? gather_abar(table, table_len, prev_timestep, b) : before_start;
  }

  // The dynamic-thresholding scale of sample b (1 when x0 is not thresholded).
  __device__ __forceinline__ float threshold(int64_t b) const {
    return clip_mode == kThreshold ? threshold_scale[b] : 1.0f;
  }

  // The guidance rescale's factor q of sample b (read only with the rescale).
  template <bool RESCALE>
  __device__ __forceinline__ float rescale_q(int64_t b) const {
    if constexpr (RESCALE) {
      return rescale.q(b);
    } else {
      return 1.0f;
    }
  }
};

// The input streams both steps start with: model output (the unconditional half with guidance),
// [conditional half], sample, [noise]; a step appends its own after them. Outputs: prev_sample and
// pred_original_sample; or, with X0_ONLY, the unclipped x0 in float32. RESCALE (implies GUIDED): the guided
// model output is std-rescaled (GuidanceRescale) with the sample's q, which the Op's coef reads (rescale_q).
template <bool GUIDED, bool NOISE, bool X0_ONLY, bool RESCALE = false>
struct StepStreams {
  static_assert(!RESCALE || GUIDED, "the guidance rescale rescales the guided model output");
  static constexpr bool kGuided = GUIDED;
  static constexpr bool kNoise = NOISE;
  static constexpr bool kX0Only = X0_ONLY;
  static constexpr int kIn = 2 + (GUIDED ? 1 : 0) + (NOISE ? 1 : 0);  // an Op with more streams redefines it
  static constexpr int kOut = X0_ONLY ? 1 : 2;
  static constexpr int kX = GUIDED ? 2 : 1;
  __host__ __device__ static constexpr int noise_index() { return kX + 1; }

  struct Prediction {
    float x0;
    float eps;
  };

  // x0 and eps of one element from the guided (and rescaled, by `q`) model output, in diffusers' operation
  // order; x0 then clipped or thresholded (by `threshold`), except in the x0 pass, which wants it as predicted.
  template <int NI>
  static __device__ __forceinline__ Prediction predict(const StepScalars& p, const float (&in)[NI], float sqrt_a,
                                                       float sqrt_b, float threshold, float q) {
    float m = in[0];
    if constexpr (GUIDED) m = m + p.guidance_scale * (in[1] - m);
    if constexpr (RESCALE) m = p.rescale.apply(m, q);
    Prediction r;
    predict_x0_eps(p.prediction_type, in[kX], m, sqrt_a, sqrt_b, r.x0, r.eps);
    if constexpr (!X0_ONLY) r.x0 = clip_x0(p.clip_mode, r.x0, p.clip_range, threshold);
    return r;
  }
};

// The first pass of dynamic thresholding, the same for both steps: x0 as predicted, in float32.
template <bool GUIDED, bool RESCALE>
struct X0PassOp : StepStreams<GUIDED, false, true, RESCALE> {
  using Streams = StepStreams<GUIDED, false, true, RESCALE>;

  StepScalars p;

  struct Coef {
    float sqrt_a;
    float sqrt_b;
    float q;
  };

  __device__ __forceinline__ Coef coef(int64_t b) const {
    const float a = p.abar(b);
    return Coef{sqrtf(a), sqrtf(1.0f - a), p.template rescale_q<RESCALE>(b)};
  }

  __device__ __forceinline__ void apply(const Coef& c, const float (&in)[Streams::kIn], float (&out)[1]) const {
    out[0] = Streams::predict(p, in, c.sqrt_a, c.sqrt_b, 1.0f, c.q).x0;
  }
};

// Checks of the arguments both steps take, after each op's own checks of sample and model_output: the
// prediction type, the abar table, the timesteps (the tensors, when given; else the host values serve the
// whole batch), the noise (when `use_noise`) and threshold_scale (unless
// x0_only). Returns the device-side scalars; threshold_scale wins over clip_sample, as in diffusers.
inline StepScalars check_step_args(const Tensor& sample, int64_t batch, const std::optional<Tensor>& noise,
                                   bool use_noise, const Tensor& alphas_cumprod,
                                   const std::optional<Tensor>& timestep, int64_t host_timestep,
                                   const std::optional<Tensor>& prev_timestep, int64_t host_prev_timestep,
                                   int64_t prediction_type, bool clip_sample, double clip_sample_range,
                                   const std::optional<Tensor>& threshold_scale,
                                   std::optional<double> guidance_scale, bool x0_only) {
  STD_TORCH_CHECK(prediction_type >= kEpsilon && prediction_type <= kSample,
                  "diffkern: prediction_type must be 0 (epsilon), 1 (v_prediction) or 2 (sample), got ",
                  prediction_type);
  check_table(alphas_cumprod, sample);
  check_timesteps(timestep, "timestep", sample, batch);
  check_timesteps(prev_timestep, "prev_timestep", sample, batch);
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

  StepScalars s{};
  s.table = static_cast<const float*>(alphas_cumprod.const_data_ptr());
  s.table_len = alphas_cumprod.numel();
  s.timestep = timesteps_arg(timestep, host_timestep);
  s.prev_timestep = timesteps_arg(prev_timestep, host_prev_timestep);
  s.threshold_scale = clip_mode == kThreshold ? static_cast<const float*>(threshold_scale->const_data_ptr()) : nullptr;
  s.clip_range = static_cast<float>(clip_sample_range);
  s.guidance_scale = guidance_scale.has_value() ? static_cast<float>(*guidance_scale) : 0.0f;
  s.prediction_type = static_cast<int>(prediction_type);
  s.clip_mode = clip_mode;
  return s;
}

// model_output against sample: same device and dtype, and the same sizes from dimension `from_dim` on
// (each op checks the leading ones).
inline void check_model_output(const Tensor& model_output, const Tensor& sample, int64_t from_dim) {
  check_same_device(model_output, "model_output", sample, "sample");
  check_dtype(model_output, "model_output", sample.scalar_type());
  for (int64_t d = from_dim; d < sample.dim(); ++d) {
    STD_TORCH_CHECK(model_output.size(d) == sample.size(d), "diffkern: model_output must match sample's shape");
  }
}

inline void check_alike_batch_outer(const Tensor& model_output, const Tensor& sample) {
  STD_TORCH_CHECK(is_batch_outer_dense(sample) && is_batch_outer_dense(model_output) && same_strides(model_output, sample),
                  "diffkern: model_output and sample must be laid out alike, dense with the batch outermost");
}

// Sets up the guidance rescale of a step (`rescaled`: guidance with guidance_rescale != 0) in `s`: r and keep, and q
// per sample, from `rescale_factor` (float32 [B] on the device: what the op's x0 pass returned) or computed here by
// the stats pass (guidance_rescale_factor) on sample's device and current stream. Returns the factor tensor (the
// caller keeps it alive for the launches; empty without the rescale).
inline Tensor setup_guidance_rescale(StepScalars& s, const Tensor& model_output, const Tensor& sample, int64_t batch,
                                     bool rescaled, double guidance_rescale, double keep,
                                     const std::optional<Tensor>& rescale_factor) {
  s.rescale = GuidanceRescale{nullptr, 0.0f, 1.0f};
  if (!rescaled) return empty_float(sample, {0});
  s.rescale.rescale = static_cast<float>(guidance_rescale);
  s.rescale.keep = static_cast<float>(keep);
  Tensor factor;
  if (rescale_factor.has_value()) {
    check_same_device(*rescale_factor, "rescale_factor", sample, "sample");
    check_dtype(*rescale_factor, "rescale_factor", ScalarType::Float);
    STD_TORCH_CHECK(rescale_factor->dim() == 1 && rescale_factor->numel() == batch && rescale_factor->is_contiguous(),
                    "diffkern: rescale_factor must be a contiguous float32 [B] tensor");
    factor = *rescale_factor;
  } else if (sample.numel() == 0) {
    factor = empty_float(sample, {batch});
  } else {
    const DeviceGuard guard(sample.get_device_index());
    factor = guidance_rescale_factor(model_output, sample, batch, sample.numel() / batch,
                                     model_output.numel() / model_output.size(0), s.guidance_scale,
                                     current_stream(sample.get_device_index()));
  }
  s.rescale.factor = static_cast<const float*>(factor.const_data_ptr());
  return factor;
}

// Launches the engine for a step whose Op derives from StepStreams: `in` holds the Op's own streams, if
// any; the shared ones are filled here (model output samples of `mo_n` elements, the others of n), and
// the outputs (n elements per sample).
template <typename Op, typename T, typename TO>
inline void launch_step(const char* name, const Op& op, InStreams<T, Op::kIn> in, const Tensor& model_output,
                        const Tensor& sample, const std::optional<Tensor>& noise, TO* out0, TO* out1, int64_t n,
                        int64_t mo_n, int64_t batch, cudaStream_t stream) {
  const T* mo = static_cast<const T*>(model_output.const_data_ptr());
  in.ptr[0] = mo;
  in.bstride[0] = mo_n;
  if constexpr (Op::kGuided) {
    in.ptr[1] = mo + batch * mo_n;  // the conditional half: samples B..2B-1
    in.bstride[1] = mo_n;
  }
  in.ptr[Op::kX] = static_cast<const T*>(sample.const_data_ptr());
  in.bstride[Op::kX] = n;
  if constexpr (Op::kNoise) {
    in.ptr[Op::noise_index()] = static_cast<const T*>(noise->const_data_ptr());
    in.bstride[Op::noise_index()] = n;
  }
  OutStreams<TO, Op::kOut> out{};
  out.ptr[0] = out0;
  out.bstride[0] = n;
  if constexpr (!Op::kX0Only) {
    out.ptr[1] = out1;
    out.bstride[1] = n;
  }
  launch_sample_map(name, in, out, n, batch, op, stream);
}

// Allocates a step's two outputs and runs it on sample's device and current stream. The x0 pass (x0_only:
// returns x0 as float32 [B, n] and an empty tensor, or with the guidance rescale (`factor`: the tensor
// setup_guidance_rescale returned, else null) the factor, for the full step to take) is shared; the full step is
// full_step(prev_sample, pred_original_sample, n, mo_n, stream), the outputs as pointers to the sample's
// element type and mo_n the elements per sample of model_output (2n with a learned variance, else n).
template <typename FullStep>
inline std::tuple<Tensor, Tensor> run_step(const char* op, const StepScalars& s, const Tensor& model_output,
                                           const Tensor& sample, int64_t batch, bool guided, bool x0_only,
                                           FullStep&& full_step, const Tensor* factor = nullptr) {
  const int64_t n = batch == 0 ? 0 : sample.numel() / batch;
  Tensor out0 = x0_only ? empty_float(sample, {batch, n}) : empty_strided_like(sample, sample.scalar_type());
  Tensor out1 = !x0_only ? empty_strided_like(sample, sample.scalar_type())
                         : factor != nullptr ? *factor : empty_float(sample, {0});
  if (sample.numel() == 0) return std::make_tuple(out0, out1);
  const int64_t mo_n = model_output.numel() / model_output.size(0);  // per sample, whatever its batch

  const DeviceGuard guard(sample.get_device_index());
  const cudaStream_t stream = current_stream(sample.get_device_index());
  dispatch_float_types(sample.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    if (x0_only) {
      const std::string name = std::string(op) + " (x0 pass)";
      auto x0_pass = [&](auto guided_c, auto rescale_c) {
        using Op = X0PassOp<decltype(guided_c)::value, decltype(rescale_c)::value>;
        launch_step(name.c_str(), Op{{}, s}, InStreams<T, Op::kIn>{}, model_output, sample, std::nullopt,
                    static_cast<float*>(out0.mutable_data_ptr()), static_cast<float*>(nullptr), n, mo_n, batch, stream);
      };
      if (factor != nullptr) {
        x0_pass(std::true_type{}, std::true_type{});
      } else if (guided) {
        x0_pass(std::true_type{}, std::false_type{});
      } else {
        x0_pass(std::false_type{}, std::false_type{});
      }
      return;
    }
    full_step(static_cast<T*>(out0.mutable_data_ptr()), static_cast<T*>(out1.mutable_data_ptr()), n, mo_n, stream);
  });
  return std::make_tuple(out0, out1);
}

}  // namespace diffkern
