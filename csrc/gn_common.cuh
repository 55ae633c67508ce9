// What the GroupNorm + SiLU kernels of both layouts share (device, and the host mirror of the shared-memory
// carving): block size, problem dimensions, affine parameters, unit accesses, the statistics' building blocks
// and the dweight/dbias reduction that ends every backward.
// Part of group_norm_silu.cu, included there only: like the rest of it, in an anonymous namespace.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "platform.cuh"
#include "reductions.cuh"
#include "vector_io.cuh"

namespace diffkern {
namespace {

constexpr int kGnThreads = 256;
constexpr int kGnWarps = kGnThreads / 32;

// An optional per-channel affine parameter of any float dtype.
struct ParamRef {
  const void* ptr;
  int kind;  // 0: absent, 1: float32, 2: float16, 3: bfloat16, 4: float64
};

__device__ __forceinline__ float load_param(const ParamRef& p, int64_t c, float absent) {
  switch (p.kind) {
    case 1: return static_cast<const float*>(p.ptr)[c];
    case 2: return __half2float(static_cast<const __half*>(p.ptr)[c]);
    case 3: return __bfloat162float(static_cast<const __nv_bfloat16*>(p.ptr)[c]);
    case 4: return static_cast<float>(static_cast<const double*>(p.ptr)[c]);
    default: return absent;
  }
}

struct GnDims {
  int64_t N;
  int64_t C;
  int64_t S;
  int G;
  int Cg;
};

// How the NCHW split regime cuts a group (n, g) into K = Kr * Ks blocks: block k = blockIdx.y covers row slice
// kr = k / Ks of Kr over the group's Cg channels and, in each of those rows, chunk ks = k % Ks of Ks over the row's
// `units` (16-byte vectors, or elements) with units = uq * Ks + ur (precomputed on the host: the chunk bounds
// need no 64-bit division on the device). Ks > 1 only with Kr = Cg (one row per block), so K = Cg * Ks <= 65535
// (the grid's y dimension). The fused kernels use {1, 1, units, 0}.
struct NchwSlices {
  int Kr;
  int Ks;
  int64_t uq;
  int ur;
};

// Accesses of one "unit": a 16-byte vector of kVec<T> elements, or one element.
template <typename T, bool VEC>
struct Unit {
  static constexpr int W = VEC ? kVec<T> : 1;

  static __device__ __forceinline__ void load(const T* p, float (&f)[W]) {
    if constexpr (VEC) {
      load_vec<T>(p, f);
    } else {
      f[0] = load_scalar(p);
    }
  }

  // Loads from global memory, keeps a copy in shared memory.
  static __device__ __forceinline__ void load_keep(const T* p, T* keep, float (&f)[W]) {
    if constexpr (VEC) {
      const uint4 raw = load_raw16(p);
      store_raw16(keep, raw);
      unpack_vec<T>(raw, f);
    } else {
      const T v = *p;
      *keep = v;
      f[0] = Elem<T>::to_float(v);
    }
  }

  // The unit as loaded (16 bytes, or the element), unpacked later: loops that keep several units in flight hold
  // them packed (fewer live registers across the division's slow-path calls, which would otherwise spill).
  using Raw = std::conditional_t<VEC, uint4, T>;

  static __device__ __forceinline__ Raw load_raw(const T* p) {
    if constexpr (VEC) {
      return load_raw16(p);
    } else {
      return *p;
    }
  }

  // Loads from global memory, keeps a copy in shared memory.
  static __device__ __forceinline__ Raw load_raw_keep(const T* p, T* keep) {
    const Raw r = load_raw(p);
    if constexpr (VEC) {
      store_raw16(keep, r);
    } else {
      *keep = r;
    }
    return r;
  }

  static __device__ __forceinline__ void unpack(const Raw& r, float (&f)[W]) {
    if constexpr (VEC) {
      unpack_vec<T>(r, f);
    } else {
      f[0] = Elem<T>::to_float(r);
    }
  }

  static __device__ __forceinline__ void store(T* p, const float (&f)[W]) {
    if constexpr (VEC) {
      store_vec<T>(p, f);
    } else {
      store_scalar(p, f[0]);
    }
  }
};

// Sums of the pair (a, b) over each team of L lanes (L a power of two up to kGnThreads, teams aligned), valid on
// every lane of the team, in a fixed order. L <= 32: shuffles within the warp (every lane of the warp calls it).
// Wider teams (whole warps): warp sums, then the team's warps in order through `scratch` (kGnWarps pairs); the
// whole block must call it then (two barriers).
__device__ __forceinline__ float2 team_sum_pair(float a, float b, int L, float2* scratch) {
  if (L <= 32) return make_float2(team_sum(a, L), team_sum(b, L));
  a = warp_sum(a);
  b = warp_sum(b);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x / 32] = make_float2(a, b);
  __syncthreads();
  // The team's first warp: threadIdx.x rounded down to a multiple of L, in warps.
  const float2* team = scratch + ((threadIdx.x & ~static_cast<unsigned>(L - 1)) >> 5);
  float2 s = team[0];
  for (int w = 1; w < (L >> 5); ++w) {
    s.x += team[w].x;
    s.y += team[w].y;
  }
  __syncthreads();  // scratch is reused by the next call
  return s;
}

// Loads in flight per thread in the streaming loops of both layouts (16-byte units where vectorised).
constexpr int kGnInflight = 4;

// Calls body(u, raw) for u = first, first + step, ... < end in order, with raw = load(u) (the unit(s) as
// loaded, of type R): the loads of up to kU consecutive calls are issued before their bodies run.
template <int kU, typename R, typename Load, typename Body>
__device__ __forceinline__ void unrolled_units(int64_t first, int64_t end, int step, Load load, Body body) {
  int64_t u = first;
  for (; u + static_cast<int64_t>(kU - 1) * step < end; u += static_cast<int64_t>(kU) * step) {
    R raw[kU];
#pragma unroll
    for (int i = 0; i < kU; ++i) raw[i] = load(u + static_cast<int64_t>(i) * step);
#pragma unroll
    for (int i = 0; i < kU; ++i) body(u + static_cast<int64_t>(i) * step, raw[i]);
  }
  for (; u < end; u += step) body(u, load(u));
}

// Units of x and dy loaded together by the backward's loops: kGnInflight / 2 pairs where vectorised; scalar rows
// one pair at a time (unrolled, ptxas kept their loop state on the stack across the division's slow-path calls).
template <bool VEC>
constexpr int kPairUnroll = VEC ? kGnInflight / 2 : 1;

// Units of x loaded together by the NHWC forward's loops: kGnInflight where vectorised, else one (as above).
template <bool VEC>
constexpr int kUnitUnroll = VEC ? kGnInflight : 1;

// A unit of x and the same unit of dy, as loaded.
template <typename T, bool VEC>
struct RawPair {
  typename Unit<T, VEC>::Raw x;
  typename Unit<T, VEC>::Raw dy;
};

__device__ __forceinline__ float sigmoid_f(float z) { return 1.0f / (1.0f + expf(-z)); }

__device__ __forceinline__ float silu_f(float z) { return z / (1.0f + expf(-z)); }

// Non-negative part that keeps NaN (fmaxf would turn a NaN variance into 0).
__device__ __forceinline__ float nonneg(float v) { return v < 0.0f ? 0.0f : v; }

// (mean, m2) of `count` values from their sums of (v - shift) and (v - shift)^2.
__device__ __forceinline__ float2 shifted_moments(float shift, float s1, float s2, float count) {
  return make_float2(shift + s1 / count, nonneg(s2 - s1 * s1 / count));
}

// Carves 16-byte aligned arrays out of dynamic shared memory; the host's byte counts (round16 per array)
// mirror it.
struct SmemCarver {
  unsigned char* p;
  template <typename U>
  __device__ __forceinline__ U* take(int64_t count) {
    U* r = reinterpret_cast<U*>(p);
    p += (static_cast<int64_t>(sizeof(U)) * count + 15) / 16 * 16;
    return r;
  }
};

inline size_t round16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// First index of slice k of K over [0, total): slices differ in size by at most one.
__device__ __forceinline__ int64_t slice_begin(int64_t total, int k, int K) { return (total * k) / K; }

__device__ __forceinline__ float silu_grad_dz(float dy, float z) {
  const float s = sigmoid_f(z);
  return dy * s * (1.0f + z * (1.0f - s));
}

// Sums of the pairs term(0), ..., term(count - 1) over one whole warp, lane-strided then by shuffles (a
// fixed order); valid on every lane.
template <typename Term>
__device__ __forceinline__ float2 warp_sum_pairs(int64_t count, Term term) {
  const int lane = threadIdx.x & 31;
  float s1 = 0.0f, s2 = 0.0f;
  for (int64_t j = lane; j < count; j += 32) {
    const float2 v = term(j);
    s1 += v.x;
    s2 += v.y;
  }
  return make_float2(warp_sum(s1), warp_sum(s2));
}

// Combines `rows` channel moments of `count` elements each (mean_r, m2_r) into one: exact two-level
// formula (no sequential merge). Called by one whole warp; the result is valid on every lane.
__device__ __forceinline__ float2 combine_equal_count(const float2* stats, int rows, float count) {
  const int lane = threadIdx.x & 31;
  float sum = 0.0f;
  for (int r = lane; r < rows; r += 32) sum += stats[r].x;
  const float mean = warp_sum(sum) / static_cast<float>(rows);
  float sq = 0.0f;
  for (int r = lane; r < rows; r += 32) {
    const float d = stats[r].x - mean;
    sq += stats[r].y + count * d * d;
  }
  return make_float2(mean, warp_sum(sq));
}

// Merges the K slice moments of group `gidx` (rows split over K slices of `rows_total` rows of `per_row`
// elements each). Called by one whole warp; the result is valid on lane 0.
__device__ __forceinline__ Moments merge_slices(const float2* part, int64_t gidx, int K, int64_t rows_total,
                                                float per_row) {
  const int lane = threadIdx.x & 31;
  Moments m{0.0f, 0.0f, 0.0f};
  for (int j = lane; j < K; j += 32) {
    const float2 p = part[gidx * K + j];
    const int64_t rows = slice_begin(rows_total, j + 1, K) - slice_begin(rows_total, j, K);
    m = merge_moments(m, Moments{static_cast<float>(rows) * per_row, p.x, p.y});
  }
  return warp_merge_moments(m);
}

// One thread's end of a group's statistics: rstd from the merged moments, kept for the block in `stat`
// and written to the outputs by the group's first slice only.
__device__ __forceinline__ void publish_group_stats(float mean, float m2, const GnDims& d, float eps,
                                                    bool first_slice, int64_t gidx, float2* stat,
                                                    float* mean_out, float* rstd_out) {
  const float var = m2 / (static_cast<float>(d.Cg) * static_cast<float>(d.S));
  const float rstd = 1.0f / sqrtf(var + eps);
  *stat = make_float2(mean, rstd);
  if (first_slice) {
    mean_out[gidx] = mean;
    rstd_out[gidx] = rstd;
  }
}

// Channels per block of gn_bwd_params (a warp's width); each of its kGnWarps warps sums every kGnWarps-th row.
constexpr int kGnParamChannels = 32;

// dweight[c] = sum_r chan[r * C + c].y, dbias[c] = sum_r chan[r * C + c].x over the R partial rows: warp w of
// the block sums rows w, w + kGnWarps, ... in order, then the warps' sums are added in warp order
// (deterministic). One block per kGnParamChannels channels.
__global__ void __launch_bounds__(kGnThreads)
    gn_bwd_params(const float2* __restrict__ chan, int64_t R, int64_t C, float* __restrict__ dweight,
                  float* __restrict__ dbias) {
  __shared__ float2 red[kGnWarps][kGnParamChannels];
  const int tx = threadIdx.x % kGnParamChannels;
  const int ty = threadIdx.x / kGnParamChannels;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kGnParamChannels + tx;
  float sw = 0.0f, sb = 0.0f;
  if (c < C) {
    for (int64_t r = ty; r < R; r += kGnWarps) {
      const float2 v = chan[r * C + c];
      sb += v.x;
      sw += v.y;
    }
  }
  red[ty][tx] = make_float2(sb, sw);
  __syncthreads();
  if (ty != 0 || c >= C) return;
  float2 t = red[0][tx];
  for (int w = 1; w < kGnWarps; ++w) {
    t.x += red[w][tx].x;
    t.y += red[w][tx].y;
  }
  if (dweight != nullptr) dweight[c] = t.y;
  if (dbias != nullptr) dbias[c] = t.x;
}

}  // namespace
}  // namespace diffkern
