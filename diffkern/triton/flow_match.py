"""Triton flow-matching kernels: the Euler step (``diffkern.ops.flow_match``) and the forward process
(``diffkern.ops.flow_add_noise``).

Per sample (sigma and sigma_next once per program, as scalars: a host value shared by the batch is a kernel argument,
``*_ON_HOST``, and a tensor is loaded; see ``diffkern.ops.flow_match`` for the math):

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
                            sigma_ptr, sigma_stride, host_sigma, sigma_next_ptr, sigma_next_stride, host_sigma_next,
                            n, blocks_per_sample, cond_offset, guidance_scale, rescale, keep,
                            SIGMA_ON_HOST: tl.constexpr, SIGMA_NEXT_ON_HOST: tl.constexpr, STOCHASTIC: tl.constexpr,
                            GUIDED: tl.constexpr, RESCALE: tl.constexpr, BLOCK: tl.constexpr):
    sample, offsets, mask = K.program_span(n, blocks_per_sample, BLOCK)
    s = K.per_sample_value(sigma_ptr, sigma_stride, host_sigma, sample, SIGMA_ON_HOST)
    s_next = K.per_sample_value(sigma_next_ptr, sigma_next_stride, host_sigma_next, sample, SIGMA_NEXT_ON_HOST)
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


def _sigma_args(sigma) -> tuple:
    """A sigma of the backend contract as the kernels take it, ``(ptr, stride, host)``: a python float (float32-exact)
    as ``(None, 0, value)`` with the kernel's ``*_ON_HOST`` set, a float32 ``[1 or B]`` tensor as (itself, its stride
    between samples, 0.0)."""
    if type(sigma) is float:
        return None, 0, sigma
    return sigma, K.index_stride(sigma), 0.0


def _step_launch(model_output: torch.Tensor, sample: torch.Tensor, sigma, sigma_next, *,
                 guidance_scale: Optional[float], guidance_rescale: float, stochastic: bool):
    """``launch(model_output, sample, noise, sigma, sigma_next)`` for non-empty fp16/bf16/fp32 calls with these
    arguments' signature (shapes and the sigmas' kinds, host number or tensor): the grid, the fixed arguments and
    the constexprs computed here once."""
    batch = sample.shape[0]
    n = sample.numel() // batch
    guided = guidance_scale is not None
    rescaled = guided and guidance_rescale != 0
    cfg = K.launch_config(batch, n)
    launcher = K.direct_launcher(_flow_match_step_kernel, cfg.grid,
                                 dict(num_warps=cfg.num_warps, **K.LAUNCH_OPTIONS), (model_output.dtype, sample.dtype),
                                 sample.device)
    tail = K.positional_tail(_flow_match_step_kernel, "cond_offset", dict(
        cond_offset=batch * n if guided else 0, guidance_scale=guidance_scale if guided else 0.0,
        rescale=guidance_rescale, keep=1 - guidance_rescale, SIGMA_ON_HOST=type(sigma) is float,
        SIGMA_NEXT_ON_HOST=type(sigma_next) is float, STOCHASTIC=stochastic, GUIDED=guided, RESCALE=rescaled,
        BLOCK=cfg.block))
    blocks_per_sample = cfg.blocks_per_sample

    def launch(model_output, sample, noise, sigma, sigma_next):
        prev_out = torch.empty_like(sample)
        x0_out = torch.empty_like(sample)
        factor = rescale_factor(model_output, batch, n, guidance_scale) if rescaled else None
        with K.device_guard(sample):
            launcher(model_output, sample, noise if stochastic else None, factor, prev_out, x0_out,
                     *_sigma_args(sigma), *_sigma_args(sigma_next), n, blocks_per_sample, *tail)
        return prev_out, x0_out
    return launch


@C.float64_runs_reference(flow_match_step_reference, dtype_from=1)
def flow_match_step(model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor], sigma,
                    sigma_next, *, guidance_scale: Optional[float], guidance_rescale: float,
                    stochastic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``flow_match_step_reference``'s contract (fp64 runs the reference). Returns (prev_sample,
    pred_original_sample) in the sample's dtype and layout."""
    if stochastic and noise is None:
        raise ValueError("the stochastic flow_match_step needs noise")
    K.check_flat_layout(model_output, sample, noise if stochastic else None)
    if sample.numel() == 0:
        return torch.empty_like(sample), torch.empty_like(sample)
    return _step_launch(model_output, sample, sigma, sigma_next, guidance_scale=guidance_scale,
                        guidance_rescale=guidance_rescale, stochastic=stochastic)(
        model_output, sample, noise, sigma, sigma_next)


@C.binds(flow_match_step)
def _bind_flow_match_step(model_output, sample, noise, sigma, sigma_next, **options):
    if sample.dtype == torch.float64 or sample.numel() == 0:
        return None
    return _step_launch(model_output, sample, sigma, sigma_next, **options)


@triton.jit
def _flow_add_noise_kernel(x0_ptr, noise_ptr, out_ptr, sigma_ptr, sigma_stride, host_sigma, n, blocks_per_sample,
                           SIGMA_ON_HOST: tl.constexpr, BLOCK: tl.constexpr):
    sample, offsets, mask = K.program_span(n, blocks_per_sample, BLOCK)
    s = K.per_sample_value(sigma_ptr, sigma_stride, host_sigma, sample, SIGMA_ON_HOST)
    element = sample * n + offsets
    x0 = tl.load(x0_ptr + element, mask=mask).to(tl.float32)
    z = tl.load(noise_ptr + element, mask=mask).to(tl.float32)
    tl.store(out_ptr + element, (s * z + (1.0 - s) * x0).to(out_ptr.dtype.element_ty), mask=mask)


def _add_noise_launch(original_samples: torch.Tensor, sigma):
    """``launch(original_samples, noise, sigma)`` for non-empty fp16/bf16/fp32 calls with these arguments' signature
    (``_step_launch``'s)."""
    batch = original_samples.shape[0]
    n = original_samples.numel() // batch
    cfg = K.launch_config(batch, n)
    launcher = K.direct_launcher(_flow_add_noise_kernel, cfg.grid, dict(num_warps=cfg.num_warps, **K.LAUNCH_OPTIONS),
                                 (original_samples.dtype,), original_samples.device)
    tail = K.positional_tail(_flow_add_noise_kernel, "SIGMA_ON_HOST",
                             dict(SIGMA_ON_HOST=type(sigma) is float, BLOCK=cfg.block))
    blocks_per_sample = cfg.blocks_per_sample

    def launch(original_samples, noise, sigma):
        out = torch.empty_like(original_samples)
        with K.device_guard(original_samples):
            launcher(original_samples, noise, out, *_sigma_args(sigma), n, blocks_per_sample, *tail)
        return out
    return launch


@C.float64_runs_reference(flow_add_noise_reference, dtype_from=0)
def flow_add_noise(original_samples: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """``flow_add_noise_reference``'s contract (fp64 runs the reference)."""
    K.check_flat_layout(original_samples, noise)
    if original_samples.numel() == 0:
        return torch.empty_like(original_samples)
    return _add_noise_launch(original_samples, sigma)(original_samples, noise, sigma)


@C.binds(flow_add_noise)
def _bind_flow_add_noise(original_samples, noise, sigma):
    if original_samples.dtype == torch.float64 or original_samples.numel() == 0:
        return None
    return _add_noise_launch(original_samples, sigma)
