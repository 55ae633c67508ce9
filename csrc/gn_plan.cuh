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
  size_t smem[2];  // dynamic shared memory of the pass's first and second kernel
};

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

void check_smem(size_t bytes, const GnDims& d, const DeviceProps& props, const char* what) {
  STD_TORCH_CHECK(bytes <= static_cast<size_t>(props.max_smem_optin), "diffkern: group_norm_silu ", what,
                  " needs ", bytes, " bytes of shared memory for C=", d.C, " but the device allows ",
                  props.max_smem_optin);
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
    p.team = team_width(p.vec ? d.S / V : d.S);
    // The group (x; and dy in the backward), its per-row statistics and one group-wide pair.
    const size_t group_bytes = round16(static_cast<size_t>(d.Cg * d.S) * elem_bytes);
    const size_t fused_bytes = (backward ? 2 : 1) * group_bytes + round16(d.Cg * sizeof(float2)) + 16;
    const bool fits = fused_bytes <= static_cast<size_t>(props.max_smem_optin);
    p.fused = fits && (split == -1 || (split == 0 && NG >= props.sm_count));
    if (p.fused) {
      p.smem[0] = fused_bytes;
      return p;
    }
    p.slices = choose_slices(split, NG, d.Cg, props.sm_count);
    // Forward statistics: one pair per row of the slice. Forward apply and both backward kernels: none.
    if (!backward) p.smem[0] = round16(static_cast<size_t>((d.Cg + p.slices - 1) / p.slices) * sizeof(float2));
    return p;
  }

  p.vec = aligned && d.C % V == 0;
  const int W = p.vec ? V : 1;
  p.slices = choose_slices(split, d.N, d.S, props.sm_count);
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
