// Per-sample timestep coefficients (device), shared by add_noise and the DDIM and DDPM steps: a sample's
// timestep (device tensor or host value) and abar gathered there, the prediction types' x0 and eps, and the
// clipping of x0.
#pragma once

#include <cstdint>
#include <optional>

#include "platform.cuh"

namespace diffkern {

// clamp that propagates NaN like torch.clamp (fminf/fmaxf would drop it).
__device__ __forceinline__ float clamp_nan(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// A timestep argument of the ops (`Tensor? timestep, int host_timestep`): an int64 [1] (shared by the
// batch) or [B] device tensor, read in place whatever its stride, or, when the tensor is None (ptr null),
// one host value for every sample (a previous timestep may be negative: "before the first step").
struct Timesteps {
  const int64_t* ptr;  // null: `host` for every sample
  int64_t stride;      // elements between samples' entries: 0 for a [1] tensor
  int64_t host;
};

// The raw timestep of sample b.
__device__ __forceinline__ int64_t timestep_of(const Timesteps& ts, int64_t b) {
  return ts.ptr == nullptr ? ts.host : ts.ptr[b * ts.stride];
}

// The kernels' view of a (checked) `Tensor? timestep, int host_timestep` pair; host only.
inline Timesteps timesteps_arg(const std::optional<Tensor>& ts, int64_t host) {
  if (!ts.has_value()) return Timesteps{nullptr, 0, host};
  return Timesteps{static_cast<const int64_t*>(ts->const_data_ptr()), ts->numel() == 1 ? 0 : ts->stride(0), 0};
}

// abar at sample b's timestep, the index clamped into the table.
__device__ __forceinline__ float gather_abar(const float* table, int64_t table_len, const Timesteps& ts, int64_t b) {
  int64_t t = timestep_of(ts, b);
  t = t < 0 ? 0 : (t >= table_len ? table_len - 1 : t);
  return table[t];
}

// Prediction types, as the int codes of the ops' schemas.
enum PredictionType : int { kEpsilon = 0, kVPrediction = 1, kSample = 2 };

// What happens to x0 before it is used: nothing, clip to +-range, or dynamic thresholding with a
// precomputed per-sample scale s (clamp to +-s, then divide by s).
enum ClipMode : int { kNoClip = 0, kClip = 1, kThreshold = 2 };

// x0 and eps from the model output m and the sample x, in diffusers' operation order
// (sqrt_a = sqrt(abar_t), sqrt_b = sqrt(1 - abar_t)).
__device__ __forceinline__ void predict_x0_eps(int prediction_type, float x, float m, float sqrt_a, float sqrt_b,
                                               float& x0, float& eps) {
  if (prediction_type == kEpsilon) {
    x0 = (x - sqrt_b * m) / sqrt_a;
    eps = m;
  } else if (prediction_type == kSample) {
    x0 = m;
    eps = (x - sqrt_a * x0) / sqrt_b;
  } else {  // v-prediction
    x0 = sqrt_a * x - sqrt_b * m;
    eps = sqrt_a * m + sqrt_b * x;
  }
}

__device__ __forceinline__ float clip_x0(int clip_mode, float x0, float clip_range, float threshold) {
  if (clip_mode == kClip) return clamp_nan(x0, -clip_range, clip_range);
  if (clip_mode == kThreshold) return clamp_nan(x0, -threshold, threshold) / threshold;
  return x0;
}

}  // namespace diffkern
