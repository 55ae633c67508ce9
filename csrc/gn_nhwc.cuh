// The GroupNorm + SiLU kernels for channels-last (NHWC) inputs, split over slices of each sample's pixels,
// forward and backward: per-slice partials, a small kernel merging each group's K slices (one warp per group),
// then the pass that applies them.
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
// chunks. Each thread keeps fixed channels, so per-channel sums stay in registers, and walks its pixels with
// kGnInflight independent loads in flight (the backward's kGnInflight / 2 pixels of x and of dy).

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

// Slice k of K over a sample's S pixels starts at floor(S * k / K) = q * k + floor(rem * k / K) with S = q * K + rem
// (precomputed on the host: no 64-bit division on the device), rem * k < K * K <= 65535^2 < 2^32.
struct NhwcSlices {
  int64_t q;
  int rem;
};

__device__ __forceinline__ int64_t pixel_slice_begin(const NhwcSlices& sl, int k, int K) {
  return sl.q * k + static_cast<int64_t>(static_cast<unsigned>(sl.rem) * static_cast<unsigned>(k) /
                                         static_cast<unsigned>(K));
}

template <int W>
__device__ __forceinline__ NhwcMap nhwc_map(const GnDims& d, const NhwcSlices& sl) {
  NhwcMap m;
  m.n = blockIdx.x;
  m.k = blockIdx.y;
  m.K = gridDim.y;
  m.p0 = pixel_slice_begin(sl, m.k, m.K);
  m.p1 = pixel_slice_begin(sl, m.k + 1, m.K);
  m.base = m.n * d.S * d.C;
  m.units = d.C / W;
  // 32-bit divisions (C <= 2^30): a 64-bit one is a subroutine call.
  const unsigned units = static_cast<unsigned>(m.units);
  const unsigned TX = units < kGnThreads ? units : kGnThreads;
  m.TX = static_cast<int>(TX);
  m.TY = static_cast<int>(kGnThreads / TX);
  m.tx = static_cast<int>(threadIdx.x % TX);
  m.ty = static_cast<int>(threadIdx.x / TX);
  m.active = m.ty < m.TY;
  m.chunks = static_cast<int>((units + TX - 1) / TX);
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
  // 32-bit channel indices (C <= 2^30, checked by the entry points): a 64-bit division is a subroutine call,
  // across which ptxas kept loop state on the stack.
  const unsigned C = static_cast<unsigned>(d.C), Cg = static_cast<unsigned>(d.Cg);
  for (unsigned c = threadIdx.x; c < C; c += kGnThreads) {
    t.gid[c] = static_cast<int>(c / Cg);
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
  using P = RawPair<T, VEC>;
  const int64_t col = m.base + cu * W;
  unrolled_units<kPairUnroll<VEC>, P>(
      m.p0 + m.ty, m.p1, m.TY,
      [&](int64_t p) {
        const int64_t off = col + p * d.C;
        return P{U::load_raw(x + off), U::load_raw(dy + off)};
      },
      [&](int64_t p, const P& raw) {
        float fx[W], fdy[W];
        U::unpack(raw.x, fx);
        U::unpack(raw.dy, fdy);
        float xhat[W], dz[W];
#pragma unroll
        for (int e = 0; e < W; ++e) {
          xhat[e] = (fx[e] - gs[e].x) * gs[e].y;
          dz[e] = silu_grad_dz(fdy[e], xhat[e] * cwb[e].x + cwb[e].y);
        }
        visit(col + p * d.C, gs, cwb, xhat, dz);
      });
}

// Split forward, pass 1: per-(sample, slice, group) moments -> part[(n * G + g) * K + k].
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_fwd_stats_nhwc(const T* __restrict__ x, float2* __restrict__ part, GnDims d, NhwcSlices sl) {
  using U = Unit<T, VEC>;
  constexpr int W = U::W;
  const NhwcMap m = nhwc_map<W>(d, sl);
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
      const T* col = xs + cu * W;
      unrolled_units<kUnitUnroll<VEC>, typename U::Raw>(
          m.p0 + m.ty, m.p1, m.TY, [&](int64_t p) { return U::load_raw(col + p * d.C); },
          [&](int64_t, const typename U::Raw& raw) {
            float f[W];
            U::unpack(raw, f);
#pragma unroll
            for (int e = 0; e < W; ++e) {
              const float dv = f[e] - shift[e];
              s1[e] += dv;
              s2[e] += dv * dv;
            }
          });
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

// The group (sample, group) of this warp in the merge kernels (one warp per group, kGnWarps per block); false for
// the warps past the last group (whole warps: they return together).
__device__ __forceinline__ bool merge_warp_group(const GnDims& d, int64_t& gidx) {
  gidx = static_cast<int64_t>(blockIdx.x) * kGnWarps + threadIdx.x / 32;
  return gidx < d.N * d.G;
}

// Split forward, between the passes: merge each group's K slices -> mean_out, rstd_out.
__global__ void __launch_bounds__(kGnThreads)
    gn_fwd_merge_nhwc(const float2* __restrict__ part, int K, float* __restrict__ mean_out,
                      float* __restrict__ rstd_out, GnDims d, float eps) {
  int64_t gidx;
  if (!merge_warp_group(d, gidx)) return;
  const Moments mo = merge_slices(part, gidx, K, d.S, static_cast<float>(d.Cg));
  if ((threadIdx.x & 31) == 0) {
    float2 stat;
    publish_group_stats(mo.mean, mo.m2, d, eps, true, gidx, &stat, mean_out, rstd_out);
  }
}

// Split forward, pass 2: normalise + affine + SiLU pixels [p0, p1) with the merged statistics.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_fwd_apply_nhwc(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ mean_in,
                      const float* __restrict__ rstd_in, ParamRef weight, ParamRef bias, GnDims d,
                      NhwcSlices sl) {
  using U = Unit<T, VEC>;
  constexpr int W = U::W;
  SmemCarver carve{dynamic_smem()};
  float2* gstat = carve.take<float2>(d.G);
  const ChannelTables ct = channel_tables(carve, weight, bias, d);

  const int64_t g0 = static_cast<int64_t>(blockIdx.x) * d.G;
  for (int g = threadIdx.x; g < d.G; g += kGnThreads) gstat[g] = make_float2(mean_in[g0 + g], rstd_in[g0 + g]);
  __syncthreads();

  const NhwcMap m = nhwc_map<W>(d, sl);
  for_each_own_column(m, [&](int64_t cu) {
    const int64_t col = m.base + cu * W;
    unrolled_units<kUnitUnroll<VEC>, typename U::Raw>(
        m.p0 + m.ty, m.p1, m.TY, [&](int64_t p) { return U::load_raw(x + col + p * d.C); },
        [&](int64_t p, const typename U::Raw& raw) {
          float f[W];
          U::unpack(raw, f);
#pragma unroll
          for (int e = 0; e < W; ++e) {
            const int64_t c = cu * W + e;
            const float2 gs = gstat[ct.gid[c]];
            const float2 p_wb = ct.wb[c];
            f[e] = silu_f((f[e] - gs.x) * (gs.y * p_wb.x) + p_wb.y);
          }
          U::store(y + col + p * d.C, f);
        });
  });
}

// Split backward, pass 1: per-(sample, slice, channel) sums chan[(n * K + k) * C + c] = (sum dz,
// sum dz * xhat), and per-(sample, group, slice) sums grp[(n * G + g) * K + k] = sum_c w_c * chan.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_bwd_sums_nhwc(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean_in,
                     const float* __restrict__ rstd_in, ParamRef weight, ParamRef bias, float2* __restrict__ chan,
                     float2* __restrict__ grp, GnDims d, NhwcSlices sl) {
  using U = Unit<T, VEC>;
  constexpr int W = U::W;
  const NhwcMap m = nhwc_map<W>(d, sl);
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

// Split backward, between the passes: each group's K slice sums -> gmeans[n * G + g] = the group's
// mean(dxhat), mean(dxhat * xhat).
__global__ void __launch_bounds__(kGnThreads)
    gn_bwd_merge_nhwc(const float2* __restrict__ grp, int K, float2* __restrict__ gmeans, GnDims d) {
  int64_t gidx;
  if (!merge_warp_group(d, gidx)) return;
  const float group_size = static_cast<float>(d.Cg) * static_cast<float>(d.S);
  const float2 s = warp_sum_pairs(K, [&](int64_t j) { return grp[gidx * K + j]; });
  if ((threadIdx.x & 31) == 0) gmeans[gidx] = make_float2(s.x / group_size, s.y / group_size);
}

// Split backward, pass 2: dx of pixels [p0, p1), given the merged group means.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGnThreads)
    gn_bwd_dx_nhwc(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean_in,
                   const float* __restrict__ rstd_in, ParamRef weight, ParamRef bias,
                   const float2* __restrict__ gmeans, T* __restrict__ dx, GnDims d, NhwcSlices sl) {
  using U = Unit<T, VEC>;
  constexpr int W = U::W;
  SmemCarver carve{dynamic_smem()};
  float4* gstat = carve.take<float4>(d.G);
  const ChannelTables ct = channel_tables(carve, weight, bias, d);

  const int64_t g0 = static_cast<int64_t>(blockIdx.x) * d.G;
  for (int g = threadIdx.x; g < d.G; g += kGnThreads) {
    const float2 gm = gmeans[g0 + g];
    gstat[g] = make_float4(mean_in[g0 + g], rstd_in[g0 + g], gm.x, gm.y);
  }
  __syncthreads();

  const NhwcMap m = nhwc_map<W>(d, sl);
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
