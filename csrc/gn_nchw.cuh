// The GroupNorm + SiLU kernels for NCHW (C-contiguous) inputs: fused (one block per group, the group kept in
// shared memory) and split (each group over K blocks: slices of its channels, and where a group has fewer
// channels than slices, chunks of each channel's row), forward and backward.
// Part of group_norm_silu.cu, included there only: like the rest of it, in an anonymous namespace.
#pragma once

#include <cstdint>

#include "gn_common.cuh"
#include "platform.cuh"
#include "reductions.cuh"
#include "vector_io.cuh"

namespace diffkern {
namespace {

// NCHW: a channel (n, c) is a contiguous row of S elements. Rows are processed by teams of L lanes (a power of
// two up to the block: the planner's team_width, about the row chunk's unit count, wider where the block has
// fewer rows than teams), so short rows still keep warps busy and a block of one long row uses all its threads;
// loops over rows are uniform across the block so teams can reduce with shuffles (and barriers, for teams
// wider than a warp). Each thread keeps kGnInflight independent 16-byte loads in flight in the streaming
// loops (the forward's kGnInflight units of x, the backward's kGnInflight / 2 units of x and of dy).

// What an NCHW block works on: group ng = (n, g) is blockIdx.x; blockIdx.y = kr * Ks + ks picks its rows
// [r0, r1) (row slice kr of Kr) and, of each, the units [u0, u1) (chunk ks of Ks) (NchwSlices; the fused
// kernels' grid has one slice: all Cg rows, whole); its threads form teams of L lanes.
struct NchwBlock {
  int64_t ng;
  int64_t n;
  int k;
  int K;
  int64_t c0;    // the group's first channel
  int64_t goff;  // offset of the group's first element in x (and y, dy, dx)
  int ks;  // the chunk of each row, and its Ks
  int Ks;
  int r0;
  int r1;
  int64_t u0;
  int64_t u1;
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

// Chunk ks of Ks over units = uq * Ks + ur: uq * ks + floor(ur * ks / Ks), exactly floor(units * ks / Ks), with
// ur * ks < Ks * Ks <= 65535^2 < 2^32.
__device__ __forceinline__ int64_t unit_chunk_begin(const NchwSlices& sl, int ks) {
  return sl.uq * ks + static_cast<int64_t>(static_cast<unsigned>(sl.ur) * static_cast<unsigned>(ks) /
                                           static_cast<unsigned>(sl.Ks));
}

__device__ __forceinline__ NchwBlock nchw_block(const GnDims& d, const NchwSlices& sl, int L) {
  NchwBlock b;
  // 32-bit divisions only (a 64-bit one is a branch to a subroutine call, whose merged result ptxas kept on
  // the stack in several of these kernels: a spill). blockIdx.x and G are below 2^31.
  const unsigned g = static_cast<unsigned>(d.G);
  b.ng = blockIdx.x;
  b.n = blockIdx.x / g;
  b.k = blockIdx.y;
  b.K = gridDim.y;
  const unsigned ks = static_cast<unsigned>(sl.Ks);
  const int kr = static_cast<int>(blockIdx.y / ks);
  b.ks = static_cast<int>(blockIdx.y - static_cast<unsigned>(kr) * ks);
  b.Ks = sl.Ks;
  b.c0 = static_cast<int64_t>(blockIdx.x - static_cast<unsigned>(b.n) * g) * d.Cg;
  b.goff = (b.n * d.C + b.c0) * d.S;
  b.r0 = row_slice_begin(d.Cg, kr, sl.Kr);
  b.r1 = row_slice_begin(d.Cg, kr + 1, sl.Kr);
  b.u0 = unit_chunk_begin(sl, b.ks);
  b.u1 = unit_chunk_begin(sl, b.ks + 1);
  b.team = threadIdx.x / L;
  b.lane = threadIdx.x % L;
  b.nteams = kGnThreads / L;
  return b;
}

// The fused kernels' loads in flight per thread where vectorised, twice the split kernels': their groups' shared
// memory leaves room for one or two blocks per SM, so each thread must keep more bytes in flight.
template <bool VEC>
constexpr int kFusedUnroll = VEC ? 2 * kGnInflight : kPairUnroll<VEC> * 2;

// Moments of the block's rows (each row's units [u0, u1)) combined into one (mean, m2), valid on the first warp.
// `xg` is the group's first row; `keep` (nullable) receives a copy of the rows. rowstat: r1 - r0 entries of
// scratch.
template <typename T, bool VEC>
__device__ __forceinline__ float2 slice_moments(const T* xg, T* keep, const NchwBlock& b, const GnDims& d, int L,
                                                float2* rowstat) {
  using U = Unit<T, VEC>;
  constexpr int W = U::W;
  __shared__ float2 team_red[kGnWarps];
  const int64_t S = d.S;
  const float count = static_cast<float>((b.u1 - b.u0) * W);
  for (int base = b.r0; base < b.r1; base += b.nteams) {
    const int r = base + b.team;
    const bool active = r < b.r1;
    float shift = 0.0f, s1 = 0.0f, s2 = 0.0f;
    if (active) {
      const T* row = xg + r * S;
      T* keep_row = keep == nullptr ? nullptr : keep + r * S;
      shift = load_scalar(row + b.u0 * W);
      using R = typename U::Raw;
      const auto accumulate = [&](int64_t, const R& raw) {
        float f[W];
        U::unpack(raw, f);
#pragma unroll
        for (int e = 0; e < W; ++e) {
          const float dv = f[e] - shift;
          s1 += dv;
          s2 += dv * dv;
        }
      };
      if (keep_row != nullptr) {
        unrolled_units<kFusedUnroll<VEC>, R>(
            b.u0 + b.lane, b.u1, L, [&](int64_t u) { return U::load_raw_keep(row + u * W, keep_row + u * W); },
            accumulate);
      } else {
        unrolled_units<kGnInflight, R>(
            b.u0 + b.lane, b.u1, L, [&](int64_t u) { return U::load_raw(row + u * W); }, accumulate);
      }
    }
    const float2 s = team_sum_pair(s1, s2, L, team_red);
    if (active && b.lane == 0) rowstat[r - b.r0] = shifted_moments(shift, s.x, s.y, count);
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
  constexpr int W = U::W;
  const int64_t S = d.S;
  for (int r = b.r0 + b.team; r < b.r1; r += b.nteams) {
    const int64_t c = b.c0 + r;
    const float scale = stat.y * load_param(weight, c, 1.0f);
    const float shift = load_param(bias, c, 0.0f);
    const T* srow = src + r * S;
    T* drow = dst + r * S;
    unrolled_units<kGnInflight, typename U::Raw>(
        b.u0 + b.lane, b.u1, L, [&](int64_t u) { return U::load_raw(srow + u * W); },
        [&](int64_t u, const typename U::Raw& raw) {
          float f[W];
          U::unpack(raw, f);
#pragma unroll
          for (int e = 0; e < W; ++e) f[e] = silu_f((f[e] - stat.x) * scale + shift);
          U::store(drow + u * W, f);
        });
  }
}

// Fused forward: one block per group, the group kept in shared memory.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_fwd_fused_nchw(const T* __restrict__ x, T* __restrict__ y, ParamRef weight, ParamRef bias,
                      float* __restrict__ mean_out, float* __restrict__ rstd_out, GnDims d, NchwSlices sl, int L,
                      float eps) {
  const NchwBlock b = nchw_block(d, sl, L);
  SmemCarver carve{dynamic_smem()};
  T* xs = carve.take<T>(static_cast<int64_t>(d.Cg) * d.S);
  float2* rowstat = carve.take<float2>(d.Cg);
  float2* stat = carve.take<float2>(1);

  const float2 m = slice_moments<T, VEC>(x + b.goff, xs, b, d, L, rowstat);
  if (threadIdx.x == 0) publish_group_stats(m.x, m.y, d, eps, true, b.ng, stat, mean_out, rstd_out);
  __syncthreads();
  rows_apply<T, VEC>(xs, y + b.goff, b, d, L, *stat, weight, bias);
}

// Split forward, pass 1: moments of the block's rows and chunk of a group -> part[ng * K + k] = (mean, m2).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_fwd_stats_nchw(const T* __restrict__ x, float2* __restrict__ part, GnDims d, NchwSlices sl, int L) {
  const NchwBlock b = nchw_block(d, sl, L);
  SmemCarver carve{dynamic_smem()};
  float2* rowstat = carve.take<float2>(b.r1 - b.r0);

  const float2 m = slice_moments<T, VEC>(x + b.goff, nullptr, b, d, L, rowstat);
  if (threadIdx.x == 0) part[b.ng * b.K + b.k] = m;
}

// Merges the K = Kr * Ks slice moments of group `ng` (slice k: rows of row slice k / Ks, each W * its unit
// chunk k % Ks elements long). Called by one whole warp; the result is valid on lane 0.
template <int W>
__device__ __forceinline__ Moments merge_nchw_slices(const float2* part, int64_t ng, const GnDims& d,
                                                     const NchwSlices& sl) {
  const int lane = threadIdx.x & 31;
  const int K = sl.Kr * sl.Ks;
  const unsigned ks_count = static_cast<unsigned>(sl.Ks);
  Moments m{0.0f, 0.0f, 0.0f};
  for (int j = lane; j < K; j += 32) {
    const float2 p = part[ng * K + j];
    const int kr = static_cast<int>(static_cast<unsigned>(j) / ks_count);
    const int ks = j - kr * sl.Ks;
    const int rows = row_slice_begin(d.Cg, kr + 1, sl.Kr) - row_slice_begin(d.Cg, kr, sl.Kr);
    const int64_t elems = (unit_chunk_begin(sl, ks + 1) - unit_chunk_begin(sl, ks)) * W;
    m = merge_moments(m, Moments{static_cast<float>(rows) * static_cast<float>(elems), p.x, p.y});
  }
  return warp_merge_moments(m);
}

// Split forward, pass 2: merge the group's K slices, normalise + affine + SiLU the block's rows and chunk.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_fwd_apply_nchw(const T* __restrict__ x, T* __restrict__ y, const float2* __restrict__ part, ParamRef weight,
                      ParamRef bias, float* __restrict__ mean_out, float* __restrict__ rstd_out, GnDims d,
                      NchwSlices sl, int L, float eps) {
  __shared__ float2 stat;
  if (threadIdx.x < 32) {
    const int64_t ng = blockIdx.x;
    const Moments m = merge_nchw_slices<Unit<T, VEC>::W>(part, ng, d, sl);
    if (threadIdx.x == 0) publish_group_stats(m.mean, m.m2, d, eps, blockIdx.y == 0, ng, &stat, mean_out, rstd_out);
  }
  __syncthreads();
  // The block's rows only now: computed before the merge (a loop with calls), ptxas kept one of their bounds
  // on the stack across it (a spill).
  const NchwBlock b = nchw_block(d, sl, L);
  rows_apply<T, VEC>(x + b.goff, y + b.goff, b, d, L, stat, weight, bias);
}

// Backward, per row of the block (its units [u0, u1)): sums (sum dz, sum dz * xhat) into
// chan[(n * Ks + ks) * C + c] and, if given, rowsum[r]. `keep_x`/`keep_dy` (nullable) receive copies of the rows.
// The loops' units hold x's W elements then dy's.
template <typename T, bool VEC>
__device__ __forceinline__ void rows_grad_sums(const T* xg, const T* dyg, T* keep_x, T* keep_dy, const NchwBlock& b,
                                               const GnDims& d, int L, float mean, float rstd, ParamRef weight,
                                               ParamRef bias, float2* chan, float2* rowsum) {
  using U = Unit<T, VEC>;
  constexpr int W = U::W;
  __shared__ float2 team_red[kGnWarps];
  const int64_t S = d.S;
  for (int base = b.r0; base < b.r1; base += b.nteams) {
    const int r = base + b.team;
    const bool active = r < b.r1;
    float a1 = 0.0f, a2 = 0.0f;
    if (active) {
      const float w = load_param(weight, b.c0 + r, 1.0f);
      const float bb = load_param(bias, b.c0 + r, 0.0f);
      const T* xrow = xg + r * S;
      const T* dyrow = dyg + r * S;
      using P = RawPair<T, VEC>;
      const auto accumulate = [&](int64_t, const P& raw) {
        float fx[W], fdy[W];
        U::unpack(raw.x, fx);
        U::unpack(raw.dy, fdy);
#pragma unroll
        for (int e = 0; e < W; ++e) {
          const float xhat = (fx[e] - mean) * rstd;
          const float dz = silu_grad_dz(fdy[e], xhat * w + bb);
          a1 += dz;
          a2 += dz * xhat;
        }
      };
      if (keep_x != nullptr) {
        T* kx = keep_x + r * S;
        T* kdy = keep_dy + r * S;
        unrolled_units<kFusedUnroll<VEC> / 2, P>(
            b.u0 + b.lane, b.u1, L,
            [&](int64_t u) {
              return P{U::load_raw_keep(xrow + u * W, kx + u * W), U::load_raw_keep(dyrow + u * W, kdy + u * W)};
            },
            accumulate);
      } else {
        unrolled_units<kPairUnroll<VEC>, P>(
            b.u0 + b.lane, b.u1, L,
            [&](int64_t u) { return P{U::load_raw(xrow + u * W), U::load_raw(dyrow + u * W)}; }, accumulate);
      }
    }
    const float2 s = team_sum_pair(a1, a2, L, team_red);
    if (active && b.lane == 0) {
      chan[(b.n * b.Ks + b.ks) * d.C + b.c0 + r] = s;
      if (rowsum != nullptr) rowsum[r] = s;
    }
  }
}

// dx of the block's rows, given the group's mean(dxhat) = gm.x and mean(dxhat * xhat) = gm.y. xg, dyg,
// dxg: the group's first rows (x and dy in global or shared memory).
template <typename T, bool VEC>
__device__ __forceinline__ void rows_dx(const T* xg, const T* dyg, T* dxg, const NchwBlock& b, const GnDims& d, int L,
                                        float mean, float rstd, ParamRef weight, ParamRef bias, float2 gm) {
  using U = Unit<T, VEC>;
  constexpr int W = U::W;
  const int64_t S = d.S;
  for (int r = b.r0 + b.team; r < b.r1; r += b.nteams) {
    const float w = load_param(weight, b.c0 + r, 1.0f);
    const float bb = load_param(bias, b.c0 + r, 0.0f);
    const T* xrow = xg + r * S;
    const T* dyrow = dyg + r * S;
    T* dxrow = dxg + r * S;
    using P = RawPair<T, VEC>;
    unrolled_units<kPairUnroll<VEC>, P>(
        b.u0 + b.lane, b.u1, L, [&](int64_t u) { return P{U::load_raw(xrow + u * W), U::load_raw(dyrow + u * W)}; },
        [&](int64_t u, const P& raw) {
          float fx[W], fdy[W];
          U::unpack(raw.x, fx);
          U::unpack(raw.dy, fdy);
#pragma unroll
          for (int e = 0; e < W; ++e) {
            const float xhat = (fx[e] - mean) * rstd;
            const float dxhat = silu_grad_dz(fdy[e], xhat * w + bb) * w;
            fx[e] = rstd * (dxhat - gm.x - xhat * gm.y);
          }
          U::store(dxrow + u * W, fx);
        });
  }
}

// Group sums of dxhat and dxhat * xhat from the per-channel sums (sum dz, sum dz * xhat) of the group's
// channels in each of Ks chunks (chunk ks's at chan[ks * stride + j], channel c0 + j): sum_c w_c * (.x, .y).
// One whole warp; valid on every lane; divided by the group size. Cg * Ks < 2^31 (Ks > 1 only with
// Cg * Ks = K <= 65535).
__device__ __forceinline__ float2 group_grad_means(const float2* chan, int64_t stride, int Ks, int64_t c0, int Cg,
                                                   ParamRef weight, float group_size) {
  const unsigned cg = static_cast<unsigned>(Cg);
  const float2 s = warp_sum_pairs(static_cast<int64_t>(Cg) * Ks, [&](int64_t j) {
    const unsigned ks = static_cast<unsigned>(j) / cg;
    const int64_t c = static_cast<int64_t>(static_cast<unsigned>(j) - ks * cg);
    const float w = load_param(weight, c0 + c, 1.0f);
    const float2 p = chan[ks * stride + c];
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
                      float2* __restrict__ chan, GnDims d, NchwSlices sl, int L) {
  const NchwBlock b = nchw_block(d, sl, L);
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
    const float2 gm = group_grad_means(rowsum, 0, 1, b.c0, d.Cg, weight, static_cast<float>(M));
    if (threadIdx.x == 0) gmeans[0] = gm;
  }
  __syncthreads();
  rows_dx<T, VEC>(xs, dys, dx + b.goff, b, d, L, mean, rstd, weight, bias, gmeans[0]);
}

// Split backward, pass 1: per-channel sums of the block's rows and chunk of a group ->
// chan[(n * Ks + ks) * C + c].
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_bwd_sums_nchw(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean_in,
                     const float* __restrict__ rstd_in, ParamRef weight, ParamRef bias, float2* __restrict__ chan,
                     GnDims d, NchwSlices sl, int L) {
  const NchwBlock b = nchw_block(d, sl, L);
  rows_grad_sums<T, VEC>(x + b.goff, dy + b.goff, nullptr, nullptr, b, d, L, mean_in[b.ng], rstd_in[b.ng], weight, bias,
                         chan, nullptr);
}

// Split backward, pass 2: dx of the block's rows and chunk of a group.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_bwd_dx_nchw(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean_in,
                   const float* __restrict__ rstd_in, ParamRef weight, ParamRef bias, const float2* __restrict__ chan,
                   T* __restrict__ dx, GnDims d, NchwSlices sl, int L) {
  __shared__ float2 gmeans;
  if (threadIdx.x < 32) {
    const unsigned g = static_cast<unsigned>(d.G);
    const int64_t n = blockIdx.x / g;
    const int64_t c0 = static_cast<int64_t>(blockIdx.x % g) * d.Cg;
    const float2 gm = group_grad_means(chan + n * sl.Ks * d.C + c0, d.C, sl.Ks, c0, d.Cg, weight,
                                       static_cast<float>(d.Cg) * static_cast<float>(d.S));
    if (threadIdx.x == 0) gmeans = gm;
  }
  __syncthreads();
  // The block's rows only now, as in gn_fwd_apply_nchw (no bound kept on the stack across the calls above).
  const NchwBlock b = nchw_block(d, sl, L);
  rows_dx<T, VEC>(x + b.goff, dy + b.goff, dx + b.goff, b, d, L, mean_in[b.ng], rstd_in[b.ng], weight, bias, gmeans);
}

}  // namespace
}  // namespace diffkern
