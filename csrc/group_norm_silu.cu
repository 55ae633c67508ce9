// GroupNorm followed by SiLU, forward and backward (math in diffkern/ops/group_norm_silu.py).
//
// x is a 3-D (N, C, S) tensor, either C-contiguous (NCHW: strides (C*S, S, 1)) or channels-last (NHWC:
// strides (C*S, 1, C)); outputs take x's strides, statistics are float32 [N, G]. Both layouts are read
// natively with 16-byte vectors (along S in NCHW, along C in NHWC) where sizes and pointers allow, else with
// coalesced scalar accesses. All statistics and arithmetic are fp32.
//
// Statistics are one-pass and robust when |mean| >> std: every thread accumulates sums of (x - K) and
// (x - K)^2 with K a value of the same channel (the first element of the channel's row or slice), so the
// per-channel moments never cancel catastrophically; channels are then combined exactly (equal counts)
// and slices with Chan et al.'s merge. All reductions run in a fixed order: results are bitwise
// reproducible, and there are no atomics.
//
// Regimes (G groups of Cg = C/G channels, M = Cg*S elements per group, P = the device's SM count):
//
//   NCHW, fused       (N*G >= P and the group fits in shared memory; x and dy kept on chip)
//       forward:  1 kernel, x read once, y written once.
//       backward: 1 kernel (x, dy read once, dx written once) + 1 tiny kernel reducing dweight/dbias.
//   NCHW, split       (few groups, or groups larger than shared memory): each group's channels are split
//                     over K = min(Cg, ceil(2P / (N*G))) blocks.
//       forward:  partial moments per slice -> merge + normalise + SiLU (x read twice; the second read
//                 mostly hits L2 for diffusion-sized tensors).
//       backward: per-channel sums -> dx (x, dy read twice) + the dweight/dbias reduction.
//   NHWC, split       a block covers all C channels of a slice of pixels of one sample, reading whole
//                     pixel rows across C (coalesced) and reducing per channel then per group; the pixels
//                     of each sample are split over K = min(S, ceil(2P / N)) blocks.
//       forward:  per-(sample, slice, group) moments -> merge + normalise + SiLU.
//       backward: per-(sample, slice, channel) sums -> dx + the dweight/dbias reduction.
//
// dweight/dbias come from per-(sample[, slice], channel) partial sums in scratch memory, reduced in a
// fixed order by a final kernel (no float atomics: deterministic). Scratch buffers are fully written
// before they are read, so nothing is zero-filled.
//
// The ops' `split` argument picks the regime for tests and tuning: 0 = automatic, -1 = fused where the
// group fits in shared memory (NCHW), k >= 1 = split into k slices (clamped to what the shape allows).
#include "common.cuh"

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

  static __device__ __forceinline__ void store(T* p, const float (&f)[W]) {
    if constexpr (VEC) {
      store_vec<T>(p, f);
    } else {
      store_scalar(p, f[0]);
    }
  }
};

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

// ------------------------------------------------------------------------------------------------------
// NCHW: a channel (n, c) is a contiguous row of S elements. Rows are processed by teams of L lanes
// (L = the power of two >= the row's unit count, at most 32), so short rows still keep warps busy; loops
// over rows are uniform across the block so teams can reduce with shuffles.
// ------------------------------------------------------------------------------------------------------

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

__device__ __forceinline__ NchwBlock nchw_block(const GnDims& d, int L) {
  NchwBlock b;
  b.ng = blockIdx.x;
  b.n = b.ng / d.G;
  b.k = blockIdx.y;
  b.K = gridDim.y;
  b.c0 = static_cast<int64_t>(b.ng % d.G) * d.Cg;
  b.goff = (b.n * d.C + b.c0) * d.S;
  b.r0 = static_cast<int>(slice_begin(d.Cg, b.k, b.K));
  b.r1 = static_cast<int>(slice_begin(d.Cg, b.k + 1, b.K));
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
  const NchwBlock b = nchw_block(d, L);
  if (threadIdx.x < 32) {
    const Moments m = merge_slices(part, b.ng, b.K, d.Cg, static_cast<float>(d.S));
    if (threadIdx.x == 0) publish_group_stats(m.mean, m.m2, d, eps, b.k == 0, b.ng, &stat, mean_out, rstd_out);
  }
  __syncthreads();
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
  const NchwBlock b = nchw_block(d, L);
  if (threadIdx.x < 32) {
    const float2 gm = group_grad_means(chan + b.n * d.C + b.c0, b.c0, d.Cg, weight,
                                       static_cast<float>(d.Cg) * static_cast<float>(d.S));
    if (threadIdx.x == 0) gmeans = gm;
  }
  __syncthreads();
  rows_dx<T, VEC>(x + b.goff, dy + b.goff, dx + b.goff, b, d, L, mean_in[b.ng], rstd_in[b.ng], weight, bias, gmeans);
}

// ------------------------------------------------------------------------------------------------------
// NHWC: pixel p of sample n is a contiguous row of C channels. A block covers pixels [p0, p1) of one
// sample across all channels: TX threads span the row's units (16-byte vectors of channels, or single
// channels), TY = 256 / TX rows are in flight at once, and rows wider than 256 units take several column
// chunks. Each thread keeps fixed channels, so per-channel sums stay in registers.
// ------------------------------------------------------------------------------------------------------

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

// dweight[c] = sum_r chan[r * C + c].y, dbias[c] = sum_r chan[r * C + c].x over the R partial rows, in
// order (deterministic).
__global__ void __launch_bounds__(kGnThreads)
    gn_bwd_params(const float2* __restrict__ chan, int64_t R, int64_t C, float* __restrict__ dweight,
                  float* __restrict__ dbias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kGnThreads + threadIdx.x;
  if (c >= C) return;
  float sw = 0.0f, sb = 0.0f;
  for (int64_t r = 0; r < R; ++r) {
    const float2 v = chan[r * C + c];
    sb += v.x;
    sw += v.y;
  }
  if (dweight != nullptr) dweight[c] = sw;
  if (dbias != nullptr) dbias[c] = sb;
}

// ------------------------------------------------------------------------------------------------------
// Host side.
// ------------------------------------------------------------------------------------------------------

enum class Layout { kNCHW, kNHWC };

struct GnSetup {
  GnDims d;
  Layout layout;
  int32_t device;
  DeviceProps props;
};

GnSetup gn_setup(const Tensor& x, int64_t num_groups) {
  check_cuda_tensor(x, "x");
  check_sample_dtype(x, "x");
  STD_TORCH_CHECK(x.dim() == 3, "diffkern: group_norm_silu expects x as a 3-D (N, C, S) tensor, got ", x.dim(),
                  " dimensions");
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  STD_TORCH_CHECK(N > 0 && C > 0 && S > 0, "diffkern: group_norm_silu: x must not be empty");
  STD_TORCH_CHECK(num_groups >= 1 && C % num_groups == 0, "diffkern: num_groups=", num_groups,
                  " must divide the number of channels C=", C);
  STD_TORCH_CHECK(C <= (int64_t{1} << 30) && num_groups <= (int64_t{1} << 30),
                  "diffkern: group_norm_silu: too many channels");
  const bool batch_ok = N == 1 || x.stride(0) == C * S;
  const bool nchw = batch_ok && (S == 1 || x.stride(2) == 1) && (C == 1 || x.stride(1) == S);
  const bool nhwc = batch_ok && (C == 1 || x.stride(1) == 1) && (S == 1 || x.stride(2) == C);
  STD_TORCH_CHECK(nchw || nhwc,
                  "diffkern: group_norm_silu expects x C-contiguous (strides (C*S, S, 1)) or channels-last "
                  "(strides (C*S, 1, C))");
  GnSetup s;
  s.d = GnDims{N, C, S, static_cast<int>(num_groups), static_cast<int>(C / num_groups)};
  s.layout = nchw ? Layout::kNCHW : Layout::kNHWC;
  s.device = x.get_device_index();
  s.props = device_props(s.device);
  return s;
}

ParamRef param_ref(const std::optional<Tensor>& p, const char* name, const Tensor& x, int64_t C) {
  if (!p.has_value()) return ParamRef{nullptr, 0};
  check_same_device(*p, name, x, "x");
  STD_TORCH_CHECK(p->dim() == 1 && p->size(0) == C && (C == 1 || p->stride(0) == 1), "diffkern: ", name,
                  " must be a contiguous [C] tensor with C=", C);
  int kind = 0;
  switch (p->scalar_type()) {
    case ScalarType::Float: kind = 1; break;
    case ScalarType::Half: kind = 2; break;
    case ScalarType::BFloat16: kind = 3; break;
    case ScalarType::Double: kind = 4; break;
    default: STD_TORCH_CHECK(false, "diffkern: ", name, " must be a floating-point tensor");
  }
  return ParamRef{p->const_data_ptr(), kind};
}

int team_width(int64_t units) {
  int L = 1;
  while (L < 32 && L < units) L <<= 1;
  return L;
}

int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Slices per group (NCHW: over the group's Cg channels) or per sample (NHWC: over its S pixels).
// `blocks` is the number of blocks without splitting; the grid's y dimension holds at most 65535 slices.
int64_t choose_slices(int64_t split, int64_t blocks, int64_t max_slices, int sm_count) {
  max_slices = clamp64(max_slices, 1, 65535);
  if (split >= 1) return clamp64(split, 1, max_slices);
  const int64_t want = (2 * static_cast<int64_t>(sm_count) + blocks - 1) / blocks;
  return clamp64(want, 1, max_slices);
}

void check_smem(size_t bytes, const GnSetup& s, const char* what) {
  STD_TORCH_CHECK(bytes <= static_cast<size_t>(s.props.max_smem_optin), "diffkern: group_norm_silu ", what,
                  " needs ", bytes, " bytes of shared memory for C=", s.d.C, " but the device allows ",
                  s.props.max_smem_optin);
}

size_t nhwc_red_bytes(int64_t C, int W) {
  const int64_t units = C / W;
  const int64_t TX = units < kGnThreads ? units : kGnThreads;
  const int64_t TY = kGnThreads / TX;
  return TY > 1 ? round16(static_cast<size_t>(TY * TX * W) * sizeof(float2)) : 0;
}

template <typename T>
void gn_forward(const Tensor& x, const Tensor& y, ParamRef w, ParamRef b, const Tensor& mean, const Tensor& rstd,
                const GnSetup& s, float eps, int64_t split, cudaStream_t stream) {
  const GnDims& d = s.d;
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  T* yp = static_cast<T*>(y.mutable_data_ptr());
  float* mp = static_cast<float*>(mean.mutable_data_ptr());
  float* rp = static_cast<float*>(rstd.mutable_data_ptr());
  const int64_t NG = d.N * d.G;
  constexpr int V = kVec<T>;
  const bool aligned = aligned16(xp) && aligned16(yp);

  if (s.layout == Layout::kNCHW) {
    const bool vec = aligned && d.S % V == 0;
    const int L = team_width(vec ? d.S / V : d.S);
    const size_t fused_bytes =
        round16(static_cast<size_t>(d.Cg * d.S) * sizeof(T)) + round16(d.Cg * sizeof(float2)) + 16;
    const bool fits = fused_bytes <= static_cast<size_t>(s.props.max_smem_optin);
    const bool fused = fits && (split == -1 || (split == 0 && NG >= s.props.sm_count));
    if (fused) {
      auto kernel = vec ? gn_fwd_fused_nchw<T, true> : gn_fwd_fused_nchw<T, false>;
      launch("group_norm_silu forward (fused)", kernel, dim3(static_cast<unsigned>(NG)), dim3(kGnThreads), fused_bytes,
             stream, xp, yp, w, b, mp, rp, d, L, eps);
      return;
    }
    const int64_t K = choose_slices(split, NG, d.Cg, s.props.sm_count);
    Tensor part = empty_float(x, {NG * K, 2});
    float2* pp = static_cast<float2*>(part.mutable_data_ptr());
    const size_t stats_bytes = round16(static_cast<size_t>((d.Cg + K - 1) / K) * sizeof(float2));
    const dim3 grid(static_cast<unsigned>(NG), static_cast<unsigned>(K));
    launch("group_norm_silu forward (statistics)", vec ? gn_fwd_stats_nchw<T, true> : gn_fwd_stats_nchw<T, false>,
           grid, dim3(kGnThreads), stats_bytes, stream, xp, pp, d, L);
    launch("group_norm_silu forward (apply)", vec ? gn_fwd_apply_nchw<T, true> : gn_fwd_apply_nchw<T, false>, grid,
           dim3(kGnThreads), 0, stream, xp, yp, static_cast<const float2*>(pp), w, b, mp, rp, d, L, eps);
    return;
  }

  const bool vec = aligned && d.C % V == 0;
  const int W = vec ? V : 1;
  const int64_t K = choose_slices(split, d.N, d.S, s.props.sm_count);
  Tensor part = empty_float(x, {NG * K, 2});
  float2* pp = static_cast<float2*>(part.mutable_data_ptr());
  const size_t stats_bytes = round16(static_cast<size_t>(d.C) * sizeof(float2)) + nhwc_red_bytes(d.C, W);
  const size_t apply_bytes = round16(static_cast<size_t>(d.G) * sizeof(float2)) +
                             round16(static_cast<size_t>(d.C) * sizeof(float2)) +
                             round16(static_cast<size_t>(d.C) * sizeof(int));
  check_smem(stats_bytes, s, "forward");
  check_smem(apply_bytes, s, "forward");
  const dim3 grid(static_cast<unsigned>(d.N), static_cast<unsigned>(K));
  launch("group_norm_silu forward (channels-last statistics)",
         vec ? gn_fwd_stats_nhwc<T, true> : gn_fwd_stats_nhwc<T, false>, grid, dim3(kGnThreads), stats_bytes, stream,
         xp, pp, d);
  launch("group_norm_silu forward (channels-last apply)", vec ? gn_fwd_apply_nhwc<T, true> : gn_fwd_apply_nhwc<T, false>,
         grid, dim3(kGnThreads), apply_bytes, stream, xp, yp, static_cast<const float2*>(pp), w, b, mp, rp, d, eps);
}

template <typename T>
void gn_backward(const Tensor& dy, const Tensor& x, ParamRef w, ParamRef b, const Tensor& mean, const Tensor& rstd,
                 const Tensor& dx, float* dweight, float* dbias, const GnSetup& s, int64_t split, cudaStream_t stream) {
  const GnDims& d = s.d;
  const T* dyp = static_cast<const T*>(dy.const_data_ptr());
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  T* dxp = static_cast<T*>(dx.mutable_data_ptr());
  const float* mp = static_cast<const float*>(mean.const_data_ptr());
  const float* rp = static_cast<const float*>(rstd.const_data_ptr());
  const int64_t NG = d.N * d.G;
  constexpr int V = kVec<T>;
  const bool aligned = aligned16(xp) && aligned16(dyp) && aligned16(dxp);
  int64_t partial_rows = d.N;
  Tensor chan;

  if (s.layout == Layout::kNCHW) {
    const bool vec = aligned && d.S % V == 0;
    const int L = team_width(vec ? d.S / V : d.S);
    chan = empty_float(x, {d.N * d.C, 2});
    float2* cp = static_cast<float2*>(chan.mutable_data_ptr());
    const size_t group_bytes = round16(static_cast<size_t>(d.Cg * d.S) * sizeof(T));
    const size_t fused_bytes = 2 * group_bytes + round16(d.Cg * sizeof(float2)) + 16;
    const bool fits = fused_bytes <= static_cast<size_t>(s.props.max_smem_optin);
    const bool fused = fits && (split == -1 || (split == 0 && NG >= s.props.sm_count));
    if (fused) {
      launch("group_norm_silu backward (fused)", vec ? gn_bwd_fused_nchw<T, true> : gn_bwd_fused_nchw<T, false>,
             dim3(static_cast<unsigned>(NG)), dim3(kGnThreads), fused_bytes, stream, dyp, xp, mp, rp, w, b, dxp, cp, d,
             L);
    } else {
      const int64_t K = choose_slices(split, NG, d.Cg, s.props.sm_count);
      const dim3 grid(static_cast<unsigned>(NG), static_cast<unsigned>(K));
      launch("group_norm_silu backward (sums)", vec ? gn_bwd_sums_nchw<T, true> : gn_bwd_sums_nchw<T, false>, grid,
             dim3(kGnThreads), 0, stream, dyp, xp, mp, rp, w, b, cp, d, L);
      launch("group_norm_silu backward (dx)", vec ? gn_bwd_dx_nchw<T, true> : gn_bwd_dx_nchw<T, false>, grid,
             dim3(kGnThreads), 0, stream, dyp, xp, mp, rp, w, b, static_cast<const float2*>(cp), dxp, d, L);
    }
  } else {
    const bool vec = aligned && d.C % V == 0;
    const int W = vec ? V : 1;
    const int64_t K = choose_slices(split, d.N, d.S, s.props.sm_count);
    partial_rows = d.N * K;
    chan = empty_float(x, {d.N * K * d.C, 2});
    Tensor grp = empty_float(x, {NG * K, 2});
    float2* cp = static_cast<float2*>(chan.mutable_data_ptr());
    float2* gp = static_cast<float2*>(grp.mutable_data_ptr());
    const size_t tables = round16(static_cast<size_t>(d.C) * sizeof(float2)) +
                          round16(static_cast<size_t>(d.C) * sizeof(int));
    const size_t sums_bytes = round16(static_cast<size_t>(d.G) * sizeof(float2)) + tables +
                              round16(static_cast<size_t>(d.C) * sizeof(float2)) + nhwc_red_bytes(d.C, W);
    const size_t dx_bytes = round16(static_cast<size_t>(d.G) * sizeof(float4)) + tables;
    check_smem(sums_bytes, s, "backward");
    check_smem(dx_bytes, s, "backward");
    const dim3 grid(static_cast<unsigned>(d.N), static_cast<unsigned>(K));
    launch("group_norm_silu backward (channels-last sums)", vec ? gn_bwd_sums_nhwc<T, true> : gn_bwd_sums_nhwc<T, false>,
           grid, dim3(kGnThreads), sums_bytes, stream, dyp, xp, mp, rp, w, b, cp, gp, d);
    launch("group_norm_silu backward (channels-last dx)", vec ? gn_bwd_dx_nhwc<T, true> : gn_bwd_dx_nhwc<T, false>,
           grid, dim3(kGnThreads), dx_bytes, stream, dyp, xp, mp, rp, w, b, static_cast<const float2*>(gp), dxp, d);
  }
  if (dweight != nullptr || dbias != nullptr) {
    const unsigned blocks = static_cast<unsigned>((d.C + kGnThreads - 1) / kGnThreads);
    launch("group_norm_silu backward (dweight, dbias)", gn_bwd_params, dim3(blocks), dim3(kGnThreads), 0, stream,
           static_cast<const float2*>(chan.const_data_ptr()), partial_rows, d.C, dweight, dbias);
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> group_norm_silu_fwd_cuda(const Tensor& x, const std::optional<Tensor>& weight,
                                                            const std::optional<Tensor>& bias, int64_t num_groups,
                                                            double eps, int64_t split) {
  const GnSetup s = gn_setup(x, num_groups);
  STD_TORCH_CHECK(s.d.N * s.d.G <= int64_t{0x7fffffff}, "diffkern: group_norm_silu: N * num_groups is too large");
  const ParamRef w = param_ref(weight, "weight", x, s.d.C);
  const ParamRef b = param_ref(bias, "bias", x, s.d.C);
  Tensor y = empty_strided_like(x, x.scalar_type());
  Tensor mean = empty_float(x, {s.d.N, s.d.G});
  Tensor rstd = empty_float(x, {s.d.N, s.d.G});
  const DeviceGuard guard(s.device);
  const cudaStream_t stream = current_stream(s.device);
  dispatch_float_types(x.scalar_type(), "group_norm_silu", [&](auto tag) {
    gn_forward<decltype(tag)>(x, y, w, b, mean, rstd, s, static_cast<float>(eps), split, stream);
  });
  return std::make_tuple(y, mean, rstd);
}

std::tuple<Tensor, Tensor, Tensor> group_norm_silu_bwd_cuda(const Tensor& grad_out, const Tensor& x,
                                                            const std::optional<Tensor>& weight,
                                                            const std::optional<Tensor>& bias, const Tensor& mean,
                                                            const Tensor& rstd, int64_t num_groups, int64_t split) {
  const GnSetup s = gn_setup(x, num_groups);
  STD_TORCH_CHECK(s.d.N * s.d.G <= int64_t{0x7fffffff}, "diffkern: group_norm_silu: N * num_groups is too large");
  check_same_device(grad_out, "grad_out", x, "x");
  check_dtype(grad_out, "grad_out", x.scalar_type());
  STD_TORCH_CHECK(same_sizes(grad_out, x) && same_strides(grad_out, x), "diffkern: grad_out must have x's shape and strides");
  for (const Tensor* t : {&mean, &rstd}) {
    check_same_device(*t, "mean/rstd", x, "x");
    check_dtype(*t, "mean/rstd", ScalarType::Float);
    STD_TORCH_CHECK(t->dim() == 2 && t->size(0) == s.d.N && t->size(1) == s.d.G && t->is_contiguous(),
                    "diffkern: mean and rstd must be contiguous float32 [N, num_groups]");
  }
  const ParamRef w = param_ref(weight, "weight", x, s.d.C);
  const ParamRef b = param_ref(bias, "bias", x, s.d.C);
  Tensor dx = empty_strided_like(x, x.scalar_type());
  Tensor dweight = empty_float(x, {weight.has_value() ? s.d.C : 0});
  Tensor dbias = empty_float(x, {bias.has_value() ? s.d.C : 0});
  const DeviceGuard guard(s.device);
  const cudaStream_t stream = current_stream(s.device);
  float* dwp = weight.has_value() ? static_cast<float*>(dweight.mutable_data_ptr()) : nullptr;
  float* dbp = bias.has_value() ? static_cast<float*>(dbias.mutable_data_ptr()) : nullptr;
  dispatch_float_types(x.scalar_type(), "group_norm_silu", [&](auto tag) {
    gn_backward<decltype(tag)>(grad_out, x, w, b, mean, rstd, dx, dwp, dbp, s, split, stream);
  });
  return std::make_tuple(dx, dweight, dbias);
}

}  // namespace diffkern

STABLE_TORCH_LIBRARY_IMPL(diffkern, DIFFKERN_DISPATCH_KEY, m) {
  m.impl("group_norm_silu_fwd_cuda", TORCH_BOX(&diffkern::group_norm_silu_fwd_cuda));
  m.impl("group_norm_silu_bwd_cuda", TORCH_BOX(&diffkern::group_norm_silu_bwd_cuda));
}
