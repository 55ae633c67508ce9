// The GroupNorm + SiLU kernels for channels-last (NHWC) inputs, split over slices of each sample's pixels,
// forward and backward.
// Part of group_norm_silu.cu, included there only: like the rest of it, in an anonymous namespace.
#pragma once

#include <cstdint>

#include "gn_common.cuh"
#include "platform.cuh"
#include "vector_io.cuh"

namespace diffkern {
namespace {

// NHWC: pixel p of sample n is a contiguous row of C channels. A block covers pixels [p0, p1) of one
// sample across all channels: TX threads span the row's units (16-byte vectors of channels, or single
// channels), TY = 256 / TX rows are in flight at once, and rows wider than 256 units take several column
// chunks. Each thread keeps fixed channels, so per-channel sums stay in registers.

// What an NHWC block works on: sample n = blockIdx.x, its pixels [p0, p1) are slice k = blockIdx.y of
// K = gridDim.y; and where its thread sits in the TX x TY tile.
struct NhwcMap {
  int64_t n;
  int k;
  int K;
  int64_t p0;
  int64_t p1;
  int64_t base;   // offset of the sample's first element
  int64_t units;  // per pixel row
  int tx, ty, TX, TY, chunks;
  bool active;
};

template <int W>
__device__ __forceinline__ NhwcMap nhwc_map(const GnDims& d) {
  NhwcMap m;
  m.n = blockIdx.x;
  m.k = blockIdx.y;
  m.K = gridDim.y;
  m.p0 = slice_begin(d.S, m.k, m.K);
  m.p1 = slice_begin(d.S, m.k + 1, m.K);
  m.base = m.n * d.S * d.C;
  m.units = d.C / W;
  m.TX = static_cast<int>(m.units < kGnThreads ? m.units : kGnThreads);
  m.TY = kGnThreads / m.TX;
  m.tx = threadIdx.x % m.TX;
  m.ty = threadIdx.x / m.TX;
  m.active = m.ty < m.TY;
  m.chunks = static_cast<int>((m.units + m.TX - 1) / m.TX);
  return m;
}

// Calls f(g, gidx) for each group g of the block's sample (gidx = n * G + g), one warp per group: every
// lane of the warp calls it.
template <typename F>
__device__ __forceinline__ void for_each_group_by_warp(const GnDims& d, F f) {
  for (int g = threadIdx.x / 32; g < d.G; g += kGnWarps) f(g, static_cast<int64_t>(blockIdx.x) * d.G + g);
}

// Calls f(cu) for each unit column this thread keeps, one per column chunk (active threads only).
template <typename F>
__device__ __forceinline__ void for_each_own_column(const NhwcMap& m, F f) {
  if (!m.active) return;
  for (int chunk = 0; chunk < m.chunks; ++chunk) {
    const int64_t cu = static_cast<int64_t>(chunk) * m.TX + m.tx;
    if (cu >= m.units) break;
    f(cu);
  }
}

// Elements of the TY-row reduction scratch (none when a single row is in flight).
template <int W>
__device__ __forceinline__ int64_t nhwc_red_count(const NhwcMap& m) {
  return m.TY > 1 ? static_cast<int64_t>(m.TY) * m.TX * W : 0;
}

// With TY > 1 rows in flight: adds up each channel's per-thread pair (a, b) of this column chunk over the
// TY rows, in row order, and hands the totals to emit(c, t1, t2). Called by the whole block; `red` is
// nhwc_red_count entries of scratch, free again on return.
template <int W, typename Emit>
__device__ __forceinline__ void sum_over_rows(const NhwcMap& m, int chunk, const float (&a)[W], const float (&b)[W],
                                              float2* red, Emit emit) {
  if (m.active) {
#pragma unroll
    for (int e = 0; e < W; ++e) red[(static_cast<int64_t>(m.ty) * m.TX + m.tx) * W + e] = make_float2(a[e], b[e]);
  }
  __syncthreads();
  for (int q = threadIdx.x; q < m.TX * W; q += kGnThreads) {
    const int64_t cuq = static_cast<int64_t>(chunk) * m.TX + q / W;
    if (cuq < m.units) {
      float t1 = 0.0f, t2 = 0.0f;
      for (int r = 0; r < m.TY; ++r) {
        const float2 v = red[static_cast<int64_t>(r) * m.TX * W + q];
        t1 += v.x;
        t2 += v.y;
      }
      emit(cuq * W + q % W, t1, t2);
    }
  }
  __syncthreads();  // red is reused by the next chunk
}

// Per-channel tables in shared memory: the (weight, bias) and the group of each channel.
struct ChannelTables {
  float2* wb;
  int* gid;
};

// Carves the tables (wb, then gid) and starts filling them: the whole block calls it, and they are ready
// after the next __syncthreads.
__device__ __forceinline__ ChannelTables channel_tables(SmemCarver& carve, ParamRef weight, ParamRef bias,
                                                        const GnDims& d) {
  ChannelTables t;
  t.wb = carve.take<float2>(d.C);
  t.gid = carve.take<int>(d.C);
  for (int64_t c = threadIdx.x; c < d.C; c += kGnThreads) {
    t.gid[c] = static_cast<int>(c / d.Cg);
    t.wb[c] = make_float2(load_param(weight, c, 1.0f), load_param(bias, c, 0.0f));
  }
  return t;
}

// Backward over this thread's pixels of the slice in unit column cu: per element, xhat and dz (the gradient
// before the SiLU) from x, dy, the statistics of the channel's group (gstat[g].x mean, .y rstd) and the
// channel's (weight, bias); then visit(offset of the unit, the W group entries, the W (weight, bias), xhat,
// dz) once per pixel.
template <typename T, bool VEC, typename GroupStat, typename Visit>
__device__ __forceinline__ void grad_column(const T* x, const T* dy, const NhwcMap& m, const GnDims& d, int64_t cu,
                                            const GroupStat* gstat, const ChannelTables& ct, Visit visit) {
  using U = Unit<T, VEC>;
  constexpr int W = U::W;
  GroupStat gs[W];
  float2 cwb[W];
#pragma unroll
  for (int e = 0; e < W; ++e) {
    const int64_t c = cu * W + e;
    gs[e] = gstat[ct.gid[c]];
    cwb[e] = ct.wb[c];
  }
  for (int64_t p = m.p0 + m.ty; p < m.p1; p += m.TY) {
    const int64_t off = m.base + p * d.C + cu * W;
    float fx[W], fdy[W];
    U::load(x + off, fx);
    U::load(dy + off, fdy);
    float xhat[W], dz[W];
#pragma unroll
    for (int e = 0; e < W; ++e) {
      xhat[e] = (fx[e] - gs[e].x) * gs[e].y;
      dz[e] = silu_grad_dz(fdy[e], xhat[e] * cwb[e].x + cwb[e].y);
    }
    visit(off, gs, cwb, xhat, dz);
  }
}

// Split forward, pass 1: per-(sample, slice, group) moments -> part[(n * G + g) * K + k].
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_fwd_stats_nhwc(const T* __restrict__ x, float2* __restrict__ part, GnDims d) {
  using U = Unit<T, VEC>;
  constexpr int W = U::W;
  const NhwcMap m = nhwc_map<W>(d);
  const float np = static_cast<float>(m.p1 - m.p0);
  SmemCarver carve{dynamic_smem()};
  float2* chstat = carve.take<float2>(d.C);
  float2* red = carve.take<float2>(nhwc_red_count<W>(m));

  const T* xs = x + m.base;
  for (int chunk = 0; chunk < m.chunks; ++chunk) {
    const int64_t cu = static_cast<int64_t>(chunk) * m.TX + m.tx;
    const bool colok = m.active && cu < m.units;
    float shift[W], s1[W], s2[W];
#pragma unroll
    for (int e = 0; e < W; ++e) shift[e] = s1[e] = s2[e] = 0.0f;
    if (colok) {
      U::load(xs + m.p0 * d.C + cu * W, shift);
      for (int64_t p = m.p0 + m.ty; p < m.p1; p += m.TY) {
        float f[W];
        U::load(xs + p * d.C + cu * W, f);
#pragma unroll
        for (int e = 0; e < W; ++e) {
          const float dv = f[e] - shift[e];
          s1[e] += dv;
          s2[e] += dv * dv;
        }
      }
    }
    if (m.TY == 1) {
      if (colok) {
#pragma unroll
        for (int e = 0; e < W; ++e) chstat[cu * W + e] = shifted_moments(shift[e], s1[e], s2[e], np);
      }
    } else {
      // The shift of channel c is its value at the slice's first pixel.
      sum_over_rows<W>(m, chunk, s1, s2, red, [&](int64_t c, float t1, float t2) {
        chstat[c] = shifted_moments(load_scalar(xs + m.p0 * d.C + c), t1, t2, np);
      });
    }
  }
  __syncthreads();
  for_each_group_by_warp(d, [&](int g, int64_t gidx) {
    const float2 gm = combine_equal_count(chstat + static_cast<int64_t>(g) * d.Cg, d.Cg, np);
    if ((threadIdx.x & 31) == 0) part[gidx * m.K + m.k] = gm;
  });
}

// Split forward, pass 2: merge each group's K slices, normalise + affine + SiLU pixels [p0, p1).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_fwd_apply_nhwc(const T* __restrict__ x, T* __restrict__ y, const float2* __restrict__ part, ParamRef weight,
                      ParamRef bias, float* __restrict__ mean_out, float* __restrict__ rstd_out, GnDims d,
                      float eps) {
  using U = Unit<T, VEC>;
  constexpr int W = U::W;
  SmemCarver carve{dynamic_smem()};
  float2* gstat = carve.take<float2>(d.G);
  const ChannelTables ct = channel_tables(carve, weight, bias, d);

  for_each_group_by_warp(d, [&](int g, int64_t gidx) {
    const Moments mo = merge_slices(part, gidx, gridDim.y, d.S, static_cast<float>(d.Cg));
    if ((threadIdx.x & 31) == 0) {
      publish_group_stats(mo.mean, mo.m2, d, eps, blockIdx.y == 0, gidx, gstat + g, mean_out, rstd_out);
    }
  });
  __syncthreads();

  const NhwcMap m = nhwc_map<W>(d);
  for_each_own_column(m, [&](int64_t cu) {
    for (int64_t p = m.p0 + m.ty; p < m.p1; p += m.TY) {
      const int64_t off = m.base + p * d.C + cu * W;
      float f[W];
      U::load(x + off, f);
#pragma unroll
      for (int e = 0; e < W; ++e) {
        const int64_t c = cu * W + e;
        const float2 gs = gstat[ct.gid[c]];
        const float2 p_wb = ct.wb[c];
        f[e] = silu_f((f[e] - gs.x) * (gs.y * p_wb.x) + p_wb.y);
      }
      U::store(y + off, f);
    }
  });
}

// Split backward, pass 1: per-(sample, slice, channel) sums chan[(n * K + k) * C + c] = (sum dz,
// sum dz * xhat), and per-(sample, group, slice) sums grp[(n * G + g) * K + k] = sum_c w_c * chan.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_bwd_sums_nhwc(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean_in,
                     const float* __restrict__ rstd_in, ParamRef weight, ParamRef bias, float2* __restrict__ chan,
                     float2* __restrict__ grp, GnDims d) {
  using U = Unit<T, VEC>;
  constexpr int W = U::W;
  const NhwcMap m = nhwc_map<W>(d);
  SmemCarver carve{dynamic_smem()};
  float2* gstat = carve.take<float2>(d.G);
  const ChannelTables ct = channel_tables(carve, weight, bias, d);
  float2* chsum = carve.take<float2>(d.C);
  float2* red = carve.take<float2>(nhwc_red_count<W>(m));

  for (int g = threadIdx.x; g < d.G; g += kGnThreads) {
    gstat[g] = make_float2(mean_in[m.n * d.G + g], rstd_in[m.n * d.G + g]);
  }
  __syncthreads();

  float2* chan_out = chan + (m.n * m.K + m.k) * d.C;
  for (int chunk = 0; chunk < m.chunks; ++chunk) {
    const int64_t cu = static_cast<int64_t>(chunk) * m.TX + m.tx;
    const bool colok = m.active && cu < m.units;
    float a1[W], a2[W];
#pragma unroll
    for (int e = 0; e < W; ++e) a1[e] = a2[e] = 0.0f;
    if (colok) {
      grad_column<T, VEC>(x, dy, m, d, cu, gstat, ct,
                          [&](int64_t, const float2(&)[W], const float2(&)[W], const float(&xhat)[W], const float(&dz)[W]) {
#pragma unroll
                            for (int e = 0; e < W; ++e) {
                              a1[e] += dz[e];
                              a2[e] += dz[e] * xhat[e];
                            }
                          });
    }
    auto emit = [&](int64_t c, float t1, float t2) {
      chsum[c] = make_float2(t1, t2);
      chan_out[c] = make_float2(t1, t2);
    };
    if (m.TY == 1) {
      if (colok) {
#pragma unroll
        for (int e = 0; e < W; ++e) emit(cu * W + e, a1[e], a2[e]);
      }
    } else {
      sum_over_rows<W>(m, chunk, a1, a2, red, emit);
    }
  }
  __syncthreads();
  for_each_group_by_warp(d, [&](int g, int64_t gidx) {
    const int64_t c0 = static_cast<int64_t>(g) * d.Cg;
    const float2 s = warp_sum_pairs(d.Cg, [&](int64_t j) {
      const int64_t c = c0 + j;
      return make_float2(ct.wb[c].x * chsum[c].x, ct.wb[c].x * chsum[c].y);
    });
    if ((threadIdx.x & 31) == 0) grp[gidx * m.K + m.k] = s;
  });
}

// Split backward, pass 2: dx of pixels [p0, p1).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_bwd_dx_nhwc(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean_in,
                   const float* __restrict__ rstd_in, ParamRef weight, ParamRef bias, const float2* __restrict__ grp,
                   T* __restrict__ dx, GnDims d) {
  using U = Unit<T, VEC>;
  constexpr int W = U::W;
  SmemCarver carve{dynamic_smem()};
  float4* gstat = carve.take<float4>(d.G);
  const ChannelTables ct = channel_tables(carve, weight, bias, d);

  const int K = gridDim.y;
  const float group_size = static_cast<float>(d.Cg) * static_cast<float>(d.S);
  for_each_group_by_warp(d, [&](int g, int64_t gidx) {
    const float2 s = warp_sum_pairs(K, [&](int64_t j) { return grp[gidx * K + j]; });
    if ((threadIdx.x & 31) == 0) {
      gstat[g] = make_float4(mean_in[gidx], rstd_in[gidx], s.x / group_size, s.y / group_size);
    }
  });
  __syncthreads();

  const NhwcMap m = nhwc_map<W>(d);
  for_each_own_column(m, [&](int64_t cu) {
    grad_column<T, VEC>(x, dy, m, d, cu, gstat, ct,
                        [&](int64_t off, const float4(&gs)[W], const float2(&cwb)[W], const float(&xhat)[W],
                            const float(&dz)[W]) {
                          float r[W];
#pragma unroll
                          for (int e = 0; e < W; ++e) {
                            const float dxhat = dz[e] * cwb[e].x;
                            r[e] = gs[e].y * (dxhat - gs[e].z - xhat[e] * gs[e].w);
                          }
                          U::store(dx + off, r);
                        });
  });
}

}  // namespace
}  // namespace diffkern
