"""The guidance rescale's statistics pass, shared by every Triton step with guidance (DDIM, DDPM, flow matching).

diffusers' ``rescale_noise_cfg`` (``diffkern.ops._common.rescale_guided``) needs, per sample, q = std(cond) /
std(guided) (unbiased, over every non-batch element) of the guided model output before any element of the step
can be written. ``rescale_factor`` computes it in one pass over the two halves of the model output and one tiny
merge:

- ``_cfg_moments_kernel`` (the step's grid: one program per block of one sample) reads the block of both halves
  once and writes the block's count, mean and sum of squared deviations (from the block's own mean, computed in
  registers: no cancellation) of cond and of the guided output;
- ``_rescale_factor_kernel`` (one program per sample) merges them (the parallel-axis formula of Chan et al.) into q.

The step kernel then reads q per sample (``_common.rescale_guided``): two passes over the model output, three
launches in all, the fewest for a statistic of a whole sample that does not fit on chip. Deterministic: fixed
block partition, fixed reduction order, no atomics.

A model output sample may hold more than the guided elements: with a learned variance (DDPM) each sample has 2n
elements, the prediction first; ``model_output_sample_stride`` is the elements per model-output sample and the
statistics cover the first n of each.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from diffkern.triton import _common as K
from diffkern.triton.group_norm_silu._interpreter import fix_triton36_interpreter

fix_triton36_interpreter()  # _rescale_factor_kernel loops over a runtime bound

# Partial moments per block: count, mean(cond), M2(cond), mean(guided), M2(guided) (rows of a [5, programs] buffer).
_MOMENTS = 5
# Partials merged at a time by _rescale_factor_kernel.
_MERGE_BLOCK = 1024


@triton.jit
def _block_moments(values, mask, count):
    """(mean, sum of squared deviations from it) of the ``mask``-ed values of one block of ``count`` elements."""
    mean = tl.div_rn(tl.sum(tl.where(mask, values, 0.0), axis=0), count)
    deviation = tl.where(mask, values - mean, 0.0)
    return mean, tl.sum(deviation * deviation, axis=0)


@triton.jit
def _cfg_moments_kernel(model_output_ptr, partial_ptr, n, blocks_per_sample, programs, model_output_sample_stride,
                        cond_offset, guidance_scale, BLOCK: tl.constexpr):
    sample, offsets, mask = K.program_span(n, blocks_per_sample, BLOCK)
    pid = tl.program_id(0).to(tl.int64)
    element = sample * model_output_sample_stride + offsets
    uncond = tl.load(model_output_ptr + element, mask=mask, other=0.0).to(tl.float32)
    cond = tl.load(model_output_ptr + cond_offset + element, mask=mask, other=0.0).to(tl.float32)
    guided = uncond + guidance_scale * (cond - uncond)
    count = tl.minimum(n - (pid - sample * blocks_per_sample) * BLOCK, BLOCK).to(tl.float32)
    cond_mean, cond_m2 = _block_moments(cond, mask, count)
    guided_mean, guided_m2 = _block_moments(guided, mask, count)
    tl.store(partial_ptr + pid, count)
    tl.store(partial_ptr + programs + pid, cond_mean)
    tl.store(partial_ptr + 2 * programs + pid, cond_m2)
    tl.store(partial_ptr + 3 * programs + pid, guided_mean)
    tl.store(partial_ptr + 4 * programs + pid, guided_m2)


@triton.jit
def _partial_slice(partial_ptr, programs, first, start, blocks_per_sample, MERGE: tl.constexpr):
    """Blocks [start, start + MERGE) of a sample's partials: (count, cond mean, cond M2, guided mean, guided
    M2), each [MERGE], zero past the sample's last block."""
    slot = first + start + tl.arange(0, MERGE)
    valid = start + tl.arange(0, MERGE) < blocks_per_sample
    return (tl.load(partial_ptr + slot, mask=valid, other=0.0),
            tl.load(partial_ptr + programs + slot, mask=valid, other=0.0),
            tl.load(partial_ptr + 2 * programs + slot, mask=valid, other=0.0),
            tl.load(partial_ptr + 3 * programs + slot, mask=valid, other=0.0),
            tl.load(partial_ptr + 4 * programs + slot, mask=valid, other=0.0))


@triton.jit
def _rescale_factor_kernel(partial_ptr, factor_ptr, n, blocks_per_sample, programs, MERGE: tl.constexpr):
    """q = std(cond) / std(guided) of one sample (unbiased) from its blocks' partial moments: the mean from the
    blocks' sums, then M2 = sum of the blocks' M2 + sum of count (block mean - mean)^2."""
    sample = tl.program_id(0).to(tl.int64)
    first = sample * blocks_per_sample
    cond_sum = tl.zeros((MERGE,), dtype=tl.float32)
    guided_sum = tl.zeros((MERGE,), dtype=tl.float32)
    for start in range(0, blocks_per_sample, MERGE):
        count, cond_mean_k, _, guided_mean_k, _ = _partial_slice(partial_ptr, programs, first, start,
                                                                 blocks_per_sample, MERGE)
        cond_sum += count * cond_mean_k
        guided_sum += count * guided_mean_k
    total = n.to(tl.float32)
    cond_mean = tl.div_rn(tl.sum(cond_sum, axis=0), total)
    guided_mean = tl.div_rn(tl.sum(guided_sum, axis=0), total)
    cond_m2 = tl.zeros((MERGE,), dtype=tl.float32)
    guided_m2 = tl.zeros((MERGE,), dtype=tl.float32)
    for start in range(0, blocks_per_sample, MERGE):
        count, cond_mean_k, cond_m2_k, guided_mean_k, guided_m2_k = _partial_slice(
            partial_ptr, programs, first, start, blocks_per_sample, MERGE)
        dc = cond_mean_k - cond_mean
        dg = guided_mean_k - guided_mean
        cond_m2 += cond_m2_k + count * dc * dc
        guided_m2 += guided_m2_k + count * dg * dg
    cond_std = tl.sqrt_rn(tl.div_rn(tl.sum(cond_m2, axis=0), total - 1.0))
    guided_std = tl.sqrt_rn(tl.div_rn(tl.sum(guided_m2, axis=0), total - 1.0))
    tl.store(factor_ptr + sample, tl.div_rn(cond_std, guided_std))


def rescale_factor(model_output: torch.Tensor, batch: int, n: int, guidance_scale: float,
                   model_output_sample_stride: Optional[int] = None) -> torch.Tensor:
    """std(cond) / std(guided) per sample, float32 ``[B]``, over the first ``n`` elements of each sample of a
    ``[2B, ...]`` flat model output whose samples hold ``model_output_sample_stride`` elements (default ``n``)
    (module docstring). ``batch * n`` must be positive."""
    stride = n if model_output_sample_stride is None else model_output_sample_stride
    cfg = K.launch_config(batch, n)
    programs = cfg.grid[0]
    partial = torch.empty((_MOMENTS, programs), dtype=torch.float32, device=model_output.device)
    factor = torch.empty((batch,), dtype=torch.float32, device=model_output.device)
    with K.device_guard(model_output):
        _cfg_moments_kernel[cfg.grid](model_output, partial, n, cfg.blocks_per_sample, programs, stride,
                                      batch * stride, guidance_scale, BLOCK=cfg.block, num_warps=cfg.num_warps,
                                      **K.LAUNCH_OPTIONS)
        merge = min(_MERGE_BLOCK, triton.next_power_of_2(cfg.blocks_per_sample))
        _rescale_factor_kernel[(batch,)](partial, factor, n, cfg.blocks_per_sample, programs, MERGE=merge,
                                         num_warps=4, **K.LAUNCH_OPTIONS)
    return factor
