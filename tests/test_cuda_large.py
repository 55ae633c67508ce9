"""The CUDA extension's GroupNorm+SiLU on a tensor past 2^31 elements (GPU only; ~40 GB of GPU memory).

The cuda backend's add_noise has its > 2^31 test in ``test_cuda_backend.py`` and the Triton kernels theirs in
``test_triton_*.py``; this is the one for the CUDA GroupNorm kernels, forward and backward, in both layouts'
regimes the default plan picks for few huge groups. The first and the last group are checked against the
reference run on those groups alone. ``scripts/gpu_session.py`` runs it in its correctness stage.
"""

from __future__ import annotations

import pytest
import torch

from diffkern.ops.group_norm_silu import group_norm_silu_backward_reference, group_norm_silu_forward_reference
from diffkern.testing import assert_close
from test_cuda_backend import CUDA, cuda_backend  # noqa: F401  (the fixture: skips without a usable extension)

NEEDED_BYTES = 40 * 2**30


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_cuda_group_norm_silu_past_2_to_the_31_elements(cuda_backend, gen, layout):
    """Two samples of 32 channels x (2^26 + 3) pixels (2^32 + 192 elements, fp16): batch and in-sample offsets
    both pass 2^31."""
    free, _ = torch.cuda.mem_get_info(CUDA)
    if free < NEEDED_BYTES:
        pytest.skip(f"needs ~{NEEDED_BYTES / 2**30:.0f} GB of free GPU memory, {free / 2**30:.0f} GB free")
    groups, channels, spatial = 32, 32, 2**26 + 3
    shape = (2, spatial, channels) if layout == "nhwc" else (2, channels, spatial)
    device_gen = torch.Generator(CUDA).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    x = torch.empty(shape, device=CUDA, dtype=torch.float16).normal_(generator=device_gen)
    dy = torch.empty_like(x).normal_(generator=device_gen)
    if layout == "nhwc":   # (N, C, S) views with channels-last strides
        x, dy = x.transpose(1, 2), dy.transpose(1, 2)
    y, mean, rstd = torch.ops.diffkern.group_norm_silu_fwd_cuda(x, None, None, groups, 1e-5, 0)
    dx, _, _ = torch.ops.diffkern.group_norm_silu_bwd_cuda(dy, x, None, None, mean, rstd, groups, 0)
    for n, g in ((0, 0), (1, groups - 1)):
        cols = slice(g, g + 1)   # one channel per group
        xs, dys = x[n:n + 1, cols].contiguous(), dy[n:n + 1, cols].contiguous()
        ys, means, rstds = group_norm_silu_forward_reference(xs, None, None, 1, 1e-5)
        assert_close(mean[n, g], means[0, 0], msg="mean")
        assert_close(rstd[n, g], rstds[0, 0], msg="rstd")
        assert_close(y[n:n + 1, cols], ys, msg="y")
        dxs, _, _ = group_norm_silu_backward_reference(dys, xs, None, None, mean[n:n + 1, g:g + 1],
                                                        rstd[n:n + 1, g:g + 1], 1)
        assert_close(dx[n:n + 1, cols], dxs, msg="dx")
