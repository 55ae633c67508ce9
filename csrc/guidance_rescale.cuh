// The guidance rescale (diffusers' rescale_noise_cfg, Lin et al. "Common Diffusion Noise Schedules and Sample
// Steps are Flawed", section 3.4), shared by every step with guidance (DDIM, DDPM, flow matching; see
// diffkern/ops/_common.py rescale_guided):
//
//   guided <- r * (guided * q) + keep * guided,   q = std(cond) / std(guided) per sample (unbiased, over every
//                                                  element of the sample), keep = 1 - r rounded once on the host
//
// q must be known before any element of the step is written: guidance_rescale_factor (guidance_rescale.cu) is one
// pass over both halves of the model output (per chunk of a sample, the moments count/mean/M2 of cond and of the
// guided output, merged per thread and per block in a fixed order, Chan et al.) and a tiny merge kernel (one block
// per sample, fixed order) writing q; the step kernels then read q per sample through GuidanceRescale.
// Deterministic: no atomics, and the merge order does not depend on where a sample sits in memory.
#pragma once

#include <cstdint>

#include "platform.cuh"

namespace diffkern {

// What a step kernel reads of the rescale: q per sample ([B], or null without the rescale), r and keep.
struct GuidanceRescale {
  const float* factor;
  float rescale;
  float keep;

  __device__ __forceinline__ float q(int64_t b) const { return factor[b]; }

  // The rescaled guided value, in the reference's operation order.
  __device__ __forceinline__ float apply(float guided, float q) const { return rescale * (guided * q) + keep * guided; }
};

// q per sample (a new float32 [B] tensor on sample's device) of a guided model output [2B, ...] whose samples hold
// mo_n elements each (n, or 2n with DDPM's learned variance), over the first n elements of each sample; launched
// on `stream`. batch * n must be positive.
Tensor guidance_rescale_factor(const Tensor& model_output, const Tensor& sample, int64_t batch, int64_t n,
                               int64_t mo_n, float guidance_scale, cudaStream_t stream);

}  // namespace diffkern
