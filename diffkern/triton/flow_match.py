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
- guidance_rescale: ``_cfg_moments_kernel`` reads both halves once and writes, per block of a sample, the count,
  mean and sum of squared deviations (from the block's own mean, computed in registers: no cancellation) of cond
  and of the guided v; ``_rescale_factor_kernel`` (one program per sample) merges them (the parallel-axis formula
  of Chan et al.) into q; the step kernel reads q. Two passes over the model output, three launches.

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
from diffkern.triton.group_norm_silu._interpreter import fix_triton36_interpreter

fix_triton36_interpreter()  # _rescale_factor_kernel loops over a runtime bound

# Partial moments per block: count, mean(cond), M2(cond), mean(v), M2(v) (rows of a [5, programs] buffer).
_MOMENTS = 5
# Partials merged at a time by _rescale_factor_kernel.
_MERGE_BLOCK = 1024


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
    if RESCALE:
        q = tl.load(factor_ptr + sample)
        v = rescale * (v * q) + keep * v
    x = tl.load(sample_ptr + element, mask=mask).to(tl.float32)
    x0 = x - s * v
    if STOCHASTIC:
        z = tl.load(noise_ptr + element, mask=mask).to(tl.float32)
        prev = (1.0 - s_next) * x0 + s_next * z
    else:
        prev = x + (s_next - s) * v
    K.store_step_outputs(prev_out_ptr, x0_out_ptr, element, mask, prev, x0)


@triton.jit
def _block_moments(values, mask, count):
    """(mean, sum of squared deviations from it) of the ``mask``-ed values of one block of ``count`` elements."""
    mean = tl.div_rn(tl.sum(tl.where(mask, values, 0.0), axis=0), count)
    deviation = tl.where(mask, values - mean, 0.0)
    return mean, tl.sum(deviation * deviation, axis=0)


@triton.jit
def _cfg_moments_kernel(model_output_ptr, partial_ptr, n, blocks_per_sample, programs, cond_offset, guidance_scale,
                        BLOCK: tl.constexpr):
    sample, offsets, mask = K.program_span(n, blocks_per_sample, BLOCK)
    pid = tl.program_id(0).to(tl.int64)
    element = sample * n + offsets
    uncond = tl.load(model_output_ptr + element, mask=mask, other=0.0).to(tl.float32)
    cond = tl.load(model_output_ptr + cond_offset + element, mask=mask, other=0.0).to(tl.float32)
    v = uncond + guidance_scale * (cond - uncond)
    count = tl.minimum(n - (pid - sample * blocks_per_sample) * BLOCK, BLOCK).to(tl.float32)
    cond_mean, cond_m2 = _block_moments(cond, mask, count)
    v_mean, v_m2 = _block_moments(v, mask, count)
    tl.store(partial_ptr + pid, count)
    tl.store(partial_ptr + programs + pid, cond_mean)
    tl.store(partial_ptr + 2 * programs + pid, cond_m2)
    tl.store(partial_ptr + 3 * programs + pid, v_mean)
    tl.store(partial_ptr + 4 * programs + pid, v_m2)


@triton.jit
def _rescale_factor_kernel(partial_ptr, factor_ptr, n, blocks_per_sample, programs, MERGE: tl.constexpr):
    """q = std(cond) / std(v) of one sample (unbiased) from its blocks' partial moments: the mean from the
    blocks' sums, then M2 = sum of the blocks' M2 + sum of count (block mean - mean)^2."""
    sample = tl.program_id(0).to(tl.int64)
    first = sample * blocks_per_sample
    cond_sum = tl.zeros((MERGE,), dtype=tl.float32)
    v_sum = tl.zeros((MERGE,), dtype=tl.float32)
    for start in range(0, blocks_per_sample, MERGE):
        index = start + tl.arange(0, MERGE)
        valid = index < blocks_per_sample
        count = tl.load(partial_ptr + first + index, mask=valid, other=0.0)
        cond_sum += count * tl.load(partial_ptr + programs + first + index, mask=valid, other=0.0)
        v_sum += count * tl.load(partial_ptr + 3 * programs + first + index, mask=valid, other=0.0)
    total = n.to(tl.float32)
    cond_mean = tl.div_rn(tl.sum(cond_sum, axis=0), total)
    v_mean = tl.div_rn(tl.sum(v_sum, axis=0), total)
    cond_m2 = tl.zeros((MERGE,), dtype=tl.float32)
    v_m2 = tl.zeros((MERGE,), dtype=tl.float32)
    for start in range(0, blocks_per_sample, MERGE):
        index = start + tl.arange(0, MERGE)
        valid = index < blocks_per_sample
        count = tl.load(partial_ptr + first + index, mask=valid, other=0.0)
        dc = tl.load(partial_ptr + programs + first + index, mask=valid, other=0.0) - cond_mean
        dv = tl.load(partial_ptr + 3 * programs + first + index, mask=valid, other=0.0) - v_mean
        cond_m2 += tl.load(partial_ptr + 2 * programs + first + index, mask=valid, other=0.0) + count * dc * dc
        v_m2 += tl.load(partial_ptr + 4 * programs + first + index, mask=valid, other=0.0) + count * dv * dv
    cond_std = tl.sqrt_rn(tl.div_rn(tl.sum(cond_m2, axis=0), total - 1.0))
    v_std = tl.sqrt_rn(tl.div_rn(tl.sum(v_m2, axis=0), total - 1.0))
    tl.store(factor_ptr + sample, tl.div_rn(cond_std, v_std))


def rescale_factor(model_output: torch.Tensor, batch: int, n: int, guidance_scale: float) -> torch.Tensor:
    """std(cond) / std(v) per sample, float32 ``[B]``, from a ``[2B, ...]`` flat model output (module docstring)."""
    cfg = K.launch_config(batch, n)
    programs = cfg.grid[0]
    partial = torch.empty((_MOMENTS, programs), dtype=torch.float32, device=model_output.device)
    factor = torch.empty((batch,), dtype=torch.float32, device=model_output.device)
    with K.device_guard(model_output):
        _cfg_moments_kernel[cfg.grid](model_output, partial, n, cfg.blocks_per_sample, programs, batch * n,
                                      guidance_scale, BLOCK=cfg.block, num_warps=cfg.num_warps, **K.LAUNCH_OPTIONS)
        merge = min(_MERGE_BLOCK, triton.next_power_of_2(cfg.blocks_per_sample))
        _rescale_factor_kernel[(batch,)](partial, factor, n, cfg.blocks_per_sample, programs, MERGE=merge,
                                         num_warps=4, **K.LAUNCH_OPTIONS)
    return factor


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
