"""Triton DDIM step: one fused kernel (two passes plus a selection with dynamic thresholding).

Per sample (a = abar_t, a' = abar_prev, both gathered in the kernel; see ``diffkern.ops.ddim`` for the math):

    model_out = uncond + s (cond - uncond)          (with guidance; else the model output)
    model_out = r (model_out q) + (1 - r) model_out (guidance_rescale r; q = std(cond) / std(model_out))
    x0, eps   = prediction(x, model_out, a)         then threshold or clip x0
    sigma     = eta sqrt((1 - a') / (1 - a) (1 - a / a'))
    eps       = (x - sqrt(a) x0) / sqrt(1 - a)      (use_clipped_model_output)
    x_prev    = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z

Passes over memory:

- default: one kernel reads the model output (both halves with guidance), x and z (eta > 0) once each and
  writes x_prev and x0 once each.
- guidance_rescale: the stats pass of ``diffkern.triton._guidance`` first (q per sample: one more read of the
  model output, two small launches), then the step as above, reading q.
- dynamic thresholding: pass 1 reads the model output (and x) and writes |x0| in fp32; ``kthvalue`` selects the
  per-sample quantile (one or two selections over that buffer); pass 2 is the fused step above, reading the
  per-sample scale and recomputing x0 instead of reading it back.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from diffkern.ops import _common as C
from diffkern.ops.ddim import ddim_step_reference
from diffkern.triton import _common as K


@triton.jit(do_not_specialize=["host_timestep", "host_prev_timestep"])
def _ddim_step_kernel(model_output_ptr, sample_ptr, noise_ptr, scale_ptr, factor_ptr, prev_out_ptr, x0_out_ptr,
                      table_ptr, table_stride, num_train, timesteps_ptr, timesteps_stride, host_timestep,
                      prev_timesteps_ptr, prev_timesteps_stride, host_prev_timestep, n, blocks_per_sample,
                      model_output_sample_stride, cond_offset, final_alpha_cumprod, eta, clip_range, guidance_scale,
                      rescale, keep, PREDICTION: tl.constexpr, CLIP: tl.constexpr, THRESHOLD: tl.constexpr,
                      USE_CLIPPED: tl.constexpr, HAS_NOISE: tl.constexpr, GUIDED: tl.constexpr, RESCALE: tl.constexpr,
                      TIMESTEP_ON_HOST: tl.constexpr, PREV_TIMESTEP_ON_HOST: tl.constexpr, BLOCK: tl.constexpr):
    sample, offsets, mask = K.program_span(n, blocks_per_sample, BLOCK)

    # Per-sample scalars, in the reference's operation order.
    _, a = K.gather_abar(table_ptr, table_stride, num_train, timesteps_ptr, timesteps_stride, host_timestep, sample,
                         TIMESTEP_ON_HOST)
    a_prev = K.gather_abar_prev(table_ptr, table_stride, num_train, prev_timesteps_ptr, prev_timesteps_stride,
                                host_prev_timestep, sample, final_alpha_cumprod, PREV_TIMESTEP_ON_HOST)
    beta = 1.0 - a
    sqrt_a = tl.sqrt_rn(a)
    sqrt_beta = tl.sqrt_rn(beta)
    variance = tl.div_rn(1.0 - a_prev, beta) * (1.0 - tl.div_rn(a, a_prev))
    std = eta * tl.sqrt_rn(variance)
    x0_coef = tl.sqrt_rn(a_prev)
    eps_coef = tl.sqrt_rn(1.0 - a_prev - std * std)

    element = sample * n + offsets
    # The model output holds n elements per sample like x (model_output_sample_stride == n); guided, this
    # addresses its unconditional half, and the conditional one starts cond_offset further on.
    model_element = sample * model_output_sample_stride + offsets
    model_out = K.load_model_output(model_output_ptr, model_element, mask, cond_offset, guidance_scale, GUIDED)
    model_out = K.rescale_guided(model_out, factor_ptr, sample, rescale, keep, RESCALE)
    x = tl.load(sample_ptr + element, mask=mask).to(tl.float32)
    x0 = K.predict_x0(x, model_out, sqrt_a, sqrt_beta, PREDICTION)
    if USE_CLIPPED:
        x0 = K.clip_or_threshold(x0, scale_ptr, sample, clip_range, CLIP, THRESHOLD)
        eps = tl.div_rn(x - sqrt_a * x0, sqrt_beta)
    else:
        eps = K.predict_eps(x, model_out, x0, sqrt_a, sqrt_beta, PREDICTION)
        x0 = K.clip_or_threshold(x0, scale_ptr, sample, clip_range, CLIP, THRESHOLD)
    prev = x0_coef * x0 + eps_coef * eps
    if HAS_NOISE:
        prev = prev + std * tl.load(noise_ptr + element, mask=mask).to(tl.float32)
    K.store_step_outputs(prev_out_ptr, x0_out_ptr, element, mask, prev, x0)


@C.float64_runs_reference(ddim_step_reference, dtype_from=1)
def ddim_step(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
              alphas_cumprod: torch.Tensor, timestep: C.TimestepLike, prev_timestep: C.TimestepLike, *,
              final_alpha_cumprod: float, eta: float, use_clipped_model_output: bool,
              **step_options) -> Tuple[torch.Tensor, torch.Tensor]:
    """``ddim_step_reference``'s contract: ``model_output`` ``[B or 2B, ...]`` (2B with ``guidance_scale``),
    ``sample`` ``[B, ...]`` and ``noise`` (used when eta > 0) laid out alike, fp16/bf16/fp32 (fp64 runs the
    reference); table float32 ``[T]``; timesteps python ints (shared by the batch, kernel arguments; a negative
    prev_timestep means ``final_alpha_cumprod``) or int64 ``[1 or B]`` on the sample's device; ``step_options``
    are the options every step shares (``K.launch_step``'s keywords). Returns (prev_sample,
    pred_original_sample) in the sample's dtype and layout."""
    has_noise = eta > 0
    if has_noise and noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise")
    noise = noise if has_noise else None
    K.check_flat_layout(model_output, sample, noise)
    return K.launch_step(_ddim_step_kernel, model_output, sample, noise, alphas_cumprod, timestep, prev_timestep,
                         dict(final_alpha_cumprod=final_alpha_cumprod, eta=eta,
                              USE_CLIPPED=use_clipped_model_output),
                         **step_options)


@C.binds(ddim_step)
def _bind_ddim_step(model_output, sample, noise, alphas_cumprod, timestep, prev_timestep, *, final_alpha_cumprod,
                    eta, use_clipped_model_output, **step_options):
    return K.bind_step(_ddim_step_kernel, model_output, sample, alphas_cumprod, timestep, prev_timestep,
                       dict(final_alpha_cumprod=final_alpha_cumprod, eta=eta, USE_CLIPPED=use_clipped_model_output),
                       eta > 0, **step_options)
