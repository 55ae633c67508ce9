// Per-sample timestep coefficients (device), shared by add_noise and the DDIM and DDPM steps: abar
// gathered at a sample's timestep, the prediction types' x0 and eps, and the clipping of x0.
#pragma once

#include <cstdint>

#include "platform.cuh"

namespace diffkern {

// clamp that propagates NaN like torch.clamp (fminf/fmaxf would drop it).
__device__ __forceinline__ float clamp_nan(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// abar at timesteps[b] (a [1] tensor is shared by the batch), the index clamped into the table.
__device__ __forceinline__ float gather_abar(const float* table, int64_t table_len, const int64_t* ts,
                                             int64_t ts_numel, int64_t b) {
  int64_t t = ts[ts_numel == 1 ? 0 : b];
  t = t < 0 ? 0 : (t >= table_len ? table_len - 1 : t);
  return table[t];
}

__device__ __forceinline__ int64_t timestep_of(const int64_t* ts, int64_t ts_numel, int64_t b) {
  return ts[ts_numel == 1 ? 0 : b];
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
