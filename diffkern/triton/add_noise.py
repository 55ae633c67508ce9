"""Triton add_noise: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise in one pass.

Reads x_0 and the noise once and writes x_t once; abar_t is gathered per sample inside the kernel from the
float32 table (index clamped into [0, T-1]) and both coefficients are computed there in fp32, so there is no
host sync and no per-call coefficient tensor. Layout, grid and numerics: ``diffkern.triton._common``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffkern.ops import _common as C
from diffkern.ops._common import float64_runs_reference
from diffkern.ops.add_noise import add_noise_reference
from diffkern.triton import _common as K


@triton.jit(do_not_specialize=["host_timestep"])
def _add_noise_kernel(x0_ptr, noise_ptr, out_ptr, table_ptr, table_stride, num_train, timesteps_ptr,
                      timesteps_stride, host_timestep, n, blocks_per_sample, TIMESTEP_ON_HOST: tl.constexpr,
                      BLOCK: tl.constexpr):
    sample, offsets, mask = K.program_span(n, blocks_per_sample, BLOCK)
    _, a = K.gather_abar(table_ptr, table_stride, num_train, timesteps_ptr, timesteps_stride, host_timestep, sample,
                         TIMESTEP_ON_HOST)
    sqrt_a = tl.sqrt_rn(a)
    sqrt_beta = tl.sqrt_rn(1.0 - a)
    element = sample * n + offsets
    x0 = tl.load(x0_ptr + element, mask=mask).to(tl.float32)
    noise = tl.load(noise_ptr + element, mask=mask).to(tl.float32)
    noisy = sqrt_a * x0 + sqrt_beta * noise
    tl.store(out_ptr + element, noisy.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(original_samples: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: C.TimestepLike):
    """``launch(original_samples, noise, alphas_cumprod, timesteps)`` for non-empty fp16/bf16/fp32 calls with these
    arguments' signature (shapes, the table's length, a python-int or tensor timestep): grid and constexprs computed
    here once."""
    batch = original_samples.shape[0]
    n = original_samples.numel() // batch
    cfg = K.launch_config(batch, n)
    launcher = K.direct_launcher(_add_noise_kernel, cfg.grid, dict(num_warps=cfg.num_warps, **K.LAUNCH_OPTIONS),
                                 (original_samples.dtype,), original_samples.device)
    num_train, blocks_per_sample = alphas_cumprod.numel(), cfg.blocks_per_sample
    tail = K.positional_tail(_add_noise_kernel, "TIMESTEP_ON_HOST",
                             dict(TIMESTEP_ON_HOST=type(timesteps) is int, BLOCK=cfg.block))

    def launch(original_samples, noise, alphas_cumprod, timesteps):
        out = torch.empty_like(original_samples)
        t = K.timestep_args(timesteps, alphas_cumprod)
        with K.device_guard(original_samples):
            launcher(original_samples, noise, out, alphas_cumprod, alphas_cumprod.stride(0), num_train, t.ptr,
                     t.stride, t.host, n, blocks_per_sample, *tail)
        return out
    return launch


@float64_runs_reference(add_noise_reference, dtype_from=0)
def add_noise(original_samples: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
              timesteps: C.TimestepLike) -> torch.Tensor:
    """``add_noise_reference``'s contract: ``original_samples`` and ``noise`` ``[B, ...]`` laid out alike
    (fp16/bf16/fp32; fp64 runs the reference), table float32 ``[T]``, timesteps a python int (shared by the
    batch: a kernel argument) or int64 ``[1 or B]`` on the samples' device.
    Returns x_t in the samples' dtype and layout."""
    K.check_flat_layout(original_samples, noise)
    if original_samples.numel() == 0:
        return torch.empty_like(original_samples)
    K.table_args(alphas_cumprod)  # (checks the table)
    return _launch(original_samples, alphas_cumprod, timesteps)(original_samples, noise, alphas_cumprod, timesteps)


@C.binds(add_noise)
def _bind_add_noise(original_samples, noise, alphas_cumprod, timesteps):
    """``add_noise`` bound to one signature (``_common.binds``): non-empty fp16/bf16/fp32 samples."""
    if original_samples.dtype == torch.float64 or original_samples.numel() == 0:
        return None
    return _launch(original_samples, alphas_cumprod, timesteps)
