// The GroupNorm + SiLU planner (host only): how one forward or backward call runs (regime, slices, vector
// accesses, team width, shared memory per kernel), decided from the problem's dimensions and layout, the
// element size, the pointers' alignment, the device's properties and the ops' `split` argument. A plain
// function of those values: it reads no tensor, launches nothing, and the launches take its GnPlan.
// Part of group_norm_silu.cu, included there only: like the rest of it, in an anonymous namespace.
//
// Regimes (G groups of Cg = C/G channels, M = Cg*S elements per group, P = the device's SM count):
//
//   NCHW, fused       (N*G >= P and the group fits in shared memory; x and dy kept on chip)
//       forward:  1 kernel, x read once, y written once.
//       backward: 1 kernel (x, dy read once, dx written once) + 1 tiny kernel reducing dweight/dbias.
//   NCHW, split       (few groups, or groups larger than shared memory): each group is split over K blocks,
//                     about ceil(16P / (N*G)) of them (kGnBlocksPerSm: two waves of 8 resident blocks per SM):
//                     slices of its Cg channels where that many are enough, else one channel per block and
//                     each channel's row cut into Ks chunks of at least kGnMinChunkUnits units (NchwSlices).
//       forward:  partial moments per slice -> merge + normalise + SiLU (x read twice; the second read
//                 mostly hits L2 for diffusion-sized tensors).
//       backward: per-channel sums -> dx (x, dy read twice) + the dweight/dbias reduction.
//   NHWC, split       a block covers all C channels of a slice of pixels of one sample, reading whole
//                     pixel rows across C (coalesced) and reducing per channel then per group; the pixels
//                     of each sample are split over K = ceil(12P / N) blocks (kGnNhwcBlocksPerSm: two waves at
//                     the up to 6 blocks per SM these kernels' registers allow), at most one per pixel row in flight
//                     (S / TY), and at most what keeps the partials (the forward's per-(sample, slice, group)
//                     moments, the backward's per-(sample, slice, channel) sums) within kGnNhwcPartialBytes
//                     (but never fewer than ceil(2P / N)).
//       forward:  per-(sample, slice, group) moments -> merge (one warp per group) -> normalise + SiLU.
//       backward: per-(sample, slice, channel) sums -> merge of the group sums -> dx + the dweight/dbias
//                 reduction.
//
// The ops' `split` argument picks the regime for tests and tuning: 0 = automatic, -1 = fused where the
// group fits in shared memory (NCHW), k >= 1 = split into k slices (clamped to what the shape allows).
#pragma once

#include <cstddef>
#include <cstdint>

#include "gn_common.cuh"
#include "platform.cuh"

namespace diffkern {
namespace {

enum class Layout { kNCHW, kNHWC };

enum class GnPass { kForward, kBackward };

// How one pass runs. The kernels of a pass, in launch order: NCHW fused, the fused kernel; NCHW split,
// statistics (sums) then apply (dx); NHWC, the same two; a backward then ends with the dweight/dbias
// reduction, which needs no plan.
struct GnPlan {
  Layout layout;
  bool fused;      // NCHW only: one block per group, the group kept in shared memory
  bool vec;        // 16-byte vector accesses (along S in NCHW, along C in NHWC)
  int team;        // NCHW: lanes per row team, L (unused in NHWC)
  int64_t slices;  // split: K, blocks per group (NCHW) or per sample (NHWC); 1 when fused
  NchwSlices sl;   // NCHW: how a group's K blocks cut it (K = Kr * Ks)
  size_t smem[2];  // dynamic shared memory of the pass's first and second kernel
};

int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// NCHW split: blocks the automatic plan aims for per SM (two waves of 8 resident 256-thread blocks), and the
// fewest units an automatic chunk of a row has (one per thread).
constexpr int64_t kGnBlocksPerSm = 16;
constexpr int64_t kGnMinChunkUnits = kGnThreads;

// NCHW: lanes per row team, L, for blocks of `rows` rows of `chunk_units` units each: the power of two >= the
// chunk's units up to a warp; wider (up to the block) while the block has more teams than rows and the chunk
// more units than the team lanes.
int team_width(int64_t chunk_units, int64_t rows) {
  int L = 1;
  while (L < 32 && L < chunk_units) L <<= 1;
  while (L < kGnThreads && L < chunk_units && kGnThreads / L > rows) L <<= 1;
  return L;
}

// NCHW split: K = Kr * Ks blocks per group of Cg rows of `units` units. `split` >= 1 asks for K = split (at most
// Cg * units); else K about ceil(kGnBlocksPerSm * P / NG), with chunks of at least kGnMinChunkUnits units
// (fewer blocks where the rows are short). K <= 65535, the grid's y dimension.
NchwSlices choose_nchw_slices(int64_t split, int64_t NG, int Cg, int64_t units, int sm_count) {
  const int64_t want = clamp64(split >= 1 ? split : (kGnBlocksPerSm * sm_count + NG - 1) / NG, 1, 65535);
  NchwSlices sl{};
  if (want <= Cg) {
    sl.Kr = static_cast<int>(want);
    sl.Ks = 1;
  } else {
    sl.Kr = Cg;  // Cg < want <= 65535
    const int64_t max_ks = split >= 1 ? units : units / kGnMinChunkUnits;
    sl.Ks = static_cast<int>(clamp64(clamp64((want + Cg - 1) / Cg, 1, max_ks), 1, 65535 / Cg));
  }
  sl.uq = units / sl.Ks;
  sl.ur = static_cast<int>(units % sl.Ks);
  return sl;
}

// Slices per group (NCHW: over the group's Cg channels) or per sample (NHWC: over its S pixels).
// `blocks` is the number of blocks without splitting; the grid's y dimension holds at most 65535 slices.
int64_t choose_slices(int64_t split, int64_t blocks, int64_t max_slices, int sm_count) {
  max_slices = clamp64(max_slices, 1, 65535);
  if (split >= 1) return clamp64(split, 1, max_slices);
  const int64_t want = (2 * static_cast<int64_t>(sm_count) + blocks - 1) / blocks;
  return clamp64(want, 1, max_slices);
}

void check_smem(size_t bytes, const GnDims& d, const DeviceProps& props, const char* what) {
  STD_TORCH_CHECK(bytes <= static_cast<size_t>(props.max_smem_optin), "diffkern: group_norm_silu ", what,
                  " needs ", bytes, " bytes of shared memory for C=", d.C, " but the device allows ",
                  props.max_smem_optin);
}

// NHWC split: blocks the automatic plan aims for per SM, and the cap on the per-slice partials (the plan keeps
// at least ceil(2P / N) slices where the cap allows fewer).
constexpr int64_t kGnNhwcBlocksPerSm = 12;
constexpr int64_t kGnNhwcPartialBytes = int64_t{4} << 20;

// NHWC split: pixel slices per sample (see the regimes above); `split` >= 1 asks for that many (at most S).
int64_t choose_nhwc_slices(int64_t split, const GnDims& d, int W, bool backward, int sm_count) {
  if (split >= 1) return choose_slices(split, d.N, d.S, sm_count);
  const int64_t units = d.C / W;
  const int64_t TX = units < kGnThreads ? units : kGnThreads;
  const int64_t TY = kGnThreads / TX;
  const int64_t P = sm_count;
  int64_t want = clamp64((kGnNhwcBlocksPerSm * P + d.N - 1) / d.N, 1, (d.S + TY - 1) / TY);
  // The partials per slice: the forward's group moments, the backward's channel sums (and group sums, G <= C).
  const int64_t per_slice = d.N * (backward ? d.C : d.G) * static_cast<int64_t>(sizeof(float2));
  const int64_t cap = kGnNhwcPartialBytes / per_slice;
  const int64_t floor_k = (2 * P + d.N - 1) / d.N;
  if (want > cap) want = cap > floor_k ? cap : (want < floor_k ? want : floor_k);
  return clamp64(want, 1, d.S < 65535 ? d.S : 65535);
}

// The NHWC kernels' TY-row reduction scratch (nhwc_red_count).
size_t nhwc_red_bytes(int64_t C, int W) {
  const int64_t units = C / W;
  const int64_t TX = units < kGnThreads ? units : kGnThreads;
  const int64_t TY = kGnThreads / TX;
  return TY > 1 ? round16(static_cast<size_t>(TY * TX * W) * sizeof(float2)) : 0;
}

// The NHWC kernels' per-channel tables (channel_tables).
size_t channel_tables_bytes(int64_t C) {
  return round16(static_cast<size_t>(C) * sizeof(float2)) + round16(static_cast<size_t>(C) * sizeof(int));
}

// The plan of one pass over elements of `elem_bytes` bytes; `aligned`: every tensor the pass reads or
// writes in x's layout starts on a 16-byte boundary. Fails (a Python RuntimeError) where the NHWC kernels
// need more shared memory than the device allows.
GnPlan plan_group_norm(const GnDims& d, Layout layout, GnPass pass, size_t elem_bytes, bool aligned,
                       const DeviceProps& props, int64_t split) {
  const int64_t NG = d.N * d.G;
  const int V = static_cast<int>(16 / elem_bytes);
  const bool backward = pass == GnPass::kBackward;
  GnPlan p{};
  p.layout = layout;
  p.slices = 1;

  if (layout == Layout::kNCHW) {
    p.vec = aligned && d.S % V == 0;
    const int64_t units = p.vec ? d.S / V : d.S;
    // The group (x; and dy in the backward), its per-row statistics and one group-wide pair; the kernels' static
    // team scratch (team_sum_pair) comes on top.
    const size_t group_bytes = round16(static_cast<size_t>(d.Cg * d.S) * elem_bytes);
    const size_t fused_bytes = (backward ? 2 : 1) * group_bytes + round16(d.Cg * sizeof(float2)) + 16;
    const size_t team_scratch = kGnWarps * sizeof(float2);
    const bool fits = fused_bytes + team_scratch <= static_cast<size_t>(props.max_smem_optin);
    p.fused = fits && (split == -1 || (split == 0 && NG >= props.sm_count));
    if (p.fused) {
      p.sl = NchwSlices{1, 1, units, 0};
      p.team = team_width(units, d.Cg);
      p.smem[0] = fused_bytes;
      return p;
    }
    p.sl = choose_nchw_slices(split, NG, d.Cg, units, props.sm_count);
    p.slices = static_cast<int64_t>(p.sl.Kr) * p.sl.Ks;
    const int64_t rows = (d.Cg + p.sl.Kr - 1) / p.sl.Kr;
    p.team = team_width(p.sl.uq + (p.sl.ur > 0 ? 1 : 0), rows);
    // Forward statistics: one pair per row of the slice. Forward apply and both backward kernels: none.
    if (!backward) p.smem[0] = round16(static_cast<size_t>(rows) * sizeof(float2));
    return p;
  }

  p.vec = aligned && d.C % V == 0;
  const int W = p.vec ? V : 1;
  p.slices = choose_nhwc_slices(split, d, W, backward, props.sm_count);
  const size_t channel_pairs = round16(static_cast<size_t>(d.C) * sizeof(float2));
  if (!backward) {
    p.smem[0] = channel_pairs + nhwc_red_bytes(d.C, W);
    p.smem[1] = round16(static_cast<size_t>(d.G) * sizeof(float2)) + channel_tables_bytes(d.C);
  } else {
    p.smem[0] = round16(static_cast<size_t>(d.G) * sizeof(float2)) + channel_tables_bytes(d.C) + channel_pairs +
                nhwc_red_bytes(d.C, W);
    p.smem[1] = round16(static_cast<size_t>(d.G) * sizeof(float4)) + channel_tables_bytes(d.C);
  }
  const char* what = backward ? "backward" : "forward";
  check_smem(p.smem[0], d, props, what);
  check_smem(p.smem[1], d, props, what);
  return p;
}

}  // namespace
}  // namespace diffkern
