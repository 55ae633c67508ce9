// Schemas of the diffkern extension's ops (torch stable ABI only).
//
// The ops live in the `diffkern` namespace next to the Python-defined custom ops (diffkern::add_noise,
// ...), under their own names (diffkern::add_noise_cuda, ...); diffkern/_cuda_ops.py wraps them with the
// backends' Python signatures and registers their fake (meta) kernels once the library is loaded.
//
// Codes used by the schemas:
//   prediction_type: 0 epsilon, 1 v_prediction, 2 sample
//   variance_type:   0 fixed_small, 1 fixed_small_log, 2 fixed_large, 3 fixed_large_log, 4 learned,
//                    5 learned_range
//   threshold_scale: the per-sample dynamic-thresholding scale s (float32 [B]); when given, x0 is clamped
//                    to [-s, s] and divided by s (and clip_sample is ignored, as in diffusers).
//   x0_only:         the first pass of dynamic thresholding: returns (x0 as float32 [B, n] before any
//                    clipping, an empty tensor) and ignores noise, clipping and threshold_scale.
//   split:           GroupNorm regime: 0 automatic, -1 fused (one block per group, NCHW, when the group fits
//                    in shared memory), k >= 1 split each group (NCHW) or sample (channels-last) into k
//                    slices. For tests and tuning; the Python wrappers pass 0.
//
// Each op's CUDA kernel is registered next to its definition (STABLE_TORCH_LIBRARY_IMPL at the end of
// add_noise.cu, ddim.cu, ddpm.cu and group_norm_silu.cu), so that its C++ signature is written only there.
// Their dispatch key is DIFFKERN_DISPATCH_KEY: CUDA, or CPU in the host emulation of tests/cuda_emulation
// (see common.cuh).
#include <torch/csrc/stable/library.h>

// A DEF library for the namespace: it coexists with the FRAGMENT libraries that torch.library.custom_op
// opens for the Python-defined diffkern ops, whichever is registered first (only a second DEF library of
// the namespace would be refused).
STABLE_TORCH_LIBRARY(diffkern, m) {
  m.def("add_noise_cuda(Tensor original_samples, Tensor noise, Tensor alphas_cumprod, Tensor timesteps) -> Tensor");
  m.def(
      "ddim_step_cuda(Tensor model_output, Tensor sample, Tensor? noise, Tensor alphas_cumprod, Tensor timestep, "
      "Tensor prev_timestep, float final_alpha_cumprod, float eta, int prediction_type, bool clip_sample, "
      "float clip_sample_range, Tensor? threshold_scale, bool use_clipped_model_output, float? guidance_scale, "
      "bool x0_only=False) -> (Tensor, Tensor)");
  m.def(
      "ddpm_step_cuda(Tensor model_output, Tensor sample, Tensor? noise, Tensor alphas_cumprod, Tensor timestep, "
      "Tensor prev_timestep, int variance_type, int prediction_type, bool clip_sample, float clip_sample_range, "
      "Tensor? threshold_scale, float? guidance_scale, bool x0_only=False) -> (Tensor, Tensor)");
  m.def(
      "group_norm_silu_fwd_cuda(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, int split=0) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_silu_bwd_cuda(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
      "int num_groups, int split=0) -> (Tensor, Tensor, Tensor)");
}
