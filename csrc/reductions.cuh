// Warp reductions (device): sums over a team of lanes or a warp, and the deterministic merge of moments
// (count, mean, sum of squared deviations).
#pragma once

#include "platform.cuh"

namespace diffkern {

constexpr unsigned kFullMask = 0xffffffffu;

// Sum over the `width` lanes of a team (width a power of two dividing 32, teams aligned in the warp).
// Every lane of the warp must call it. The butterfly leaves the identical sum on every lane of a team.
__device__ __forceinline__ float team_sum(float v, int width) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) { return team_sum(v, 32); }

// Count, mean and sum of squared deviations of a set of values; merged with Chan et al.'s formula.
struct Moments {
  float n;
  float mean;
  float m2;
};

__device__ __forceinline__ Moments merge_moments(Moments a, Moments b) {
  const float n = a.n + b.n;
  if (n == 0.0f) return a;
  const float delta = b.mean - a.mean;
  const float fb = b.n / n;
  return Moments{n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
}

// Merges the moments of the 32 lanes in a fixed tree order; the result is valid on lane 0 (deterministic).
__device__ __forceinline__ Moments warp_merge_moments(Moments m) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    Moments other;
    other.n = __shfl_down_sync(kFullMask, m.n, offset);
    other.mean = __shfl_down_sync(kFullMask, m.mean, offset);
    other.m2 = __shfl_down_sync(kFullMask, m.m2, offset);
    m = merge_moments(m, other);
  }
  return m;
}

}  // namespace diffkern
