"""GroupNorm + SiLU in Triton, forward and backward.

The math and the backend contract are in ``diffkern/ops/group_norm_silu.py``; this package implements
``group_norm_silu_forward`` and ``group_norm_silu_backward`` with the reference functions' signatures.

Layouts
    ``x`` is the 3-D view ``(N, C, S)``, either NCHW (strides ``(C*S, S, 1)``) or channels-last (strides
    ``(C*S, 1, C)``). Every kernel works on 2-D tiles ``[BLOCK_S pixels, BLOCK_C channels]`` of one
    (n, g) group, addressed as ``group_base + s * stride_s + c * stride_c``. In NCHW a group is one contiguous
    run and the tile's pixel axis is the contiguous one; in channels-last a group is C/G contiguous channels
    strided by C and the tile's channel axis is. Loads coalesce along whichever axis is contiguous; nothing
    is ever copied to the other layout. Outputs take ``x``'s strides (``torch.empty_like``).

    Packed tiles (the split regime in channels-last when C/G is not a multiple of 8, ``Plan.group_pack``): a
    tile's channel axis spans GPT adjacent whole groups (GPT * C/G channels, a multiple of 8), one program per
    GPT groups and chunk, so that every lane reads 16 contiguous bytes; per-group sums are one-hot contractions
    of the per-channel column sums after the loop (``_device``, "Packed tiles").

    C/G is a compile-time constant of every kernel (a model uses a handful of values, so few compiles): the
    compiler then knows how a channels-last group is aligned, issues 16-byte accesses when C/G is a
    multiple of 8 halves or 4 floats (SD's C/G of 10 allows 4 bytes: its groups are 20-byte runs), and
    folds the channel masks.

Statistics
    Each tile computes its exact mean and M2 = sum((x - tile_mean)^2) in registers, and tiles and chunks
    are combined with Chan's parallel formula: a one-pass, fp32 variance that does not cancel for
    |mean| >> std the way sum(x^2)/M - mean^2 does. Normalization is ``(x - mean) * rstd`` (not a folded
    ``x * a + b``, which cancels the same way for large means).

Backward
    The SiLU derivative is recomputed from x, mean and rstd (nothing else is saved). Per (n, g) the kernels
    reduce sum(dxhat) and sum(dxhat * xhat), then dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat*xhat)).
    dweight/dbias: every program writes per-channel partial sums into one row of a ``[P, R, C]`` fp32
    buffer (P planes: dweight and/or dbias; R = N * spatial chunks; each entry is written exactly once, so
    no memset), and a small kernel sums the rows in a fixed order. No float atomics anywhere: results are
    bitwise reproducible from run to run.

Indexing
    Per-group and per-row base offsets are 64-bit scalars; offsets inside a sample are 32-bit unless one
    sample has 2^31 elements or more (then ``OFFSETS_64`` widens them too).

float64 input runs the reference functions: the contract asks for float64 statistics there (so that
``gradcheck`` sees float64 math), and float64 GroupNorm is a correctness tool, not a hot path.

Files
    ``_plan.py`` the planner (regimes, tiles, chunks: a ``Plan``, from shapes and the SM count);
    ``_device.py`` the device functions the kernels share; ``_forward.py`` and ``_backward.py`` the kernels;
    ``_interpreter.py`` a fix for Triton 3.6's interpreter. This file: the entry points, which take an
    optional ``plan`` (the heuristic's, ``plan_for``, when none is given).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from diffkern.ops._common import binds, float64_runs_reference
from diffkern.ops.group_norm_silu import (as_3d, group_norm_silu_backward_reference, group_norm_silu_forward_reference,
                                          in_kernel_layout)
from diffkern.triton._common import LAUNCH_OPTIONS, device_guard, direct_launcher, positional_tail
from diffkern.triton.group_norm_silu import _interpreter
from diffkern.triton.group_norm_silu._backward import (bwd_chunk_dx_kernel, bwd_chunk_sums_kernel, bwd_group_kernel,
                                                        sum_partial_rows_kernel)
from diffkern.triton.group_norm_silu._forward import fwd_chunk_apply_kernel, fwd_chunk_moments_kernel, fwd_group_kernel
from diffkern.triton.group_norm_silu._plan import (BACKWARD, FORWARD, REGIMES, Plan, cdiv, layout_of, make_plan,
                                                    next_pow2, plan_for)

__all__ = ["BACKWARD", "FORWARD", "REGIMES", "Plan", "group_norm_silu_backward", "group_norm_silu_forward",
           "make_plan", "plan_for"]

_interpreter.fix_triton36_interpreter()

# The launches take LAUNCH_OPTIONS, the backends' one numeric policy (README, "Numerics"): no FMA contraction.


def _param(param: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    # A [C] view with a stride is made dense (C elements, not a hot-path cost). Absent parameters pass a
    # placeholder pointer that the kernels never read (HAS_WEIGHT / HAS_BIAS are False).
    return placeholder if param is None else param.contiguous()


def _in_kernel_layout(t: torch.Tensor, like: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, bool]:
    """The ``(N, C, S)`` view of ``t`` and whether it is channels-last. The op always passes NCHW or channels-last
    tensors (then this is a view of ``t``); anything else, or a tensor whose layout differs from ``like``'s (a
    3-D tensor), is copied into ``like``'s layout (or NCHW) so that the semantics match the reference for any
    strides."""
    if t.ndim != 3:
        t = as_3d(in_kernel_layout(t))
    channels_last = layout_of(t)
    if like is not None:
        target = layout_of(like)
        if channels_last != target or (t.shape != like.shape):
            return torch.empty_like(like).copy_(t), bool(target)
        return t, bool(channels_last)
    if channels_last is None:
        return t.contiguous(), False
    return t, channels_last


def _checked_plan(plan: Optional[Plan], x: torch.Tensor, num_groups: int, channels_last: bool, tuning) -> Plan:
    """``plan``, or the heuristic's for ``x`` (in the kernels' layout); a given plan must be for this problem."""
    if plan is None:
        return plan_for(x, num_groups, tuning)
    if plan.shape != tuple(x.shape) or plan.num_groups != num_groups or plan.channels_last != channels_last:
        layout = "channels-last" if channels_last else "NCHW"
        raise ValueError(f"group_norm_silu: the plan is for shape {plan.shape}, {plan.num_groups} groups, "
                         f"channels_last={plan.channels_last}; this call is {tuple(x.shape)}, {num_groups} groups, "
                         f"{layout}")
    return plan


@float64_runs_reference(group_norm_silu_forward_reference, dtype_from=0)
def group_norm_silu_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                            num_groups: int, eps: float, *,
                            plan: Optional[Plan] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(y, mean, rstd)``: y = silu(group_norm(x)) with x's shape, dtype and strides; mean and rstd
    are fp32 ``[N, G]`` (float64 for float64 x).

    x: (N, C, S) fp16/bf16/fp32, NCHW or channels-last; weight, bias: [C] any float dtype, or None.
    """
    x3, channels_last = _in_kernel_layout(x)
    y, mean, rstd = _forward_launch(x3, channels_last, weight, bias, num_groups, plan)(x3, weight, bias, num_groups,
                                                                                      eps)
    return y.view_as(x), mean, rstd


@binds(group_norm_silu_forward)
def _bind_forward(x, weight, bias, num_groups, eps):
    """The forward bound to one signature (``_common.binds``): x fp16/bf16/fp32 in one of the contract's layouts,
    which the launch takes as it is (no view: the kernels address it as its ``(N, C, S)`` view)."""
    if x.dtype == torch.float64 or in_kernel_layout(x) is not x:
        return None
    x3 = as_3d(x)
    channels_last = layout_of(x3)
    if channels_last is None:
        return None
    return _forward_launch(x3, channels_last, weight, bias, num_groups, None)


def _forward_launch(x: torch.Tensor, channels_last: bool, weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], num_groups: int, plan: Optional[Plan]):
    """``launch(x, weight, bias, num_groups, eps)`` running the forward for inputs with the signature of ``x`` (the
    ``(N, C, S)`` view, in the kernels' layout) or of any tensor of which it is the view: the plan, the kernels'
    launch geometry and their fixed arguments computed here. Outputs have the launched tensor's shape and strides
    (``torch.empty_like``), so its memory is what the kernels address."""
    n, c, s = x.shape
    plan = _checked_plan(plan, x, num_groups, channels_last, FORWARD)
    groups = n * num_groups
    cpg = c // num_groups
    # The constexprs go positionally (``positional_tail``): a launch builds no keyword dictionary of them.
    meta = dict(BLOCK_S=plan.block_s, BLOCK_C=plan.block_c, CHANNELS_LAST=plan.channels_last,
                OFFSETS_64=plan.offsets_64, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                SINGLE_TILE=plan.regime == "single", BLOCK_K=next_pow2(plan.chunks), GPT=plan.group_pack)
    options = dict(num_warps=plan.num_warps, **LAUNCH_OPTIONS)
    # (Direct launches, ``DirectLauncher``: one per kernel, grid, options, the tensors' dtypes and device.)
    dtypes = (x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    if plan.regime == "split":
        chunk_args = (c, s, cpg, num_groups, plan.c_tiles, plan.s_tiles, plan.s_chunks, plan.c_tiles_per_chunk,
                      plan.s_tiles_per_chunk)
        partials_shape = (3, groups, plan.chunks)
        grid = (groups // plan.group_pack, plan.chunks)
        moments = direct_launcher(fwd_chunk_moments_kernel, grid, options, dtypes, x.device)
        apply = direct_launcher(fwd_chunk_apply_kernel, grid, options, dtypes, x.device)
        moments_tail = positional_tail(fwd_chunk_moments_kernel, "BLOCK_S", meta)
        apply_tail = positional_tail(fwd_chunk_apply_kernel, "BLOCK_K", meta)
    else:
        group_kernel = direct_launcher(fwd_group_kernel, (groups,), options, dtypes, x.device)
        group_args = (c, s, cpg, num_groups, plan.c_tiles, plan.s_tiles)
        group_tail = positional_tail(fwd_group_kernel, "BLOCK_S", meta)

    device = x.device

    def launch(x, weight, bias, num_groups, eps):
        y = torch.empty_like(x)
        mean = torch.empty(n, num_groups, device=device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        w, b = _param(weight, x), _param(bias, x)
        with device_guard(x):
            if plan.regime == "split":
                partials = torch.empty(partials_shape, device=device, dtype=torch.float32)
                moments(x, partials, *chunk_args, *moments_tail)
                apply(x, y, w, b, partials, mean, rstd, *chunk_args, eps, *apply_tail)
            else:
                group_kernel(x, y, w, b, mean, rstd, *group_args, eps, *group_tail)
        return y, mean, rstd
    return launch


@float64_runs_reference(group_norm_silu_backward_reference, dtype_from=1)
def group_norm_silu_backward(
        grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
        mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, *, plan: Optional[Plan] = None
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Returns ``(dx, dweight, dbias)``: dx with x's shape, dtype and strides; dweight / dbias fp32 ``[C]``
    when weight / bias are given, else None.

    grad_out, x: (N, C, S) in the same layout (grad_out in any float dtype); mean, rstd: fp32 ``[N, G]`` from
    the forward.
    """
    original = x
    x, channels_last = _in_kernel_layout(x)
    grad_out, _ = _in_kernel_layout(grad_out, like=x)
    n, c, s = x.shape
    plan = _checked_plan(plan, x, num_groups, channels_last, BACKWARD)
    mean = mean.to(torch.float32).contiguous()
    rstd = rstd.to(torch.float32).contiguous()
    dx = torch.empty_like(x)
    groups = n * num_groups
    cpg = c // num_groups
    has_weight, has_bias = weight is not None, bias is not None
    planes = int(has_weight) + int(has_bias)
    rows = n * plan.s_chunks
    # Per-(sample, spatial chunk) partial sums of dweight / dbias; every entry is written by exactly one
    # program, so the buffer needs no zero fill. Without affine parameters nothing is written there.
    partials = torch.empty((planes, rows, c), device=x.device, dtype=torch.float32) if planes else x
    w, b = _param(weight, x), _param(bias, x)
    layout = dict(BLOCK_S=plan.block_s, BLOCK_C=plan.block_c, CHANNELS_LAST=plan.channels_last,
                  OFFSETS_64=plan.offsets_64, num_warps=plan.num_warps, **LAUNCH_OPTIONS)
    affine = dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias)
    with device_guard(x):
        if plan.regime == "split":
            chunk_args = (plan.c_tiles, plan.s_tiles, plan.s_chunks, plan.c_tiles_per_chunk, plan.s_tiles_per_chunk)
            sums = torch.empty((2, groups, plan.chunks), device=x.device, dtype=torch.float32)
            grid = (groups // plan.group_pack, plan.chunks)
            bwd_chunk_sums_kernel[grid](grad_out, x, w, b, mean, rstd, sums, partials, c, s, cpg, num_groups,
                                        *chunk_args, GPT=plan.group_pack, **layout, **affine)
            bwd_chunk_dx_kernel[grid](grad_out, x, w, b, mean, rstd, sums, dx, c, s, cpg, num_groups, *chunk_args,
                                      BLOCK_K=next_pow2(plan.chunks), GPT=plan.group_pack, **layout, **affine)
        else:
            bwd_group_kernel[(groups,)](grad_out, x, w, b, mean, rstd, dx, partials, c, s, cpg, num_groups,
                                        plan.c_tiles, plan.s_tiles, SINGLE_TILE=plan.regime == "single", **layout,
                                        **affine)
        dweight = torch.empty(c, device=x.device, dtype=torch.float32) if has_weight else None
        dbias = torch.empty(c, device=x.device, dtype=torch.float32) if has_bias else None
        if planes:
            block_c = min(next_pow2(c), 256)
            sum_partial_rows_kernel[(cdiv(c, block_c), planes)](
                partials, dweight if has_weight else dbias, dbias if has_bias else dweight, rows, c,
                HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, BLOCK_R=min(next_pow2(rows), 16), BLOCK_C=block_c,
                **LAUNCH_OPTIONS)
    return dx.view_as(original), dweight, dbias
