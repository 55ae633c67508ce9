// The GroupNorm + SiLU kernels for NCHW (C-contiguous) inputs: fused (one block per group, the group kept in
// shared memory) and split (each group's channels over K blocks), forward and backward.
// Part of group_norm_silu.cu, included there only: like the rest of it, in an anonymous namespace.
#pragma once

#include <cstdint>

#include "gn_common.cuh"
#include "platform.cuh"
#include "reductions.cuh"
#include "vector_io.cuh"

namespace diffkern {
namespace {

// NCHW: a channel (n, c) is a contiguous row of S elements. Rows are processed by teams of L lanes
// (L = the power of two >= the row's unit count, at most 32), so short rows still keep warps busy; loops
// over rows are uniform across the block so teams can reduce with shuffles.

// What an NCHW block works on: group ng = (n, g) is blockIdx.x, its rows [r0, r1) are slice k = blockIdx.y
// of K = gridDim.y (all Cg rows for the fused kernels, whose grid has one slice), and its threads form
// teams of L lanes.
struct NchwBlock {
  int64_t ng;
  int64_t n;
  int k;
  int K;
  int64_t c0;    // the group's first channel
  int64_t goff;  // offset of the group's first element in x (and y, dy, dx)
  int r0;
  int r1;
  int team;
  int lane;
  int nteams;
};

// slice_begin(Cg, k, K) = floor(Cg * k / K) in 32-bit arithmetic, exactly: with Cg = q * K + rem,
// Cg * k / K = q * k + rem * k / K, where q * k <= Cg and rem * k < K * K <= 65535^2 < 2^32 (K is a grid's y
// dimension, k <= K). The merge (merge_slices) recomputes the same bounds with slice_begin.
__device__ __forceinline__ int row_slice_begin(int Cg, int k, int K) {
  const unsigned total = static_cast<unsigned>(Cg), kk = static_cast<unsigned>(k), KK = static_cast<unsigned>(K);
  const unsigned q = total / KK, rem = total % KK;
  return static_cast<int>(q * kk + rem * kk / KK);
}

__device__ __forceinline__ NchwBlock nchw_block(const GnDims& d, int L) {
  NchwBlock b;
  // 32-bit divisions only (a 64-bit one is a branch to a subroutine call, whose merged result ptxas kept on
  // the stack in several of these kernels: a spill). blockIdx.x and G are below 2^31.
  const unsigned g = static_cast<unsigned>(d.G);
  b.ng = blockIdx.x;
  b.n = blockIdx.x / g;
  b.k = blockIdx.y;
  b.K = gridDim.y;
  b.c0 = static_cast<int64_t>(blockIdx.x - static_cast<unsigned>(b.n) * g) * d.Cg;
  b.goff = (b.n * d.C + b.c0) * d.S;
  b.r0 = row_slice_begin(d.Cg, b.k, b.K);
  b.r1 = row_slice_begin(d.Cg, b.k + 1, b.K);
  b.team = threadIdx.x / L;
  b.lane = threadIdx.x % L;
  b.nteams = kGnThreads / L;
  return b;
}

// Moments of the block's rows combined into one (mean, m2), valid on the first warp. `xg` is the
// group's first row; `keep` (nullable) receives a copy of the rows. rowstat: r1 - r0 entries of scratch.
template <typename T, bool VEC>
__device__ __forceinline__ float2 slice_moments(const T* xg, T* keep, const NchwBlock& b, const GnDims& d, int L,
                                                float2* rowstat) {
  using U = Unit<T, VEC>;
  const int64_t S = d.S;
  const int64_t units = S / U::W;
  const float count = static_cast<float>(S);
  for (int base = b.r0; base < b.r1; base += b.nteams) {
    const int r = base + b.team;
    const bool active = r < b.r1;
    float shift = 0.0f, s1 = 0.0f, s2 = 0.0f;
    if (active) {
      const T* row = xg + r * S;
      shift = load_scalar(row);
      for (int64_t u = b.lane; u < units; u += L) {
        float f[U::W];
        if (keep != nullptr) {
          U::load_keep(row + u * U::W, keep + r * S + u * U::W, f);
        } else {
          U::load(row + u * U::W, f);
        }
#pragma unroll
        for (int e = 0; e < U::W; ++e) {
          const float dv = f[e] - shift;
          s1 += dv;
          s2 += dv * dv;
        }
      }
    }
    s1 = team_sum(s1, L);
    s2 = team_sum(s2, L);
    if (active && b.lane == 0) rowstat[r - b.r0] = shifted_moments(shift, s1, s2, count);
  }
  __syncthreads();
  float2 m = make_float2(0.0f, 0.0f);
  if (threadIdx.x < 32) m = combine_equal_count(rowstat, b.r1 - b.r0, count);
  return m;
}

// Normalise + affine + SiLU of the block's rows: src and dst are the group's first rows (src in global
// or shared memory).
template <typename T, bool VEC>
__device__ __forceinline__ void rows_apply(const T* src, T* dst, const NchwBlock& b, const GnDims& d, int L,
                                           float2 stat, ParamRef weight, ParamRef bias) {
  using U = Unit<T, VEC>;
  const int64_t S = d.S;
  const int64_t units = S / U::W;
  for (int r = b.r0 + b.team; r < b.r1; r += b.nteams) {
    const int64_t c = b.c0 + r;
    const float scale = stat.y * load_param(weight, c, 1.0f);
    const float shift = load_param(bias, c, 0.0f);
    const T* srow = src + r * S;
    T* drow = dst + r * S;
    for (int64_t u = b.lane; u < units; u += L) {
      float f[U::W];
      U::load(srow + u * U::W, f);
#pragma unroll
      for (int e = 0; e < U::W; ++e) f[e] = silu_f((f[e] - stat.x) * scale + shift);
      U::store(drow + u * U::W, f);
    }
  }
}

// Fused forward: one block per group, the group kept in shared memory.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_fwd_fused_nchw(const T* __restrict__ x, T* __restrict__ y, ParamRef weight, ParamRef bias,
                      float* __restrict__ mean_out, float* __restrict__ rstd_out, GnDims d, int L, float eps) {
  const NchwBlock b = nchw_block(d, L);
  SmemCarver carve{dynamic_smem()};
  T* xs = carve.take<T>(static_cast<int64_t>(d.Cg) * d.S);
  float2* rowstat = carve.take<float2>(d.Cg);
  float2* stat = carve.take<float2>(1);

  const float2 m = slice_moments<T, VEC>(x + b.goff, xs, b, d, L, rowstat);
  if (threadIdx.x == 0) publish_group_stats(m.x, m.y, d, eps, true, b.ng, stat, mean_out, rstd_out);
  __syncthreads();
  rows_apply<T, VEC>(xs, y + b.goff, b, d, L, *stat, weight, bias);
}

// Split forward, pass 1: moments of rows [r0, r1) of a group -> part[ng * K + k] = (mean, m2).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_fwd_stats_nchw(const T* __restrict__ x, float2* __restrict__ part, GnDims d, int L) {
  const NchwBlock b = nchw_block(d, L);
  SmemCarver carve{dynamic_smem()};
  float2* rowstat = carve.take<float2>(b.r1 - b.r0);

  const float2 m = slice_moments<T, VEC>(x + b.goff, nullptr, b, d, L, rowstat);
  if (threadIdx.x == 0) part[b.ng * b.K + b.k] = m;
}

// Split forward, pass 2: merge the group's K slices, normalise + affine + SiLU rows [r0, r1).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_fwd_apply_nchw(const T* __restrict__ x, T* __restrict__ y, const float2* __restrict__ part, ParamRef weight,
                      ParamRef bias, float* __restrict__ mean_out, float* __restrict__ rstd_out, GnDims d, int L,
                      float eps) {
  __shared__ float2 stat;
  if (threadIdx.x < 32) {
    const int64_t ng = blockIdx.x;
    const Moments m = merge_slices(part, ng, static_cast<int>(gridDim.y), d.Cg, static_cast<float>(d.S));
    if (threadIdx.x == 0) publish_group_stats(m.mean, m.m2, d, eps, blockIdx.y == 0, ng, &stat, mean_out, rstd_out);
  }
  __syncthreads();
  // The block's rows only now: computed before the merge (a loop with calls), ptxas kept one of their bounds
  // on the stack across it (a spill).
  const NchwBlock b = nchw_block(d, L);
  rows_apply<T, VEC>(x + b.goff, y + b.goff, b, d, L, stat, weight, bias);
}

// Backward, per row of the block: sums (sum dz, sum dz * xhat) into chan[n * C + c] and, if given,
// rowsum[r]. `keep_x`/`keep_dy` (nullable) receive copies of the rows.
template <typename T, bool VEC>
__device__ __forceinline__ void rows_grad_sums(const T* xg, const T* dyg, T* keep_x, T* keep_dy, const NchwBlock& b,
                                               const GnDims& d, int L, float mean, float rstd, ParamRef weight,
                                               ParamRef bias, float2* chan, float2* rowsum) {
  using U = Unit<T, VEC>;
  const int64_t S = d.S;
  const int64_t units = S / U::W;
  for (int base = b.r0; base < b.r1; base += b.nteams) {
    const int r = base + b.team;
    const bool active = r < b.r1;
    float a1 = 0.0f, a2 = 0.0f;
    if (active) {
      const float w = load_param(weight, b.c0 + r, 1.0f);
      const float bb = load_param(bias, b.c0 + r, 0.0f);
      const T* xrow = xg + r * S;
      const T* dyrow = dyg + r * S;
      for (int64_t u = b.lane; u < units; u += L) {
        float fx[U::W];
        float fdy[U::W];
        if (keep_x != nullptr) {
          U::load_keep(xrow + u * U::W, keep_x + r * S + u * U::W, fx);
          U::load_keep(dyrow + u * U::W, keep_dy + r * S + u * U::W, fdy);
        } else {
          U::load(xrow + u * U::W, fx);
          U::load(dyrow + u * U::W, fdy);
        }
#pragma unroll
        for (int e = 0; e < U::W; ++e) {
          const float xhat = (fx[e] - mean) * rstd;
          const float dz = silu_grad_dz(fdy[e], xhat * w + bb);
          a1 += dz;
          a2 += dz * xhat;
        }
      }
    }
    a1 = team_sum(a1, L);
    a2 = team_sum(a2, L);
    if (active && b.lane == 0) {
      chan[b.n * d.C + b.c0 + r] = make_float2(a1, a2);
      if (rowsum != nullptr) rowsum[r] = make_float2(a1, a2);
    }
  }
}

// dx of the block's rows, given the group's mean(dxhat) = gm.x and mean(dxhat * xhat) = gm.y. xg, dyg,
// dxg: the group's first rows (x and dy in global or shared memory).
template <typename T, bool VEC>
__device__ __forceinline__ void rows_dx(const T* xg, const T* dyg, T* dxg, const NchwBlock& b, const GnDims& d, int L,
                                        float mean, float rstd, ParamRef weight, ParamRef bias, float2 gm) {
  using U = Unit<T, VEC>;
  const int64_t S = d.S;
  const int64_t units = S / U::W;
  for (int r = b.r0 + b.team; r < b.r1; r += b.nteams) {
    const float w = load_param(weight, b.c0 + r, 1.0f);
    const float bb = load_param(bias, b.c0 + r, 0.0f);
    const T* xrow = xg + r * S;
    const T* dyrow = dyg + r * S;
    T* dxrow = dxg + r * S;
    for (int64_t u = b.lane; u < units; u += L) {
      float fx[U::W];
      float fdy[U::W];
      U::load(xrow + u * U::W, fx);
      U::load(dyrow + u * U::W, fdy);
#pragma unroll
      for (int e = 0; e < U::W; ++e) {
        const float xhat = (fx[e] - mean) * rstd;
        const float dxhat = silu_grad_dz(fdy[e], xhat * w + bb) * w;
        fx[e] = rstd * (dxhat - gm.x - xhat * gm.y);
      }
      U::store(dxrow + u * U::W, fx);
    }
  }
}

// Group sums of dxhat and dxhat * xhat from the per-channel sums (sum dz, sum dz * xhat) of the group's
// channels: sum_c w_c * (.x, .y). One whole warp; valid on every lane; divided by the group size.
__device__ __forceinline__ float2 group_grad_means(const float2* chan, int64_t c0, int Cg, ParamRef weight,
                                                   float group_size) {
  const float2 s = warp_sum_pairs(Cg, [&](int64_t j) {
    const float w = load_param(weight, c0 + j, 1.0f);
    const float2 p = chan[j];
    return make_float2(w * p.x, w * p.y);
  });
  return make_float2(s.x / group_size, s.y / group_size);
}

// Fused backward: one block per group, x and dy kept in shared memory. Writes dx and the per-(n, c)
// sums chan[n * C + c] = (sum dz, sum dz * xhat) for the dweight/dbias reduction.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_bwd_fused_nchw(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean_in,
                      const float* __restrict__ rstd_in, ParamRef weight, ParamRef bias, T* __restrict__ dx,
                      float2* __restrict__ chan, GnDims d, int L) {
  const NchwBlock b = nchw_block(d, L);
  const int64_t M = static_cast<int64_t>(d.Cg) * d.S;
  SmemCarver carve{dynamic_smem()};
  T* xs = carve.take<T>(M);
  T* dys = carve.take<T>(M);
  float2* rowsum = carve.take<float2>(d.Cg);
  float2* gmeans = carve.take<float2>(1);

  const float mean = mean_in[b.ng];
  const float rstd = rstd_in[b.ng];
  rows_grad_sums<T, VEC>(x + b.goff, dy + b.goff, xs, dys, b, d, L, mean, rstd, weight, bias, chan, rowsum);
  __syncthreads();
  if (threadIdx.x < 32) {
    const float2 gm = group_grad_means(rowsum, b.c0, d.Cg, weight, static_cast<float>(M));
    if (threadIdx.x == 0) gmeans[0] = gm;
  }
  __syncthreads();
  rows_dx<T, VEC>(xs, dys, dx + b.goff, b, d, L, mean, rstd, weight, bias, gmeans[0]);
}

// Split backward, pass 1: per-channel sums of rows [r0, r1) of a group -> chan[n * C + c].
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_bwd_sums_nchw(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean_in,
                     const float* __restrict__ rstd_in, ParamRef weight, ParamRef bias, float2* __restrict__ chan,
                     GnDims d, int L) {
  const NchwBlock b = nchw_block(d, L);
  rows_grad_sums<T, VEC>(x + b.goff, dy + b.goff, nullptr, nullptr, b, d, L, mean_in[b.ng], rstd_in[b.ng], weight, bias,
                         chan, nullptr);
}

// Split backward, pass 2: dx of rows [r0, r1) of a group.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_bwd_dx_nchw(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean_in,
                   const float* __restrict__ rstd_in, ParamRef weight, ParamRef bias, const float2* __restrict__ chan,
                   T* __restrict__ dx, GnDims d, int L) {
  __shared__ float2 gmeans;
  if (threadIdx.x < 32) {
    const unsigned g = static_cast<unsigned>(d.G);
    const int64_t n = blockIdx.x / g;
    const int64_t c0 = static_cast<int64_t>(blockIdx.x % g) * d.Cg;
    const float2 gm = group_grad_means(chan + n * d.C + c0, c0, d.Cg, weight,
                                       static_cast<float>(d.Cg) * static_cast<float>(d.S));
    if (threadIdx.x == 0) gmeans = gm;
  }
  __syncthreads();
  // The block's rows only now, as in gn_fwd_apply_nchw (no bound kept on the stack across the calls above).
  const NchwBlock b = nchw_block(d, L);
  rows_dx<T, VEC>(x + b.goff, dy + b.goff, dx + b.goff, b, d, L, mean_in[b.ng], rstd_in[b.ng], weight, bias, gmeans);
}

}  // namespace
}  // namespace diffkern
