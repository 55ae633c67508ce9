"""Triton DDPM ancestral step: one fused kernel (two passes plus a selection with dynamic thresholding).

Per sample (a = abar_t, a' = abar_prev or 1.0 when prev_timestep < 0; see ``diffkern.ops.ddpm`` for the math):

    model_out = uncond + s (cond - uncond)        (with guidance; else the model output)
    model_out = r (model_out q) + (1 - r) model_out   (guidance_rescale r; q = std(cond) / std(model_out), over
                                                        the prediction's C channels with a learned variance)
    x0        = prediction(x, model_out, a)       then threshold or clip
    alpha     = a / a',  beta = 1 - alpha
    x_prev    = (sqrt(a') beta / (1 - a)) x0 + (sqrt(alpha) (1 - a') / (1 - a)) x  +  std z   (std = 0 at t = 0)

with ``std`` per variance type; the fixed types make it a per-sample scalar, the learned ones read the
predicted variance p per element. Learned types take a model output with 2C channels, C-contiguous: sample b's
prediction is the n elements at ``b * 2n`` and its p the next n (with guidance, p comes from the conditional
half, unguided, as in diffusers' pipelines).

Passes over memory:

- default: one kernel reads the model output (both halves with guidance; p with a learned variance), x and z
  once each and writes x_prev and x0 once each.
- guidance_rescale: the stats pass of ``diffkern.triton._guidance`` first (q per sample: one more read of the
  model output's prediction channels, two small launches), then the step as above, reading q.
- dynamic thresholding: pass 1 reads the model output (and x) and writes |x0| in fp32; ``kthvalue`` selects the
  per-sample quantile (one or two selections over that buffer); pass 2 is the fused step above.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from diffkern.ops import _common as C
from diffkern.ops._declaration import VARIANCE_CODES
from diffkern.ops.ddpm import LEARNED_VARIANCE_TYPES, ddpm_step_reference
from diffkern.triton import _common as K

# The variance-type codes every backend takes. fixed_large_log runs as fixed_large: diffusers' NaN there is a
# bug, the intended std is sqrt(beta) (see ``_variance_code``).
FIXED_SMALL = tl.constexpr(VARIANCE_CODES["fixed_small"])
FIXED_SMALL_LOG = tl.constexpr(VARIANCE_CODES["fixed_small_log"])
FIXED_LARGE = tl.constexpr(VARIANCE_CODES["fixed_large"])
LEARNED = tl.constexpr(VARIANCE_CODES["learned"])
LEARNED_RANGE = tl.constexpr(VARIANCE_CODES["learned_range"])


def _variance_code(variance_type: str) -> int:
    """The kernel's ``VARIANCE``: fixed_large_log computes as fixed_large, so one compiled variant serves both."""
    return VARIANCE_CODES["fixed_large" if variance_type == "fixed_large_log" else variance_type]


@triton.jit(do_not_specialize=["host_timestep", "host_prev_timestep"])
def _ddpm_step_kernel(model_output_ptr, sample_ptr, noise_ptr, scale_ptr, factor_ptr, prev_out_ptr, x0_out_ptr,
                      table_ptr, table_stride, num_train, timesteps_ptr, timesteps_stride, host_timestep,
                      prev_timesteps_ptr, prev_timesteps_stride, host_prev_timestep, n, blocks_per_sample,
                      model_output_sample_stride, cond_offset, clip_range, guidance_scale, rescale, keep,
                      PREDICTION: tl.constexpr, VARIANCE: tl.constexpr, CLIP: tl.constexpr,
                      THRESHOLD: tl.constexpr, HAS_NOISE: tl.constexpr, GUIDED: tl.constexpr, RESCALE: tl.constexpr,
                      TIMESTEP_ON_HOST: tl.constexpr, PREV_TIMESTEP_ON_HOST: tl.constexpr, BLOCK: tl.constexpr):
    sample, offsets, mask = K.program_span(n, blocks_per_sample, BLOCK)

    # Per-sample scalars, in the reference's operation order.
    t, a = K.gather_abar(table_ptr, table_stride, num_train, timesteps_ptr, timesteps_stride, host_timestep, sample,
                         TIMESTEP_ON_HOST)
    a_prev = K.gather_abar_prev(table_ptr, table_stride, num_train, prev_timesteps_ptr, prev_timesteps_stride,
                                host_prev_timestep, sample, 1.0, PREV_TIMESTEP_ON_HOST)
    alpha = tl.div_rn(a, a_prev)
    beta = 1.0 - alpha
    sqrt_a = tl.sqrt_rn(a)
    sqrt_one_minus_a = tl.sqrt_rn(1.0 - a)
    x0_coef = tl.div_rn(tl.sqrt_rn(a_prev) * beta, 1.0 - a)
    x_coef = tl.div_rn(tl.sqrt_rn(alpha) * (1.0 - a_prev), 1.0 - a)

    element = sample * n + offsets
    model_element = sample * model_output_sample_stride + offsets
    model_out = K.load_model_output(model_output_ptr, model_element, mask, cond_offset, guidance_scale, GUIDED)
    model_out = K.rescale_guided(model_out, factor_ptr, sample, rescale, keep, RESCALE)
    x = tl.load(sample_ptr + element, mask=mask).to(tl.float32)
    x0 = K.predict_x0(x, model_out, sqrt_a, sqrt_one_minus_a, PREDICTION)
    x0 = K.clip_or_threshold(x0, scale_ptr, sample, clip_range, CLIP, THRESHOLD)
    prev = x0_coef * x0 + x_coef * x

    if HAS_NOISE:
        posterior_variance = tl.maximum(tl.div_rn(1.0 - a_prev, 1.0 - a) * beta, 1e-20,
                                        propagate_nan=tl.PropagateNan.ALL)
        if VARIANCE == FIXED_SMALL:
            std = tl.sqrt_rn(posterior_variance)
        elif VARIANCE == FIXED_SMALL_LOG:
            std = tl.exp(0.5 * tl.log(posterior_variance))
        elif VARIANCE == FIXED_LARGE:
            std = tl.sqrt_rn(beta)
        else:
            # p: the second n elements of the sample's 2n in the conditional half (the only half unguided).
            predicted = tl.load(model_output_ptr + cond_offset + n + model_element, mask=mask).to(tl.float32)
            if VARIANCE == LEARNED:
                std = tl.sqrt_rn(predicted)
            else:
                frac = (predicted + 1.0) * 0.5
                std = tl.exp(0.5 * (frac * tl.log(beta) + (1.0 - frac) * tl.log(posterior_variance)))
        # No noise at t = 0 (the raw timestep, as diffusers tests it); where() also drops a NaN std there.
        std = tl.where(t > 0, std, 0.0)
        prev = prev + std * tl.load(noise_ptr + element, mask=mask).to(tl.float32)

    K.store_step_outputs(prev_out_ptr, x0_out_ptr, element, mask, prev, x0)


@C.float64_runs_reference(ddpm_step_reference, dtype_from=1)
def ddpm_step(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
              alphas_cumprod: torch.Tensor, timestep: C.TimestepLike, prev_timestep: C.TimestepLike, *,
              variance_type: str, **step_options) -> Tuple[torch.Tensor, torch.Tensor]:
    """``ddpm_step_reference``'s contract: ``model_output`` ``[B or 2B, C or 2C, ...]`` (2C for learned variance
    types, and then every tensor C-contiguous), ``sample`` ``[B, C, ...]`` and ``noise`` (or None: no noise)
    laid out alike, fp16/bf16/fp32 (fp64 runs the reference); table float32 ``[T]``; timesteps python ints
    (shared by the batch, kernel arguments; a negative prev_timestep means abar_prev = 1) or int64 ``[1 or B]``
    on the sample's device; ``step_options`` are the options every step shares (``K.launch_step``'s keywords). Returns
    (prev_sample, pred_original_sample) in the sample's dtype and layout."""
    if variance_type in LEARNED_VARIANCE_TYPES:
        # The 2C-channel output is split per sample in storage order: only C order splits it by channel.
        if not all(t is None or t.is_contiguous() for t in (model_output, sample, noise)):
            raise ValueError("ddpm_step with a learned variance needs contiguous tensors")
    else:
        K.check_flat_layout(model_output, sample, noise)
    return K.launch_step(_ddpm_step_kernel, model_output, sample, noise, alphas_cumprod, timestep, prev_timestep,
                         dict(VARIANCE=_variance_code(variance_type)), **step_options)


@C.binds(ddpm_step)
def _bind_ddpm_step(model_output, sample, noise, alphas_cumprod, timestep, prev_timestep, *, variance_type,
                    **step_options):
    return K.bind_step(_ddpm_step_kernel, model_output, sample, alphas_cumprod, timestep, prev_timestep,
                       dict(VARIANCE=_variance_code(variance_type)), True, **step_options)
