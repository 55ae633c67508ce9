"""Triton flow-matching kernels: the Euler step (``diffkern.ops.flow_match``) and the forward process
(``diffkern.ops.flow_add_noise``).

Per sample (sigma and sigma_next loaded once per program, as scalars; see ``diffkern.ops.flow_match`` for the
math):

    v      = uncond + s (cond - uncond)                 (with guidance; else the model output)
    v      = r (v q) + (1 - r) v,  q = std(cond) / std(v)   (with guidance_rescale r)
    x0     = x - sigma v
    x_prev = x + (sigma_next - sigma) v                 or (1 - sigma_next) x0 + sigma_next z (stochastic)

Passes over memory:

- default: one kernel reads the model output (both halves with guidance), x and z (stochastic) once each and
  writes x_prev and x0 once each.
- guidance_rescale: the stats pass shared by every step with guidance (``diffkern.triton._guidance``: partial
  moments of cond and the guided v per block, merged per sample into q), then the step kernel reading q. Two
  passes over the model output, three launches.

``flow_add_noise``: one pass, sigma * noise + (1 - sigma) x_0. Layout, grid and numerics (fp32 coefficients, every
operation rounded as in the reference, FMA contraction off): ``diffkern.triton._common``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from diffkern.ops import _common as C
from diffkern.ops.flow_add_noise import flow_add_noise_reference
from diffkern.ops.flow_match import flow_match_step_reference
from diffkern.triton import _common as K
from diffkern.triton._guidance import rescale_factor


@triton.jit
def _flow_match_step_kernel(model_output_ptr, sample_ptr, noise_ptr, factor_ptr, prev_out_ptr, x0_out_ptr,
                            sigma_ptr, sigma_stride, sigma_next_ptr, sigma_next_stride, n, blocks_per_sample,
                            cond_offset, guidance_scale, rescale, keep, STOCHASTIC: tl.constexpr,
                            GUIDED: tl.constexpr, RESCALE: tl.constexpr, BLOCK: tl.constexpr):
    sample, offsets, mask = K.program_span(n, blocks_per_sample, BLOCK)
    s = tl.load(sigma_ptr + sample * sigma_stride)
    s_next = tl.load(sigma_next_ptr + sample * sigma_next_stride)
    element = sample * n + offsets
    v = K.load_model_output(model_output_ptr, element, mask, cond_offset, guidance_scale, GUIDED)
    v = K.rescale_guided(v, factor_ptr, sample, rescale, keep, RESCALE)
    x = tl.load(sample_ptr + element, mask=mask).to(tl.float32)
    x0 = x - s * v
    if STOCHASTIC:
        z = tl.load(noise_ptr + element, mask=mask).to(tl.float32)
        prev = (1.0 - s_next) * x0 + s_next * z
    else:
        prev = x + (s_next - s) * v
    K.store_step_outputs(prev_out_ptr, x0_out_ptr, element, mask, prev, x0)


@C.float64_runs_reference(flow_match_step_reference, dtype_from=1)
def flow_match_step(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor],
                    sigma: torch.Tensor, sigma_next: torch.Tensor, *, guidance_scale: Optional[float],
                    guidance_rescale: float, stochastic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``flow_match_step_reference``'s contract (fp64 runs the reference). Returns (prev_sample,
    pred_original_sample) in the sample's dtype and layout."""
    if stochastic and noise is None:
        raise ValueError("the stochastic flow_match_step needs noise")
    noise = noise if stochastic else None
    K.check_flat_layout(model_output, sample, noise)
    prev_out = torch.empty_like(sample)
    x0_out = torch.empty_like(sample)
    if sample.numel() == 0:
        return prev_out, x0_out
    batch = sample.shape[0]
    n = sample.numel() // batch
    guided = guidance_scale is not None
    rescaled = guided and guidance_rescale != 0
    factor = rescale_factor(model_output, batch, n, guidance_scale) if rescaled else None
    cfg = K.launch_config(batch, n)
    with K.device_guard(sample):
        _flow_match_step_kernel[cfg.grid](
            model_output, sample, noise, factor, prev_out, x0_out, sigma, K.index_stride(sigma), sigma_next,
            K.index_stride(sigma_next), n, cfg.blocks_per_sample, batch * n if guided else 0,
            guidance_scale if guided else 0.0, guidance_rescale, 1 - guidance_rescale, STOCHASTIC=stochastic,
            GUIDED=guided, RESCALE=rescaled, BLOCK=cfg.block, num_warps=cfg.num_warps, **K.LAUNCH_OPTIONS)
    return prev_out, x0_out


@triton.jit
def _flow_add_noise_kernel(x0_ptr, noise_ptr, out_ptr, sigma_ptr, sigma_stride, n, blocks_per_sample,
                           BLOCK: tl.constexpr):
    sample, offsets, mask = K.program_span(n, blocks_per_sample, BLOCK)
    s = tl.load(sigma_ptr + sample * sigma_stride)
    element = sample * n + offsets
    x0 = tl.load(x0_ptr + element, mask=mask).to(tl.float32)
    z = tl.load(noise_ptr + element, mask=mask).to(tl.float32)
    tl.store(out_ptr + element, (s * z + (1.0 - s) * x0).to(out_ptr.dtype.element_ty), mask=mask)


@C.float64_runs_reference(flow_add_noise_reference, dtype_from=0)
def flow_add_noise(original_samples: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``flow_add_noise_reference``'s contract (fp64 runs the reference)."""
    K.check_flat_layout(original_samples, noise)
    out = torch.empty_like(original_samples)
    if out.numel() == 0:
        return out
    batch = original_samples.shape[0]
    n = original_samples.numel() // batch
    cfg = K.launch_config(batch, n)
    with K.device_guard(original_samples):
        _flow_add_noise_kernel[cfg.grid](original_samples, noise, out, sigma, K.index_stride(sigma), n,
                                         cfg.blocks_per_sample, BLOCK=cfg.block, num_warps=cfg.num_warps,
                                         **K.LAUNCH_OPTIONS)
    return out
