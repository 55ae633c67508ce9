// GroupNorm followed by SiLU, forward and backward (math in diffkern/ops/group_norm_silu.py).
//
// x is an (N, C, *) tensor (S = the product of the spatial sizes), either C-contiguous (NCHW: the (N, C, S) view
// has strides (C*S, S, 1)) or channels-last (NHWC, channels_last or channels_last_3d: (C*S, 1, C)); outputs
// take x's shape and strides, statistics are float32 [N, G]. Both layouts are read
// natively with 16-byte vectors (along S in NCHW, along C in NHWC) where sizes and pointers allow, else with
// coalesced scalar accesses. All statistics and arithmetic are fp32.
//
// Statistics are one-pass and robust when |mean| >> std: every thread accumulates sums of (x - K) and
// (x - K)^2 with K a value of the same channel (the first element of the channel's row or slice), so the
// per-channel moments never cancel catastrophically; channels are then combined exactly (equal counts)
// and slices with Chan et al.'s merge. All reductions run in a fixed order: results are bitwise
// reproducible, and there are no atomics.
//
// dweight/dbias come from per-(sample[, slice], channel) partial sums in scratch memory, reduced in a
// fixed order by a final kernel (no float atomics: deterministic). Scratch buffers are fully written
// before they are read, so nothing is zero-filled.
//
// Files: gn_plan.cuh, the planner (regimes, slices, shared memory; the `split` argument); gn_nchw.cuh and
// gn_nhwc.cuh, the kernels of each layout; gn_common.cuh, what they share. This file checks the inputs,
// plans each pass and launches it.
#include <cstdint>
#include <optional>
#include <tuple>

#include "dtype_dispatch.cuh"
#include "gn_common.cuh"
#include "gn_nchw.cuh"
#include "gn_nhwc.cuh"
#include "gn_plan.cuh"
#include "platform.cuh"
#include "tensor_checks.cuh"
#include "vector_io.cuh"

namespace diffkern {
namespace {

struct GnSetup {
  GnDims d;
  Layout layout;
  int32_t device;
  DeviceProps props;
};

GnSetup gn_setup(const Tensor& x, int64_t num_groups) {
  check_cuda_tensor(x, "x");
  check_sample_dtype(x, "x");
  STD_TORCH_CHECK(x.dim() >= 2, "diffkern: group_norm_silu expects x as an (N, C, *) tensor, got ", x.dim(),
                  " dimensions");
  const int64_t N = x.size(0), C = x.size(1);
  int64_t S = 1;
  for (int64_t dim = 2; dim < x.dim(); ++dim) S *= x.size(dim);
  STD_TORCH_CHECK(N > 0 && C > 0 && S > 0, "diffkern: group_norm_silu: x must not be empty");
  STD_TORCH_CHECK(num_groups >= 1 && C % num_groups == 0, "diffkern: num_groups=", num_groups,
                  " must divide the number of channels C=", C);
  STD_TORCH_CHECK(C <= (int64_t{1} << 30) && num_groups <= (int64_t{1} << 30),
                  "diffkern: group_norm_silu: too many channels");
  // The spatial dimensions in row-major order with the innermost one `inner` elements apart (1 in NCHW, C in
  // NHWC); size-1 dimensions' strides never move an element.
  const auto spatial_dense = [&](int64_t inner) {
    int64_t expected = inner;
    for (int64_t dim = x.dim() - 1; dim >= 2; --dim) {
      if (x.size(dim) != 1 && x.stride(dim) != expected) return false;
      expected *= x.size(dim);
    }
    return true;
  };
  const bool batch_ok = N == 1 || x.stride(0) == C * S;
  const bool nchw = batch_ok && spatial_dense(1) && (C == 1 || x.stride(1) == S);
  const bool nhwc = batch_ok && spatial_dense(C) && (C == 1 || x.stride(1) == 1);
  STD_TORCH_CHECK(nchw || nhwc,
                  "diffkern: group_norm_silu expects x C-contiguous (NCHW) or channels-last (the (N, C, S) view's "
                  "strides (C*S, S, 1) or (C*S, 1, C))");
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

NhwcSlices nhwc_slices(const GnDims& d, int64_t K) { return NhwcSlices{d.S / K, static_cast<int>(d.S % K)}; }

// Blocks of the NHWC merge kernels: one warp per (sample, group).
unsigned merge_blocks(const GnDims& d) { return static_cast<unsigned>((d.N * d.G + kGnWarps - 1) / kGnWarps); }

template <typename T>
void gn_forward(const Tensor& x, const Tensor& y, ParamRef w, ParamRef b, const Tensor& mean, const Tensor& rstd,
                const GnDims& d, const GnPlan& p, float eps, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  T* yp = static_cast<T*>(y.mutable_data_ptr());
  float* mp = static_cast<float*>(mean.mutable_data_ptr());
  float* rp = static_cast<float*>(rstd.mutable_data_ptr());
  const int64_t NG = d.N * d.G;
  const int L = p.team;

  if (p.fused) {
    auto kernel = p.vec ? gn_fwd_fused_nchw<T, true> : gn_fwd_fused_nchw<T, false>;
    launch("group_norm_silu forward (fused)", kernel, dim3(static_cast<unsigned>(NG)), dim3(kGnThreads), p.smem[0],
           stream, xp, yp, w, b, mp, rp, d, p.sl, L, eps);
    return;
  }
  const int64_t K = p.slices;
  Tensor part = empty_float(x, {NG * K, 2});
  float2* pp = static_cast<float2*>(part.mutable_data_ptr());
  if (p.layout == Layout::kNCHW) {
    const dim3 grid(static_cast<unsigned>(NG), static_cast<unsigned>(K));
    launch("group_norm_silu forward (statistics)", p.vec ? gn_fwd_stats_nchw<T, true> : gn_fwd_stats_nchw<T, false>,
           grid, dim3(kGnThreads), p.smem[0], stream, xp, pp, d, p.sl, L);
    launch("group_norm_silu forward (apply)", p.vec ? gn_fwd_apply_nchw<T, true> : gn_fwd_apply_nchw<T, false>, grid,
           dim3(kGnThreads), p.smem[1], stream, xp, yp, static_cast<const float2*>(pp), w, b, mp, rp, d, p.sl, L, eps);
    return;
  }

  const dim3 grid(static_cast<unsigned>(d.N), static_cast<unsigned>(K));
  launch("group_norm_silu forward (channels-last statistics)",
         p.vec ? gn_fwd_stats_nhwc<T, true> : gn_fwd_stats_nhwc<T, false>, grid, dim3(kGnThreads), p.smem[0], stream,
         xp, pp, d, nhwc_slices(d, K));
  launch("group_norm_silu forward (channels-last merge)", gn_fwd_merge_nhwc, dim3(merge_blocks(d)),
         dim3(kGnThreads), 0, stream, static_cast<const float2*>(pp), static_cast<int>(K), mp, rp, d, eps);
  launch("group_norm_silu forward (channels-last apply)",
         p.vec ? gn_fwd_apply_nhwc<T, true> : gn_fwd_apply_nhwc<T, false>, grid, dim3(kGnThreads), p.smem[1], stream,
         xp, yp, static_cast<const float*>(mp), static_cast<const float*>(rp), w, b, d, nhwc_slices(d, K));
}

template <typename T>
void gn_backward(const Tensor& dy, const Tensor& x, ParamRef w, ParamRef b, const Tensor& mean, const Tensor& rstd,
                 const Tensor& dx, float* dweight, float* dbias, const GnDims& d, const GnPlan& p,
                 cudaStream_t stream) {
  const T* dyp = static_cast<const T*>(dy.const_data_ptr());
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  T* dxp = static_cast<T*>(dx.mutable_data_ptr());
  const float* mp = static_cast<const float*>(mean.const_data_ptr());
  const float* rp = static_cast<const float*>(rstd.const_data_ptr());
  const int64_t NG = d.N * d.G;
  const int64_t K = p.slices;
  const int L = p.team;
  int64_t partial_rows = d.N;
  Tensor chan;

  if (p.layout == Layout::kNCHW) {
    // Per-(sample, row chunk, channel) sums.
    partial_rows = d.N * p.sl.Ks;
    chan = empty_float(x, {partial_rows * d.C, 2});
    float2* cp = static_cast<float2*>(chan.mutable_data_ptr());
    if (p.fused) {
      launch("group_norm_silu backward (fused)", p.vec ? gn_bwd_fused_nchw<T, true> : gn_bwd_fused_nchw<T, false>,
             dim3(static_cast<unsigned>(NG)), dim3(kGnThreads), p.smem[0], stream, dyp, xp, mp, rp, w, b, dxp, cp, d,
             p.sl, L);
    } else {
      const dim3 grid(static_cast<unsigned>(NG), static_cast<unsigned>(K));
      launch("group_norm_silu backward (sums)", p.vec ? gn_bwd_sums_nchw<T, true> : gn_bwd_sums_nchw<T, false>, grid,
             dim3(kGnThreads), p.smem[0], stream, dyp, xp, mp, rp, w, b, cp, d, p.sl, L);
      launch("group_norm_silu backward (dx)", p.vec ? gn_bwd_dx_nchw<T, true> : gn_bwd_dx_nchw<T, false>, grid,
             dim3(kGnThreads), p.smem[1], stream, dyp, xp, mp, rp, w, b, static_cast<const float2*>(cp), dxp, d, p.sl,
             L);
    }
  } else {
    partial_rows = d.N * K;
    chan = empty_float(x, {d.N * K * d.C, 2});
    Tensor grp = empty_float(x, {NG * K, 2});
    Tensor gmeans = empty_float(x, {NG, 2});
    float2* cp = static_cast<float2*>(chan.mutable_data_ptr());
    float2* gp = static_cast<float2*>(grp.mutable_data_ptr());
    float2* gmp = static_cast<float2*>(gmeans.mutable_data_ptr());
    const dim3 grid(static_cast<unsigned>(d.N), static_cast<unsigned>(K));
    launch("group_norm_silu backward (channels-last sums)",
           p.vec ? gn_bwd_sums_nhwc<T, true> : gn_bwd_sums_nhwc<T, false>, grid, dim3(kGnThreads), p.smem[0], stream,
           dyp, xp, mp, rp, w, b, cp, gp, d, nhwc_slices(d, K));
    launch("group_norm_silu backward (channels-last merge)", gn_bwd_merge_nhwc, dim3(merge_blocks(d)),
           dim3(kGnThreads), 0, stream, static_cast<const float2*>(gp), static_cast<int>(K), gmp, d);
    launch("group_norm_silu backward (channels-last dx)", p.vec ? gn_bwd_dx_nhwc<T, true> : gn_bwd_dx_nhwc<T, false>,
           grid, dim3(kGnThreads), p.smem[1], stream, dyp, xp, mp, rp, w, b, static_cast<const float2*>(gmp), dxp, d,
           nhwc_slices(d, K));
  }
  if (dweight != nullptr || dbias != nullptr) {
    const unsigned blocks = static_cast<unsigned>((d.C + kGnParamChannels - 1) / kGnParamChannels);
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
    using T = decltype(tag);
    const bool aligned = aligned16(x.const_data_ptr()) && aligned16(y.const_data_ptr());
    const GnPlan plan = plan_group_norm(s.d, s.layout, GnPass::kForward, sizeof(T), aligned, s.props, split);
    gn_forward<T>(x, y, w, b, mean, rstd, s.d, plan, static_cast<float>(eps), stream);
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
    using T = decltype(tag);
    const bool aligned =
        aligned16(x.const_data_ptr()) && aligned16(grad_out.const_data_ptr()) && aligned16(dx.const_data_ptr());
    const GnPlan plan = plan_group_norm(s.d, s.layout, GnPass::kBackward, sizeof(T), aligned, s.props, split);
    gn_backward<T>(grad_out, x, w, b, mean, rstd, dx, dwp, dbp, s.d, plan, stream);
  });
  return std::make_tuple(dx, dweight, dbias);
}

}  // namespace diffkern

STABLE_TORCH_LIBRARY_IMPL(diffkern, DIFFKERN_DISPATCH_KEY, m) {
  m.impl("group_norm_silu_fwd_cuda", TORCH_BOX(&diffkern::group_norm_silu_fwd_cuda));
  m.impl("group_norm_silu_bwd_cuda", TORCH_BOX(&diffkern::group_norm_silu_bwd_cuda));
}
